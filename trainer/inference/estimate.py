"""How much memory a model needs to load, to run and to train, computed from its structure alone.

The model is meant to be built inside ``init_empty_weights()``: its parameters sit on the meta
device, so a 70B model is estimated on a laptop in a second. Every number is a count of
elements times bytes per element; nothing is allocated or measured. Tied weights are counted
once, because loading and training keep one copy of them.

What each row counts, for the weights cast to its dtype (non-floating buffers keep their own):

- ``largest_layer_bytes``: the biggest unit that runs as a whole (a no-split block such as a
  transformer layer, or a leaf module), the same unit a device map keeps on one device.
- ``total_bytes``: every parameter and buffer, i.e. the memory to load the weights.
- ``inference_bytes``: ``total_bytes`` x (1 + ``inference_overhead``), 20% by default: the
  activations of one forward pass, the KV cache at a moderate batch and context, and the
  framework's buffers. This is the rule of thumb of EleutherAI's "Transformer Math 101" (inference
  takes about 1.2x the weights), also the margin Accelerate's ``estimate-memory`` recommends; long
  contexts or large batches need more, because the KV cache grows with batch x sequence length.
- ``training_bytes``: the state that lives through a training step with ``optimizer``, for trainable
  (``requires_grad``) floating parameters: the weights in the row's dtype, one gradient per
  parameter in that dtype, the optimizer's fp32 states (Adam: ``exp_avg`` and ``exp_avg_sq``), and
  for float16/bfloat16 an fp32 master copy of the weights, which mixed-precision training with
  half-precision weights keeps so that small updates are not rounded away. That is 16 bytes per
  parameter with Adam in float32 (4 + 4 + 8) and in float16/bfloat16 (2 + 2 + 4 + 8).
  Not counted: activations (they grow with batch x sequence length); temporaries of the backward
  (a tied weight briefly has two gradients before they are summed) and of the optimizer step
  (torch's for-each Adam, its default on GPUs, holds one more fp32 copy of the trainable weights
  during ``step()``; on the CPU it updates one tensor at a time with two temporaries of its size;
  ``fused=True`` makes none); and the allocator's or the CUDA context's own memory. int8 and int4
  rows have no training figure (``None``): optimizers do not update quantized weights.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from torch import nn

from trainer.inference.device_map import largest_layer, no_split_classes
from trainer.inference.sizes import named_tensors, tensor_bytes

BYTES_PER_ELEMENT: dict[str, float] = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "int4": 0.5}
DTYPES = tuple(BYTES_PER_ELEMENT)
HALF_DTYPES = ("float16", "bfloat16")
QUANTIZED_DTYPES = ("int8", "int4")
# fp32 tensors the optimizer keeps per parameter: Adam's first and second moments, SGD's momentum buffer.
OPTIMIZER_STATES: dict[str, int] = {"adam": 2, "adamw": 2, "sgd": 0, "sgd-momentum": 1}
INFERENCE_OVERHEAD = 0.2
FP32_BYTES = 4


def _elements_bytes(numel: int, bytes_per_element: float) -> int:
    # int4 packs two elements per byte; an odd count still takes a whole last byte.
    return math.ceil(numel * bytes_per_element)


def module_bytes(model: nn.Module, dtype: str) -> dict[str, int]:
    """Bytes under every module name (``""`` is the whole model) with floating tensors stored as ``dtype``.

    Like ``sizes.module_sizes``, but ``dtype`` may be ``"int4"``, which torch has no element size for.
    """
    per_element = BYTES_PER_ELEMENT[dtype]
    sizes: dict[str, int] = defaultdict(int)
    for name, tensor in named_tensors(model):
        size = _elements_bytes(tensor.numel(), per_element) if tensor.is_floating_point() else tensor_bytes(tensor)
        parts = name.split(".")
        for i in range(len(parts) + 1):
            sizes[".".join(parts[:i])] += size
    return dict(sizes)


def trainable_elements(model: nn.Module) -> int:
    """Elements of the parameters an optimizer updates: floating, ``requires_grad``, tied ones once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad and p.is_floating_point())


def training_breakdown(model: nn.Module, dtype: str, optimizer: str = "adam",
                       weights_bytes: int | None = None) -> dict[str, int] | None:
    """What training holds between steps, by part (``None`` for int8/int4, which are not trained)."""
    if dtype in QUANTIZED_DTYPES:
        return None
    trainable = trainable_elements(model)
    per_element = BYTES_PER_ELEMENT[dtype]
    return {
        "weights": module_bytes(model, dtype)[""] if weights_bytes is None else weights_bytes,
        "gradients": _elements_bytes(trainable, per_element),
        "master_weights": trainable * FP32_BYTES if dtype in HALF_DTYPES else 0,
        "optimizer_states": trainable * FP32_BYTES * OPTIMIZER_STATES[optimizer],
    }


def _check(dtypes: Iterable[str], optimizer: str) -> list[str]:
    dtypes = list(dtypes)
    unknown = [d for d in dtypes if d not in BYTES_PER_ELEMENT]
    if unknown:
        raise ValueError(f"Unknown dtype {unknown[0]!r}; valid dtypes: {', '.join(DTYPES)}.")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"Unknown optimizer {optimizer!r}; valid optimizers: {', '.join(OPTIMIZER_STATES)}.")
    return dtypes


def estimate_memory(model: nn.Module, dtypes: Iterable[str] = ("float32", "float16", "bfloat16"),
                    optimizer: str = "adam", inference_overhead: float = INFERENCE_OVERHEAD) -> list[dict[str, Any]]:
    """One row per dtype: the largest layer, the weights, inference and training memory, in bytes.

    ``model`` is best built inside ``init_empty_weights()`` (only shapes and dtypes are read).
    Each row is a dict, ready for ``json.dumps``: ``dtype``, ``largest_layer`` (its module name),
    ``largest_layer_bytes``, ``total_bytes``, ``inference_bytes``, ``training_bytes`` and ``training``
    (the parts of ``training_bytes``: ``weights``, ``gradients``, ``master_weights``,
    ``optimizer_states``); the two training keys are ``None`` for int8 and int4. The module
    docstring says what each number counts and leaves out.
    """
    dtypes = _check(dtypes, optimizer)
    no_split = no_split_classes(model, None)
    rows = []
    for dtype in dtypes:
        sizes = module_bytes(model, dtype)
        layer, layer_bytes = largest_layer(model, no_split, sizes)
        total = sizes.get("", 0)
        training = training_breakdown(model, dtype, optimizer, weights_bytes=total)
        rows.append({
            "dtype": dtype,
            "largest_layer": layer,
            "largest_layer_bytes": layer_bytes,
            "total_bytes": total,
            "inference_bytes": math.ceil(total * (1 + inference_overhead)),
            "training_bytes": None if training is None else sum(training.values()),
            "training": training,
        })
    return rows
