"""Pipeline-parallel inference: one slice of a model per process, micro-batches flowing through them.

A model too large for one device can still answer a batch if each process holds a consecutive
slice of its layers (a *stage*) and passes activations on to the next. ``prepare_pippy`` traces
the model once with ``torch.distributed.pipelining.pipeline``, cuts the graph at the split points,
keeps only this process's stage and runs it under ``ScheduleGPipe``: the batch is cut into
``num_chunks`` micro-batches, so while stage 1 works on the first micro-batch, stage 0 already
works on the second. Tracing, splitting, the stage and the schedule are torch's; this module
chooses the split points, checks the inputs and hands the output back.

    model = prepare_pippy(model, split_points="auto", example_args=(input_ids,))
    with torch.no_grad():
        output = model(input_ids)  # the last process gets the output; the others get None
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import fx, nn
from torch.distributed.pipelining import Pipe, ScheduleGPipe, SplitPoint
from torch.distributed.pipelining._IR import annotate_split_points

from trainer.operations import find_batch_size, recursively_apply, send_to_device
from trainer.state import PartialState

__all__ = ["PipelinedModel", "auto_split_points", "prepare_pippy"]

_PIPE_SPLIT = torch.ops.pippy._pipe_split.default  # the graph op of a split point (registered by pipelining)
LAUNCH_HINT = "run the script with `trainer launch --num_processes 2 script.py` (one process per stage)"


class PipelinedModel(nn.Module):
    """This process's stage of a pipelined model, called like the model itself.

    Every process calls it with the full batch (the same on every process, as a data loader
    without sharding gives it). The first stage feeds the batch in, micro-batch by micro-batch;
    the last stage's output comes back on the last process, or on every process with
    ``gather_output=True``; elsewhere the call returns ``None``.

    Only the stage's submodule is registered, so ``parameters()`` and the memory held are this
    process's share of the model. ``config`` is the original model's config, where it had one.
    """

    def __init__(self, stage_module: nn.Module, schedule: ScheduleGPipe, *, stage_index: int, num_stages: int,
                 num_chunks: int, gather_output: bool, split_points: list[str], example_inputs: tuple[Any, ...],
                 example_kwargs: dict[str, Any], config: Any = None) -> None:
        super().__init__()
        self.stage_module = stage_module
        self.schedule = schedule
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.num_chunks = num_chunks
        self.gather_output = gather_output
        self.split_points = split_points
        self.hf_split_points = split_points  # the attribute name Accelerate users look for
        self.config = config
        # The stages exchange buffers sized by the trace, so every call must match its shapes.
        self._expected = _shapes((example_inputs, _sorted(example_kwargs)))
        self._expected_keys = sorted(example_kwargs)

    @property
    def is_first_stage(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run one pipeline step on the batch; the output is the last stage's (see the class docstring)."""
        if self.is_first_stage or args or kwargs:
            self._check_inputs(args, kwargs)
        device = PartialState().device
        if self.is_first_stage:
            output = self.schedule.step(*send_to_device(args, device), **send_to_device(kwargs, device))
        else:
            output = self.schedule.step()
        if not self.is_last_stage:
            output = None
        if self.gather_output:
            output = _broadcast_from_last_process(output, device)
        return output

    def _check_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if sorted(kwargs) != self._expected_keys:
            raise ValueError(
                f"prepare_pippy traced the model with keyword arguments {self._expected_keys}, but it was called "
                f"with {sorted(kwargs)}. Call it with the same arguments as example_args/example_kwargs, or "
                "prepare it again with example inputs of the call you make.")
        got = _shapes((args, _sorted(kwargs)))
        if got != self._expected:
            raise ValueError(
                f"prepare_pippy traced the model for inputs of shapes {_describe(self._expected)}, but it was called "
                f"with {_describe(got)}. The stages exchange buffers of the traced size, so every call needs the "
                "shapes of example_args/example_kwargs: pad the batch to that size, or prepare the model again "
                "with example inputs of the new shape.")

    def extra_repr(self) -> str:
        return (f"stage_index={self.stage_index}, num_stages={self.num_stages}, num_chunks={self.num_chunks}, "
                f"split_points={self.split_points}")


