"""Quantized loading with bitsandbytes: 8-bit (LLM.int8) and 4-bit (NF4/FP4) linear layers, and QLoRA.

``quantize_model`` swaps a model's ``nn.Linear`` layers for bitsandbytes ``Linear8bitLt`` /
``Linear4bit``. On a model built with ``init_empty_weights`` nothing is quantized yet: the
layers stay on the meta device and ``load_checkpoint_and_dispatch(..., quantization=...)``
quantizes each weight as it is read, so a full-precision copy of a quantized layer exists only
one tensor at a time. On a model with real weights the layers are quantized in place.

The output head (``lm_head``, the model's output embeddings, which are often tied to the input
embeddings) and a transformers model's ``_keep_in_fp32_modules`` stay in full precision by
default, as quantizing them costs much accuracy for little memory; ``skip_modules`` names more.

``prepare_for_qlora`` makes such a 4-bit model trainable with LoRA adapters (peft): the base
stays frozen and quantized, only the adapters learn, and the ``Trainer`` trains it like any model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, cast

import torch
from torch import nn

from trainer.inference.sizes import as_dtype

INSTALL_HINT = "pip install 'trainer-kit[quantization]'"


def require_bitsandbytes() -> Any:
    """The ``bitsandbytes`` module, or one ImportError that says how to install it."""
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(f"Quantized loading and 8-bit optimizers need bitsandbytes, which is not installed "
                          f"({error}). Install it with: {INSTALL_HINT}") from error
    return bitsandbytes


@dataclass
class QuantizationConfig:
    """How to quantize: the keyword arguments of transformers' ``BitsAndBytesConfig``, same names and meanings.

    Args:
        load_in_8bit: LLM.int8 linear layers (int8 weights, one scale per output row).
        load_in_4bit: 4-bit linear layers (blocks of 64 weights sharing one scale).
        llm_int8_threshold: 8-bit: activations above it run in full precision (outlier features).
        llm_int8_skip_modules: module names (or name parts: ``"classifier"``, ``"encoder.layer.0"``)
            left in full precision, in addition to the defaults.
        skip_modules: another name for ``llm_int8_skip_modules``.
        bnb_4bit_quant_type: ``"nf4"`` (normal-float, suits normally distributed weights) or ``"fp4"``.
        bnb_4bit_compute_dtype: the dtype 4-bit layers compute in (default ``torch.float32``).
        bnb_4bit_use_double_quant: quantize the 4-bit scales too (about 0.4 bits per weight less).
        bnb_4bit_quant_storage: the dtype packed 4-bit weights are stored in.
        keep_output_head: leave ``lm_head``, the output embeddings and ``_keep_in_fp32_modules``
            in full precision (the default).
    """

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: list[str] | None = None
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_compute_dtype: torch.dtype | str | None = None
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: torch.dtype | str | None = None
    skip_modules: list[str] | None = None
    keep_output_head: bool = True

    def __post_init__(self) -> None:
        if self.load_in_8bit == self.load_in_4bit:
            raise ValueError("QuantizationConfig: set exactly one of load_in_8bit=True or load_in_4bit=True.")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"bnb_4bit_quant_type must be 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}.")
        self.bnb_4bit_compute_dtype = as_dtype(self.bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype") or torch.float32
        self.bnb_4bit_quant_storage = as_dtype(self.bnb_4bit_quant_storage, "bnb_4bit_quant_storage") or torch.uint8

    @property
    def bits(self) -> int:
        return 8 if self.load_in_8bit else 4

    @property
    def skipped(self) -> list[str]:
        return [*(self.llm_int8_skip_modules or ()), *(self.skip_modules or ())]

    @classmethod
    def from_any(cls, value: QuantizationConfig | Mapping[str, Any] | Any) -> QuantizationConfig:
        """A config from itself, a dict of keyword arguments, or an object with those attributes (a ``BitsAndBytesConfig``)."""
        if isinstance(value, cls):
            return value
        names = {f.name for f in fields(cls)}
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - names)
            if unknown:
                raise TypeError(f"Unknown quantization settings: {', '.join(unknown)}. Known: {', '.join(sorted(names))}.")
            return cls(**value)
        if not hasattr(value, "load_in_8bit") and not hasattr(value, "load_in_4bit"):
            raise TypeError(f"quantization must be a QuantizationConfig, a dict or a BitsAndBytesConfig, "
                            f"got {type(value).__name__}.")
        return cls(**{name: getattr(value, name) for name in names if hasattr(value, name)})


def matches_modules(name: str, patterns: Iterable[str]) -> bool:
    """``name`` is a pattern, lies inside one (``encoder.layer.0.x``), or has one as a run of its parts (``classifier``)."""
    return any(name == p or name.startswith(p + ".") or f".{p}." in f".{name}." for p in patterns)


def modules_to_keep(model: nn.Module, config: QuantizationConfig) -> list[str]:
    """Names of the modules left in full precision: those asked for, plus by default the output head."""
    keep = list(config.skipped)
    if config.keep_output_head:
        keep += ["lm_head", *(getattr(model, "_keep_in_fp32_modules", None) or ()),
                 *(getattr(model, "_keep_in_fp32_modules_strict", None) or ())]
        head = cast(Any, model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        keep += [name for name, module in model.named_modules() if head is not None and module is head]
    return keep


def quantize_model(model: nn.Module, config: QuantizationConfig | Mapping[str, Any] | Any,
                   device_map: Mapping[str, Any] | None = None) -> nn.Module:
    """Replace ``model``'s ``nn.Linear`` layers (except the kept ones) with bitsandbytes 8-bit or 4-bit layers.

    Meta layers become meta bitsandbytes layers, quantized later as ``load_checkpoint_and_dispatch``
    loads them. Layers with real weights are quantized now, on their device (or the one ``device_map``
    gives them). Frozen: quantized weights are not trained (use ``prepare_for_qlora`` for adapters).
    """
    bnb = require_bitsandbytes()
    config = QuantizationConfig.from_any(config)
    keep = modules_to_keep(model, config)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or matches_modules(name, keep):
            continue
        meta = module.weight.device.type == "meta"
        with torch.device("meta"):
            replacement = _new_layer(bnb, module, config)
        if module.bias is not None:
            replacement.bias = nn.Parameter(module.bias.detach(), requires_grad=module.bias.requires_grad)
        if not meta:
            device = module.weight.device
            if device_map is not None:
                from trainer.inference.device_map import device_for, torch_device

                mapped = device_for(f"{name}.weight", device_map)
                device = device if mapped == "disk" else torch_device(mapped)  # offloaded: refused after
            replacement.weight = _quantized_parameter(bnb, replacement, module.weight.detach(), device)
            if replacement.bias is not None:
                replacement.bias = nn.Parameter(replacement.bias.detach().to(device), requires_grad=False)
        replacement.train(module.training)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
    marked: Any = model  # the attributes transformers sets on a quantized model, read by peft and by users
    marked.quantization_config = config
    marked.is_loaded_in_8bit, marked.is_loaded_in_4bit = config.load_in_8bit, config.load_in_4bit
    marked.is_quantized = True
    return model


def _new_layer(bnb: Any, linear: nn.Linear, config: QuantizationConfig) -> nn.Module:
    bias = linear.bias is not None
    if config.load_in_8bit:
        return bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, threshold=config.llm_int8_threshold,
                                   has_fp16_weights=config.llm_int8_has_fp16_weight)
    return bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=config.bnb_4bit_compute_dtype,
                             compress_statistics=config.bnb_4bit_use_double_quant, quant_type=config.bnb_4bit_quant_type,
                             quant_storage=config.bnb_4bit_quant_storage)


def _quantized_parameter(bnb: Any, layer: nn.Module, weight: torch.Tensor, device: torch.device) -> nn.Parameter:
    """``weight`` quantized for ``layer`` and put on ``device`` (bitsandbytes quantizes as the parameter moves)."""
    weight = weight.to("cpu") if weight.device.type != "cpu" else weight
    if isinstance(layer, bnb.nn.Linear8bitLt):
        parameter = bnb.nn.Int8Params(weight.contiguous(), requires_grad=False,
                                      has_fp16_weights=layer.state.has_fp16_weights)
    else:
        old: Any = layer.weight  # a bitsandbytes Params4bit
        parameter = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, blocksize=old.blocksize,
                                      compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                      quant_storage=old.quant_storage, module=layer)
    return parameter.to(device)


def is_quantized_layer(module: nn.Module) -> bool:
    """A bitsandbytes 8-bit or 4-bit linear layer (False when bitsandbytes is not installed)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: layer}`` for every bitsandbytes linear layer in ``model``."""
    return {name: module for name, module in model.named_modules() if is_quantized_layer(module)}


def load_quantized_weight(model: nn.Module, name: str, tensor: torch.Tensor, device: torch.device) -> bool:
    """Quantize ``tensor`` into the bitsandbytes layer that owns ``name`` on ``device``; False when it is no such weight.

    Called for each weight as a checkpoint is read, so only this one tensor is ever in full precision.
    """
    owner, _, local = name.rpartition(".")
    if local != "weight" or not getattr(model, "is_quantized", False):
        return False
    layer = model.get_submodule(owner)
    if not is_quantized_layer(layer):
        return False
    layer.weight = _quantized_parameter(require_bitsandbytes(), layer, tensor, device)
    return True


def check_quantized_placement(model: nn.Module, device_map: Mapping[str, Any], main: torch.device) -> None:
    """Quantized layers must stay where they run: one clear error if the map offloads any."""
    from trainer.inference.device_map import device_for
    from trainer.inference.dispatch import offloaded

    moved = [name for name in quantized_layers(model) if offloaded(device_for(f"{name}.weight", device_map), main)]
    if moved:
        listed = ", ".join(moved[:5]) + (f" and {len(moved) - 5} more" if len(moved) > 5 else "")
        raise ValueError(f"Quantized layers cannot be offloaded, but the device map puts {listed} away from {main}. "
                         "Raise max_memory for that device, or list them in skip_modules.")


def quantized_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the weights (and their scales) of the model's bitsandbytes layers."""
    total = 0
    for layer in quantized_layers(model).values():
        weight: Any = layer.weight  # a bitsandbytes parameter
        total += weight.numel() * weight.element_size()
        for extra in (getattr(weight, "SCB", None), getattr(layer.state, "SCB", None) if hasattr(layer, "state") else None):
            if isinstance(extra, torch.Tensor):
                total += extra.numel() * extra.element_size()
                break
        state = getattr(weight, "quant_state", None)
        if state is not None:
            total += sum(t.numel() * t.element_size() for t in state.as_dict(packed=True).values() if isinstance(t, torch.Tensor))
    return total


def prepare_for_qlora(model: nn.Module, lora_config: Any = None, gradient_checkpointing: bool = False,
                      **lora_kwargs: Any) -> nn.Module:
    """A quantized model made ready to fine-tune LoRA adapters (peft) over its frozen base.

    Every base parameter is frozen (the quantized weights, and the full-precision ones left out of
    quantization), layer norms and other half-precision weights are kept in fp32 for stable training,
    and peft puts adapters (``lora_config``, or a ``LoraConfig`` built from ``lora_kwargs``) beside
    the quantized layers. Give the result to the ``Trainer``: its optimizer only sees the adapters.
    """
    try:
        import peft
    except ImportError as error:
        raise ImportError(f"QLoRA needs peft, which is not installed ({error}). Install it with: {INSTALL_HINT}") from error
    if not getattr(model, "is_quantized", False):
        raise ValueError("prepare_for_qlora expects a quantized model: run quantize_model (or load with quantization=) first.")
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if lora_config is None:
        lora_config = peft.LoraConfig(**lora_kwargs)
    elif lora_kwargs:
        raise TypeError("Give either lora_config or LoraConfig keyword arguments, not both.")
    return peft.get_peft_model(model, lora_config)
