"""Pipeline-parallel training: each process of a pipeline group trains one stage of the model.

With ``ParallelismConfig(pp_size=n)`` the model is cut into ``n`` consecutive stages (torch's
pipelining traces it; ``strategies.pipeline_split``). A step no longer has a separate forward and
backward: the batch is cut into micro-batches and a schedule (GPipe: every forward, then every
backward; 1F1B: one forward, one backward, in turn, holding fewer activations) runs both,
passing activations forward and their gradients back between the stages. So the loop calls

    loss = accelerator.forward_backward(model, loss_fn, input_ids, target=labels)

which, on every layout, runs ``loss_fn(model(input_ids), labels)`` and its backward and returns the
loss (here: the mean over the micro-batches, on every process of the pipeline).

The cut needs the shapes of a real micro-batch, so it happens at the first ``forward_backward``
(or an explicit ``model.build(*args)``); until then every process holds the whole model.
Every call must then bring batches of the same shapes (the stages exchange buffers of those
sizes). The stage's parameters keep their names in the whole model, so checkpoints written by
stages are read back by any layout and merged by ``trainer merge-weights``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.strategies.pipeline_split import (
    StagePosition,
    broadcast_output,
    build_stage,
    describe,
    first_microbatch,
    shapes,
    sorted_kwargs,
)


def schedule_class(name: str) -> Any:
    """torch's schedule class for ``name`` (one of ``parallelism.PP_SCHEDULES``, any case)."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    return {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[name.lower()]


