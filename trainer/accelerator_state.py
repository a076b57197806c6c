"""``AcceleratorState`` and ``GradientState``: Accelerate's process-wide views, read from their owners.

Scripts written for Accelerate ask ``AcceleratorState()`` for the mixed precision, the distributed
type and the plugins, and ``GradientState()`` whether this micro-step synchronises gradients. Here
those facts have one owner each (the Accelerator's precision policy, its strategy, its accumulation
policy), so both classes are views: every instance reads the current Accelerator (the last one
created in the process) and holds nothing of its own beyond what was given before one existed.
Both are importable from ``trainer.state``, Accelerate's module path.
"""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Any

from trainer import launch_environment as variables
from trainer.state import PartialState
from trainer.utils.enums import DistributedType, as_distributed_type

if TYPE_CHECKING:
    from trainer.accelerator import Accelerator
    from trainer.accumulation import GradientAccumulation
    from trainer.utils.configurations import GradientAccumulationPlugin

_KEY = "_accelerator"  # where PartialState's shared dict keeps the current Accelerator (cleared with it)


class _Current:
    """Weak references to the process's Accelerators, newest last; pickles as empty (an Accelerator must pickle)."""

    def __init__(self) -> None:
        self.references: list[weakref.ref[Accelerator]] = []

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return _Current, ()

    def add(self, accelerator: Accelerator) -> None:
        self.references = [ref for ref in self.references if ref() is not None] + [weakref.ref(accelerator)]

    def get(self) -> Accelerator | None:
        """The newest Accelerator still alive (an older one again, once a newer one is gone)."""
        for reference in reversed(self.references):
            accelerator = reference()
            if accelerator is not None:
                return accelerator
        return None


def current_accelerator() -> Accelerator | None:
    """The last Accelerator created in this process, or None (none yet, or state reset since)."""
    holder = PartialState._shared_state.get(_KEY)
    return holder.get() if holder is not None else None


class AcceleratorState(PartialState):
    """``PartialState`` plus what the current ``Accelerator`` decided: precision, distributed type, plugins.

    Args:
        mixed_precision: the precision to report before any Accelerator exists (an Accelerator's own
            precision wins once it is created; ``TRAINER_MIXED_PRECISION`` otherwise).
        cpu: as ``PartialState(cpu=)``.
        **kwargs: passed to ``PartialState`` (``backend``, ``timeout``).
    """

    def __init__(self, mixed_precision: str | None = None, cpu: bool = False, **kwargs: Any) -> None:
        super().__init__(cpu=cpu, **kwargs)
        if mixed_precision is not None and current_accelerator() is None:
            self._shared_state["_mixed_precision"] = str(mixed_precision)

    @classmethod
    def attach(cls, accelerator: Accelerator, plugins: dict[str, Any], cpu: bool = False,
               **kwargs: Any) -> AcceleratorState:
        """Make ``accelerator`` the one every ``AcceleratorState()``/``GradientState()`` reads (called by it).

        Returns the state, created with ``cpu`` and ``kwargs`` (``PartialState``'s) if it was not yet.
        """
        state = cls(cpu=cpu, **kwargs)
        cls._shared_state.setdefault(_KEY, _Current()).add(accelerator)
        cls._shared_state["_plugins"] = {name: plugin for name, plugin in plugins.items() if plugin is not None}
        return state

    @property
    def mixed_precision(self) -> str:
        accelerator = current_accelerator()
        if accelerator is not None:
            return accelerator.mixed_precision
        return str(self._shared_state.get("_mixed_precision") or os.environ.get(variables.PRECISION, "no"))

    @property
    def distributed_type(self) -> DistributedType | str:
        """The current Accelerator's (its strategy's), unless a value was assigned (tests of other layouts do)."""
        if "_distributed_type" in self._shared_state:
            return self._shared_state["_distributed_type"]
        accelerator = current_accelerator()
        if accelerator is not None:
            return as_distributed_type(accelerator.strategy.distributed_type)
        return super().distributed_type

    @distributed_type.setter
    def distributed_type(self, value: DistributedType | str) -> None:
        self._shared_state["_distributed_type"] = as_distributed_type(value)

    def _plugin(self, name: str) -> Any:
        return self._shared_state.get("_plugins", {}).get(name)

    @property
    def deepspeed_plugin(self) -> Any:
        """The DeepSpeed plugin in use (None unless the strategy is DeepSpeed); ``.deepspeed_config`` is the engine's."""
        accelerator = current_accelerator()
        if accelerator is None or self.distributed_type != DistributedType.DEEPSPEED:
            return None
        from trainer.utils.plugins import DeepSpeedPlugin

        plugin = self._plugin("deepspeed") or DeepSpeedPlugin()
        plugin.bind(accelerator.strategy)
        return plugin

    @property
    def fsdp_plugin(self) -> Any:
        return self._plugin("fsdp") if self.distributed_type == DistributedType.FSDP else None

    @property
    def megatron_lm_plugin(self) -> Any:
        return self._plugin("megatron_lm") if self.distributed_type == DistributedType.MEGATRON_LM else None

    @property
    def dynamo_plugin(self) -> Any:
        return self._plugin("dynamo")

    torch_tp_plugin = None  # tensor parallelism is a strategy option here, not a plugin
    parallelism_config = None
    use_ipex = False

    @property
    def is_fsdp2(self) -> bool:
        return self.distributed_type == DistributedType.FSDP

    @classmethod
    def _reset_state(cls, reset_partial_state: bool = False, destroy_process_group: bool = False) -> None:  # type: ignore[override]
        """Forget the current Accelerator; with ``reset_partial_state`` the whole process state too."""
        AcceleratorState._resets += 1
        if reset_partial_state:
            PartialState._reset_state(destroy_process_group=destroy_process_group)
            return
        for key in (_KEY, "_plugins", "_mixed_precision", "_distributed_type"):
            cls._shared_state.pop(key, None)

    _resets = 0

    @classmethod
    def generation(cls) -> int:
        """How many times the state was reset (an Accelerator made before a reset cannot prepare after it)."""
        return AcceleratorState._resets

    def __repr__(self) -> str:
        partial = super().__repr__().removeprefix("PartialState(")[:-1]
        return f"AcceleratorState({partial}, distributed_type={self.distributed_type}, mixed_precision={self.mixed_precision!r})"


