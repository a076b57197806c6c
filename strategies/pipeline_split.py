"""Cutting a model into pipeline stages: choosing the split points, tracing, keeping one stage.

Pipelined inference (``prepare_pippy``) and pipeline-parallel training share this: the model is
traced once with torch's pipelining (``Pipe.from_tracing``) on one micro-batch, cut at the
split points, and each process keeps its own stage. The stage's parameters are the model's own
objects, under their original names, so checkpoints of stages read like the whole model's.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.distributed.pipelining import Pipe, SplitPoint
from torch.distributed.pipelining._IR import annotate_split_points
from torch.distributed.pipelining.stage import _PipelineStage

from trainer.strategies.nested import find_batch_size, recursively_apply

__all__ = ["StagePosition", "auto_split_points", "broadcast_output", "build_stage", "checked_split_points",
           "describe", "first_microbatch", "shapes", "sorted_kwargs"]

_PIPE_SPLIT = torch.ops.pippy._pipe_split.default  # the graph op of a split point (registered by pipelining)


class StagePosition:
    """Where this process's stage lies in the pipeline (``stage_index`` of ``num_stages``)."""

    stage_index: int
    num_stages: int

    @property
    def is_first_stage(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_index == self.num_stages - 1


def build_stage(model: nn.Module, split_points: str | Sequence[str], num_stages: int, stage_index: int,
                microbatch: tuple[tuple[Any, ...], dict[str, Any]], device: torch.device, group: Any = None,
                no_split_module_classes: Iterable[str] | None = None) -> tuple[_PipelineStage, list[str]]:
    """Trace ``model`` on one micro-batch, cut it into ``num_stages`` stages and return stage ``stage_index``
    (built over the process ``group``; torch's default group when None) and the split points used.

    The model is traced in the mode it is in (train or eval); a transformers model's ``use_cache``
    is switched off, as a key/value cache cannot cross stages.
    """
    if split_points == "auto":
        split_points = auto_split_points(model, num_stages, no_split_module_classes)
    else:
        split_points = checked_split_points(model, split_points, num_stages)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
    args, kwargs = microbatch
    # What torch.distributed.pipelining.pipeline(split_spec=...) does, plus a pass on the traced graph.
    annotate_split_points(model, {name: SplitPoint.BEGINNING for name in split_points})
    pipe = Pipe.from_tracing(model, args, kwargs or None, split_policy=inputs_through_first_stage)
    if pipe.num_stages != num_stages:
        raise RuntimeError(
            f"Splitting at {split_points} gave {pipe.num_stages} stages, not {num_stages} (one per process): "
            "each split point must be a module that the forward pass calls, and no two may start the same stage. "
            "Choose modules on the forward path, e.g. the model's transformer layers.")
    stage = pipe.build_stage(stage_index, device=device, group=group)
    # The stage keeps the split graph's owner, and through it every stage's submodule: drop the others'
    # so that their weights are freed once the caller lets go of the original model.
    for name, child in list(pipe.split_gm.named_children()):
        if child is not stage.submod:
            setattr(pipe.split_gm, name, nn.Module())
    return stage, list(split_points)


def auto_split_points(model: nn.Module, num_stages: int,
                      no_split_module_classes: Iterable[str] | None = None) -> list[str]:
    """Names of the blocks each stage after the first begins with, for ``num_stages`` stages of equal block count.

    The blocks are the modules of the ``no_split_module_classes`` (default: ``model._no_split_modules``),
    outermost only; without any, the children of the largest ``ModuleList``. Cutting between
    repeated blocks keeps each block whole and gives stages of about the same work.
    """
    classes = set(no_split_module_classes or getattr(model, "_no_split_modules", None) or ())
    blocks: list[str] = []
    for name, module in model.named_modules():
        if type(module).__name__ in classes and not any(name.startswith(block + ".") for block in blocks):
            blocks.append(name)
    source = f"modules of the classes {sorted(classes)}"
    if not blocks:
        lists = [(len(module), name) for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]
        if lists:
            size, list_name = max(lists, key=lambda item: item[0])
            blocks = [f"{list_name}.{index}" if list_name else str(index) for index in range(size)]
            source = f"children of the ModuleList {list_name!r}"
    if not blocks:
        raise ValueError(
            "split_points='auto' found no repeated blocks to cut between (no module of no_split_module_classes "
            "and no nn.ModuleList); pass split_points=[...] with the names of the modules each later stage begins with.")
    if len(blocks) < num_stages:
        raise ValueError(
            f"split_points='auto' found {len(blocks)} blocks ({source}), too few for {num_stages} stages; "
            "run fewer processes or pass split_points=[...] explicitly.")
    # As even as possible: the first len(blocks) % num_stages stages get one block more.
    base, extra = divmod(len(blocks), num_stages)
    starts, index = [], 0
    for stage in range(num_stages - 1):
        index += base + (1 if stage < extra else 0)
        starts.append(blocks[index])
    return starts


def checked_split_points(model: nn.Module, split_points: Sequence[str], num_stages: int) -> list[str]:
    if isinstance(split_points, str):
        raise ValueError(f"split_points must be 'auto' or a list of module names, not the string {split_points!r}; "
                         f"write split_points=[{split_points!r}].")
    names = [name for name, _ in model.named_modules() if name]
    known = set(names)
    for name in split_points:
        if name not in known:
            close = difflib.get_close_matches(str(name), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"Split point {name!r} is not a module of {type(model).__name__}.{hint} "
                             "Split points are names from model.named_modules().")
    if len(split_points) != num_stages - 1:
        raise ValueError(
            f"{len(split_points)} split points make {len(split_points) + 1} stages, but there are {num_stages} "
            f"processes (one stage each): pass {num_stages - 1} split point(s), or launch "
            f"{len(split_points) + 1} processes.")
    return list(split_points)


def inputs_through_first_stage(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Route model inputs that later stages read (e.g. ``input_ids`` in a classification head) through stage 0.

    torch's pipeline stages take the model's inputs on the first stage only; a later stage that
    reads one directly fails at run time. An alias of each such input, made before the first
    split, turns it into an activation that the first stage sends on like any other.
    """
    graph = graph_module.graph
    nodes = list(graph.nodes)
    splits = [index for index, node in enumerate(nodes) if (node.op, node.target) == ("call_function", _PIPE_SPLIT)]
    if not splits:
        return graph_module
    first_split = nodes[splits[0]]
    stacks = [node.meta["nn_module_stack"] for node in nodes if node.meta.get("nn_module_stack")]
    root_stack = list(stacks[0].items())[:1] if stacks else []
    later = set(nodes[splits[0] + 1:])
    for placeholder in (node for node in nodes if node.op == "placeholder"):
        if not isinstance(placeholder.meta.get("val"), torch.Tensor):
            continue
        late_users = [user for user in placeholder.users if user in later]
        if not late_users:
            continue
        with graph.inserting_before(first_split):
            alias = graph.call_function(torch.ops.aten.alias.default, (placeholder,))
        alias.meta = {key: value for key, value in placeholder.meta.items() if key in ("val", "tensor_meta")}
        alias.meta["nn_module_stack"] = dict(root_stack)  # a top-level op of the model, as torch's unflatten expects
        for user in late_users:
            user.replace_input_with(placeholder, alias)
    graph_module.recompile()
    return graph_module


def first_microbatch(args: tuple[Any, ...], kwargs: dict[str, Any], num_chunks: int,
                     source: str = "example_args", count: str = "num_chunks") -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The first of ``num_chunks`` micro-batches of the example: the stages are traced at micro-batch size."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1, got {num_chunks}.")
    batch_size = find_batch_size((args, kwargs))
    if batch_size is None:
        raise ValueError(f"The pipeline traces the model on {source}, which must hold a batch of tensors, "
                         "e.g. (input_ids,).")
    if batch_size % num_chunks:
        raise ValueError(
            f"The batch size of {source} ({batch_size}) is not divisible by {count} ({num_chunks}): each "
            f"micro-batch must have the same size. Use a batch size that is a multiple of {num_chunks}, or "
            f"a {count} that divides {batch_size}.")
    size = batch_size // num_chunks

    def first(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 0 or tensor.shape[0] != batch_size:
            raise ValueError(f"Every tensor of {source} must have the batch ({batch_size}) as its "
                             f"first dimension, but one has shape {tuple(tensor.shape)}.")
        return tensor[:size]

    return recursively_apply(first, tuple(args)), recursively_apply(first, kwargs)


def shapes(data: Any) -> list[tuple[tuple[int, ...], torch.dtype]]:
    found: list[tuple[tuple[int, ...], torch.dtype]] = []
    recursively_apply(lambda tensor: found.append((tuple(tensor.shape), tensor.dtype)), data)
    return found


def sorted_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return dict(sorted(kwargs.items()))


def describe(shapes: list[tuple[tuple[int, ...], torch.dtype]]) -> str:
    return "[" + ", ".join(f"{shape} {str(dtype).removeprefix('torch.')}" for shape, dtype in shapes) + "]"


class _TensorSpec:
    """Shape and dtype of an output tensor, sent ahead so the other processes can receive it."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype


def broadcast_output(output: Any, source: int, group: Any, device: torch.device, is_source: bool) -> Any:
    """The output of process ``source`` (a global rank) on every process of ``group`` (None: all of them):
    its structure first, then each tensor."""
    import torch.distributed as dist

    holder: list[Any] = [recursively_apply(_TensorSpec, output) if is_source else None]
    dist.broadcast_object_list(holder, src=source, group=group)
    if is_source:
        output = recursively_apply(lambda tensor: tensor.detach().contiguous(), output)
    else:
        output = recursively_apply(lambda spec: torch.empty(spec.shape, dtype=spec.dtype, device=device), holder[0],
                                   test=lambda item: isinstance(item, _TensorSpec))
    tensors: list[torch.Tensor] = []
    recursively_apply(tensors.append, output)
    for tensor in tensors:
        dist.broadcast(tensor, src=source, group=group)
    return output