class PipelineStages(StagePosition, nn.Module):
    """This process's stage of a model trained in a pipeline, built at the first ``forward_backward``.

    Before it is built, the module holds the whole model (``parameters()`` are all of them);
    afterwards only the stage, sharded over the data-parallel processes by ``shard``.
    Optimizers that ``track`` registered are pointed at the stage's parameters then.
    """

    def __init__(self, model: nn.Module, *, pp_group: Any, num_stages: int, stage_index: int,
                 schedule: str, microbatches: int, split_points: str | Sequence[str],
                 shard: Callable[[nn.Module], nn.Module], device: torch.device,
                 autocast: Callable[[], AbstractContextManager[Any]] = nullcontext) -> None:
        super().__init__()
        # Held outside the registry: the module's children are the model's (later the stage's) own, so
        # parameter names, state dicts and checkpoints are those of the whole model.
        self.__dict__["whole"], self.__dict__["stage_module"] = model, None
        self._adopt(model)
        self.state_keys = list(model.state_dict())  # the whole model's, in its order
        self.pp_group, self.num_stages, self.stage_index = pp_group, num_stages, stage_index
        self.schedule_name, self.microbatches, self.split_points = schedule, microbatches, split_points
        self.config = getattr(model, "config", None)
        self._shard, self._device, self._autocast = shard, device, autocast
        self._optimizers: list[torch.optim.Optimizer] = []
        self._after_build: list[Callable[[], None]] = []
        self._schedule: Any = None
        self._expected: Any = None
        self._loss_fn: Callable[..., torch.Tensor] | None = None
        self._scale: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._losses: list[torch.Tensor] = []
        self._dropout = False

    whole: nn.Module | None
    stage_module: nn.Module | None

    def _adopt(self, module: nn.Module) -> None:
        """Make ``module``'s children, parameters and buffers this module's, under the same names."""
        self._modules.clear()
        self._parameters.clear()
        self._buffers.clear()
        for name, child in module.named_children():
            self._modules[name] = child
        for name, parameter in module.named_parameters(recurse=False):
            self._parameters[name] = parameter
        for name, buffer in module.named_buffers(recurse=False):
            self._buffers[name] = buffer

    @property
    def _last_stage_rank(self) -> int:
        """The global rank of this pipeline's last stage (where the loss and the output are)."""
        return dist.get_global_rank(self.pp_group, self.num_stages - 1)

    @property
    def built(self) -> bool:
        return self.stage_module is not None

    def track(self, optimizer: torch.optim.Optimizer) -> None:
        """Point ``optimizer`` at the stage's parameters once the stage is built (now, if it is)."""
        if self.built:
            raise ValueError("Prepare the optimizer before the first forward_backward: the pipeline stage is already "
                             "built, and the optimizer would hold parameters of the whole model.")
        self._optimizers.append(optimizer)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Evaluate a batch through the stages (forward only, no gradients); the last stage's output comes back
        on every process of the pipeline. Training goes through ``forward_backward`` instead."""
        if torch.is_grad_enabled() and self.training:
            raise RuntimeError(
                "A pipeline-parallel model (pp_size > 1) trains forward and backward together, micro-batch by "
                "micro-batch: call loss = accelerator.forward_backward(model, loss_fn, *inputs, target=labels) instead "
                "of model(...) and accelerator.backward(loss). model(...) evaluates, under torch.no_grad().")
        self.require_built("Evaluating")
        if self._dropout:
            raise RuntimeError(
                "This pipeline stage was traced in training mode with dropout (p > 0), which its graph keeps: evaluating "
                "through it would drop activations. Evaluate the checkpoints on a layout without pp_size, or set the "
                "model's dropout to 0 for pipeline-parallel training.")
        self._check_shapes(args, kwargs)
        self._loss_fn = None
        schedule = self._schedule
        with torch.no_grad(), self._autocast():
            if self.is_first_stage:
                output = schedule.eval(*args, **kwargs)
            elif self.is_last_stage:  # the schedule computes a loss where it has a loss function: one row per sample
                output = schedule.eval(target=torch.zeros(self._expected[0][0][0], device=self._device))
            else:
                output = schedule.eval()
        return broadcast_output(output if self.is_last_stage else None, self._last_stage_rank, self.pp_group,
                                self._device, self.is_last_stage)

    def _check_shapes(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        got = shapes((tuple(args), sorted_kwargs(dict(kwargs))))
        if got != self._expected:
            raise ValueError(
                f"The pipeline stages were built for batches of shapes {describe(self._expected)}, but this batch has "
                f"{describe(got)}: the stages exchange buffers of the first batch's size. Give every step batches of "
                "one shape (drop_last=True, padding to a fixed length).")

    def build(self, *args: Any, **kwargs: Any) -> None:
        """Cut the model at the split points, traced on the first micro-batch of ``args``/``kwargs`` (a whole batch
        as ``forward_backward`` receives it), keep this process's stage and shard it. Collective over every process."""
        if self.built:
            return
        assert self.whole is not None
        self._dropout = self.whole.training and _has_dropout(self.whole)  # traced in training mode: kept in the graph
        microbatch = first_microbatch(tuple(args), dict(kwargs), self.microbatches, source="the batch",
                                      count="ParallelismConfig.pp_microbatches")
        # A precision policy's autocast wrapper is not traced (its context would cut the graph where the stages
        # cannot follow): the stages run inside the autocast instead.
        override = vars(self.whole).pop("forward", None)
        try:
            stage, self.split_points = build_stage(self.whole, self.split_points, self.num_stages, self.stage_index,
                                                   microbatch, self._device, group=self.pp_group)
        finally:
            if override is not None:
                vars(self.whole)["forward"] = override
        before = {name: parameter for name, parameter in stage.submod.named_parameters()}
        stage.submod = self._shard(stage.submod)
        after = dict(stage.submod.named_parameters())
        replaced = {id(old): after[name] for name, old in before.items() if name in after}
        for optimizer in self._optimizers:
            if optimizer.state:
                raise ValueError("The optimizer stepped before the pipeline stage was built: its state could not follow "
                                 "the stage's parameters. Call forward_backward (or model.build) before the first step.")
            for group in optimizer.param_groups:  # this stage's parameters only; the others live on other processes
                group["params"] = [replaced[id(p)] for p in group["params"] if id(p) in replaced]
        self.__dict__["whole"], self.__dict__["stage_module"] = None, stage.submod
        self._adopt(stage.submod)
        known = set(self.state_keys)
        for name, _ in stage.submod.named_buffers():  # tracing registers every buffer; keep the model's own choice
            if name not in known:
                owner, _, leaf = name.rpartition(".")
                stage.submod.get_submodule(owner)._non_persistent_buffers_set.add(leaf)
        self._expected = shapes((tuple(args), sorted_kwargs(dict(kwargs))))
        self._schedule = schedule_class(self.schedule_name)(stage, n_microbatches=self.microbatches,
                                                            loss_fn=self._microbatch_loss, scale_grads=False)
        actions, self._after_build = self._after_build, []
        for action in actions:
            action()

    def _microbatch_loss(self, output: Any, target: Any) -> torch.Tensor:
        if self._loss_fn is None:  # evaluating: the schedule asks for no loss of ours
            return torch.zeros((), device=self._device)
        assert self._scale is not None
        loss = self._loss_fn(output, target)
        self._losses.append(loss.detach())
        # Each micro-batch's loss counts 1/microbatches of the batch's: their gradients add up to the mean's.
        return self._scale(loss) / self.microbatches

    def forward_backward(self, loss_fn: Callable[..., torch.Tensor], args: tuple[Any, ...], kwargs: dict[str, Any],
                         target: Any, scale: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Run the schedule over one batch; return the mean micro-batch loss on every process of the pipeline.

        ``scale`` turns a loss into the one to differentiate (accumulation's division, fp16's scale).
        """
        self.build(*args, **kwargs)
        self._check_shapes(args, kwargs)
        self._loss_fn, self._scale, self._losses = loss_fn, scale, []
        schedule = self._schedule
        with self._autocast():
            if self.is_first_stage:
                schedule.step(*args, **kwargs, return_outputs=False)
            elif self.is_last_stage:
                schedule.step(target=target, return_outputs=False)
            else:
                schedule.step(return_outputs=False)
        loss = torch.stack(self._losses).mean() if self.is_last_stage else torch.zeros((), device=self._device)
        dist.broadcast(loss, src=self._last_stage_rank, group=self.pp_group)
        return loss

    def gather_to_first_stage(self, obj: Any) -> list[Any] | None:
        """Every stage's ``obj``, in stage order, on the pipeline's first process (None elsewhere).
        Collective over the pipeline group."""
        parts: list[Any] | None = [None] * self.num_stages if self.is_first_stage else None
        dist.gather_object(obj, parts, dst=dist.get_global_rank(self.pp_group, 0), group=self.pp_group)
        return parts

    def after_build(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the stage is built (a checkpoint loaded before the first step is read then)."""
        self._after_build.append(action)

    def require_built(self, doing: str) -> None:
        """Raise unless the stage is built (``doing``: what needs it, for the message)."""
        if not self.built:
            raise RuntimeError(
                f"{doing} needs this process's pipeline stage, which is cut from the model at the first forward_backward: "
                "call model.build(*batch) with a batch as forward_backward receives it (or take one step) first.")

    def whole_state_dict(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every stage's ``local`` (whole) tensors, merged on the pipeline's first process in the model's order;
        the other processes get an empty dict. Collective over the pipeline group."""
        if not self.built:
            return local if self.is_first_stage else {}
        parts = self.gather_to_first_stage(local)
        if parts is None:
            return {}
        merged: dict[str, torch.Tensor] = {}
        for part in parts:
            merged.update(part)
        return {name: merged[name] for name in self.state_keys if name in merged}

    def extra_repr(self) -> str:
        return (f"stage_index={self.stage_index}, num_stages={self.num_stages}, schedule={self.schedule_name}, "
                f"microbatches={self.microbatches}, built={self.built}")


def _has_dropout(model: nn.Module) -> bool:
    """Whether ``model`` drops activations in training mode (a dropout module, or a dropout rate attribute, above 0)."""
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        if any("dropout" in key and isinstance(value, float) and value > 0 for key, value in vars(module).items()):
            return True
    return False