class GradientState:
    """Whether this micro-step synchronises gradients, and where the active data loader is (a view).

    Every instance reads the current Accelerator's accumulation policy; before one exists it
    answers as a one-step policy would (``sync_gradients`` True, no data loader).

    Args:
        gradient_accumulation_plugin: reported by ``plugin_kwargs`` until an Accelerator exists.
    """

    def __init__(self, gradient_accumulation_plugin: GradientAccumulationPlugin | None = None) -> None:
        self._plugin_kwargs = gradient_accumulation_plugin.to_kwargs() if gradient_accumulation_plugin else {}
        self._bound: GradientAccumulation | None = None

    @classmethod
    def of(cls, policy: GradientAccumulation) -> GradientState:
        """The view of one accumulation policy (``accelerator.gradient_state``), whichever Accelerator is current."""
        state = cls()
        state._bound = policy
        return state

    @property
    def _policy(self) -> GradientAccumulation | None:
        if self._bound is not None:
            return self._bound
        accelerator = current_accelerator()
        return accelerator.accumulation if accelerator is not None else None

    @property
    def initialized(self) -> bool:
        return self._policy is not None

    @property
    def plugin_kwargs(self) -> dict[str, Any]:
        policy = self._policy
        if policy is None:
            return dict(self._plugin_kwargs)
        return {"num_steps": policy.steps, "adjust_scheduler": policy.adjust_scheduler,
                "sync_with_dataloader": policy.sync_with_dataloader, "sync_each_batch": policy.sync_each_batch}

    @property
    def num_steps(self) -> int:
        return int(self.plugin_kwargs.get("num_steps", 1))

    @property
    def adjust_scheduler(self) -> bool:
        return bool(self.plugin_kwargs.get("adjust_scheduler", False))

    @property
    def sync_with_dataloader(self) -> bool:
        return bool(self.plugin_kwargs.get("sync_with_dataloader", True))

    @property
    def sync_each_batch(self) -> bool:
        return bool(self.plugin_kwargs.get("sync_each_batch", False))

    @property
    def sync_gradients(self) -> bool:
        policy = self._policy
        return policy.sync_gradients if policy is not None else True

    @property
    def active_dataloader(self) -> Any:
        policy = self._policy
        return policy.active_dataloader if policy is not None else None

    @property
    def in_dataloader(self) -> bool:
        return self.active_dataloader is not None

    @property
    def end_of_dataloader(self) -> bool:
        policy = self._policy
        return policy.end_of_dataloader if policy is not None else False

    @property
    def remainder(self) -> int:
        """Samples the active loader's last batch repeats to make processes even (-1 outside a loader)."""
        loader = self.active_dataloader
        return int(getattr(loader, "remainder", -1)) if loader is not None else -1

    @staticmethod
    def _reset_state() -> None:
        """Nothing to forget: the state is the current Accelerator's (reset it with ``AcceleratorState``)."""

    def __repr__(self) -> str:
        return (f"Sync Gradients: {self.sync_gradients}\nAt end of current dataloader: {self.end_of_dataloader}\n"
                f"Extra samples added: {self.remainder}\nGradient accumulation plugin: {self.plugin_kwargs}\n")


__all__ = ["AcceleratorState", "GradientState", "current_accelerator"]