def prepare_pippy(model: nn.Module, split_points: str | Sequence[str] = "auto",
                  no_split_module_classes: Iterable[str] | None = None, example_args: tuple[Any, ...] = (),
                  example_kwargs: dict[str, Any] | None = None, num_chunks: int | None = None,
                  gather_output: bool = False) -> PipelinedModel:
    """Split ``model`` into one pipeline stage per process and return this process's stage.

    Args:
        model: the whole model, built on every process (it is traced, then only the stage is kept).
        split_points: ``"auto"`` cuts the model's repeated blocks evenly; otherwise the names of the
            modules (as in ``named_modules()``) each later stage begins with, one fewer than processes.
        no_split_module_classes: class names of the blocks ``"auto"`` cuts between; by default the
            model's ``_no_split_modules`` (transformers models), else the largest ``ModuleList``'s children.
        example_args, example_kwargs: a full batch as the model will be called; tracing needs real
            shapes, and the batch size must divide into ``num_chunks`` micro-batches.
        num_chunks: micro-batches per call; by default the number of processes.
        gather_output: return the output on every process (broadcast from the last), not only the last.

    The model is traced in eval mode (an inference pipeline must not apply dropout), and a
    transformers model's ``use_cache`` is switched off: a key/value cache cannot cross stages.
    """
    state = PartialState()
    num_stages = state.num_processes
    if num_stages < 2 or not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "prepare_pippy splits the model into one stage per process, but this is a single process without "
            f"a torch.distributed process group; {LAUNCH_HINT}.")
    example_kwargs = dict(example_kwargs or {})
    num_chunks = num_stages if num_chunks is None else num_chunks
    microbatch_args, microbatch_kwargs = _first_microbatch(example_args, example_kwargs, num_chunks)

    if split_points == "auto":
        split_points = auto_split_points(model, num_stages, no_split_module_classes)
    else:
        split_points = _checked_split_points(model, split_points, num_stages)

    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False
    model.eval()
    # What torch.distributed.pipelining.pipeline(split_spec=...) does, plus a pass on the traced graph.
    annotate_split_points(model, {name: SplitPoint.BEGINNING for name in split_points})
    pipe = Pipe.from_tracing(model, microbatch_args, microbatch_kwargs or None,
                             split_policy=_inputs_through_first_stage)
    if pipe.num_stages != num_stages:
        raise RuntimeError(
            f"Splitting at {split_points} gave {pipe.num_stages} stages, not {num_stages} (one per process): "
            "each split point must be a module that the forward pass calls, and no two may start the same stage. "
            "Choose modules on the forward path, e.g. the model's transformer layers.")
    stage = pipe.build_stage(state.process_index, device=state.device)
    # The stage keeps the split graph's owner, and through it every stage's submodule: drop the others'
    # so that their weights are freed once the caller lets go of the original model.
    for name, child in list(pipe.split_gm.named_children()):
        if child is not stage.submod:
            setattr(pipe.split_gm, name, nn.Module())
    del pipe
    schedule = ScheduleGPipe(stage, n_microbatches=num_chunks)
    return PipelinedModel(stage.submod, schedule, stage_index=state.process_index, num_stages=num_stages,
                          num_chunks=num_chunks, gather_output=gather_output, split_points=list(split_points),
                          example_inputs=tuple(example_args), example_kwargs=example_kwargs, config=config)


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


def _checked_split_points(model: nn.Module, split_points: Sequence[str], num_stages: int) -> list[str]:
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


def _inputs_through_first_stage(graph_module: fx.GraphModule) -> fx.GraphModule:
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


def _first_microbatch(args: tuple[Any, ...], kwargs: dict[str, Any],
                      num_chunks: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The first of ``num_chunks`` micro-batches of the example: the stages are traced at micro-batch size."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be at least 1, got {num_chunks}.")
    batch_size = find_batch_size((args, kwargs))
    if batch_size is None:
        raise ValueError("prepare_pippy needs example_args (or example_kwargs) holding a batch of tensors: "
                         "the model is traced on it, e.g. example_args=(input_ids,).")
    if batch_size % num_chunks:
        raise ValueError(
            f"The batch size of example_args ({batch_size}) is not divisible by num_chunks ({num_chunks}): each "
            f"micro-batch must have the same size. Use a batch size that is a multiple of {num_chunks}, or pass "
            f"a num_chunks that divides {batch_size}.")
    size = batch_size // num_chunks

    def first(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 0 or tensor.shape[0] != batch_size:
            raise ValueError(f"Every tensor of example_args/example_kwargs must have the batch ({batch_size}) as its "
                             f"first dimension, but one has shape {tuple(tensor.shape)}.")
        return tensor[:size]

    return recursively_apply(first, tuple(args)), recursively_apply(first, kwargs)


def _shapes(data: Any) -> list[tuple[tuple[int, ...], torch.dtype]]:
    found: list[tuple[tuple[int, ...], torch.dtype]] = []
    recursively_apply(lambda tensor: found.append((tuple(tensor.shape), tensor.dtype)), data)
    return found


def _sorted(kwargs: dict[str, Any]) -> dict[str, Any]:
    return dict(sorted(kwargs.items()))


def _describe(shapes: list[tuple[tuple[int, ...], torch.dtype]]) -> str:
    return "[" + ", ".join(f"{shape} {str(dtype).removeprefix('torch.')}" for shape, dtype in shapes) + "]"


class _TensorSpec:
    """Shape and dtype of an output tensor, sent ahead so the other processes can receive it."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype


def _broadcast_from_last_process(output: Any, device: torch.device) -> Any:
    """The last process's output on every process: its structure first, then each tensor."""
    state = PartialState()
    source = state.num_processes - 1
    holder: list[Any] = [recursively_apply(_TensorSpec, output) if state.is_last_process else None]
    dist.broadcast_object_list(holder, src=source)
    if state.is_last_process:
        output = recursively_apply(lambda tensor: tensor.detach().contiguous(), output)
    else:
        output = recursively_apply(lambda spec: torch.empty(spec.shape, dtype=spec.dtype, device=device), holder[0],
                                   test=lambda item: isinstance(item, _TensorSpec))
    tensors: list[torch.Tensor] = []
    recursively_apply(tensors.append, output)
    for tensor in tensors:
        dist.broadcast(tensor, src=source)
    return output

