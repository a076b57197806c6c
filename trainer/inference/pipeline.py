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

from collections.abc import Iterable, Sequence
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import ScheduleGPipe

from trainer.operations import send_to_device
from trainer.state import PartialState
from trainer.strategies.pipeline_split import (
    StagePosition,
    auto_split_points,
    broadcast_output,
    build_stage,
    describe,
    first_microbatch,
    shapes,
    sorted_kwargs,
)

__all__ = ["PipelinedModel", "auto_split_points", "prepare_pippy"]

LAUNCH_HINT = "run the script with `trainer launch --num_processes 2 script.py` (one process per stage)"


class PipelinedModel(StagePosition, nn.Module):
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
        self._expected = shapes((example_inputs, sorted_kwargs(example_kwargs)))
        self._expected_keys = sorted(example_kwargs)

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
            state = PartialState()
            output = broadcast_output(output, state.num_processes - 1, None, device, state.is_last_process)
        return output

    def _check_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if sorted(kwargs) != self._expected_keys:
            raise ValueError(
                f"prepare_pippy traced the model with keyword arguments {self._expected_keys}, but it was called "
                f"with {sorted(kwargs)}. Call it with the same arguments as example_args/example_kwargs, or "
                "prepare it again with example inputs of the call you make.")
        got = shapes((args, sorted_kwargs(kwargs)))
        if got != self._expected:
            raise ValueError(
                f"prepare_pippy traced the model for inputs of shapes {describe(self._expected)}, but it was called "
                f"with {describe(got)}. The stages exchange buffers of the traced size, so every call needs the "
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
    microbatch_args, microbatch_kwargs = first_microbatch(example_args, example_kwargs, num_chunks)

    model.eval()  # an inference pipeline must not apply dropout
    stage, split_points = build_stage(model, split_points, num_stages, state.process_index,
                                      (microbatch_args, microbatch_kwargs), state.device,
                                      no_split_module_classes=no_split_module_classes)
    config = getattr(model, "config", None)
    schedule = ScheduleGPipe(stage, n_microbatches=num_chunks)
    return PipelinedModel(stage.submod, schedule, stage_index=state.process_index, num_stages=num_stages,
                          num_chunks=num_chunks, gather_output=gather_output, split_points=list(split_points),
                          example_inputs=tuple(example_args), example_kwargs=example_kwargs, config=config)

