"""EMA: an exponential moving average of the weights, used for validation and saved in checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .base import Callback
from .model_summary import bare_model

if TYPE_CHECKING:
    from .protocols import TrainerView


def averaged_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What an average covers: every parameter and floating-point buffer of ``model``, by state-dict name."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    tensors.update({name: b for name, b in model.named_buffers() if b.is_floating_point()})
    return tensors


def refuse_sharded(model: nn.Module, who: str) -> None:
    """One error if ``model``'s weights are sharded over processes (an average of one shard would be saved)."""
    for name, parameter in model.named_parameters():
        if hasattr(parameter, "to_local") or hasattr(parameter, "ds_tensor"):
            raise ValueError(
                f"{who} keeps a full copy of the weights, and the weights of this model are sharded over processes "
                f"({name} is a shard: FSDP or DeepSpeed ZeRO-3). Train with strategy='ddp' or a single device, "
                f"or leave {who} out.")


class EMA(Callback):
    """Keep an exponential moving average of the weights: ``average = decay * average + (1 - decay) * weights``.

    The average covers every parameter and floating-point buffer (BatchNorm statistics too),
    in their own dtype and on their device. It starts as a copy of the weights at the first
    update, after optimizer step ``start_step + 1``, and is updated after every
    ``every_n_steps``-th optimizer step (with ``torch._foreach_lerp_``, as
    ``torch.optim.swa_utils.get_ema_multi_avg_fn`` does).

    Args:
        decay: the weight of the old average at each update, between 0 and 1 (exclusive).
        every_n_steps: update after every n-th optimizer step.
        start_step: optimizer steps to take before the first update.
        use_for_validation: validate with the averaged weights (swapped into the model for the
            validation, then back); the metrics, and a ``ModelCheckpoint(monitor=...)``'s choice, are
            then the average's.
        apply_at_end: copy the average into the model when ``fit`` ends.

    The average is saved in every checkpoint (the callback's state) and restored on resume, so a
    resumed run ends with the same average as one never stopped. ``averaged_state_dict()`` gives
    it as a state dict of the model; ``copy_to(module)`` loads it into a module.

    It runs before the other callbacks at each event (like callbacks that compute metrics): a
    checkpoint written by any callback after a step holds that step's update, and a callback
    that saves at the end of a validation finds the model's own weights back in place.
    """

    computes_metrics = True  # first at every event: see the class docstring

    def __init__(self, decay: float = 0.999, every_n_steps: int = 1, start_step: int = 0,
                 use_for_validation: bool = True, apply_at_end: bool = False) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 < decay < 1:
            raise ValueError(f"EMA(decay={decay!r}): use a number between 0 and 1 (exclusive), such as 0.999.")
        for name, value, least in (("every_n_steps", every_n_steps, 1), ("start_step", start_step, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"EMA({name}={value!r}): use a whole number >= {least}.")
        for name, flag in (("use_for_validation", use_for_validation), ("apply_at_end", apply_at_end)):
            if not isinstance(flag, bool):
                raise ValueError(f"EMA({name}={flag!r}): use True or False.")
        self.decay, self.every_n_steps, self.start_step = float(decay), every_n_steps, start_step
        self.use_for_validation, self.apply_at_end = use_for_validation, apply_at_end
        self.num_updates = 0
        self._model: nn.Module | None = None
        self._names: list[str] = []
        self._sources: list[torch.Tensor] = []  # the model's tensors, in _names order
        self._average: list[torch.Tensor] | None = None
        self._loaded: dict[str, torch.Tensor] | None = None  # from a checkpoint, until the model is known
        self._backup: list[torch.Tensor] | None = None  # the model's own weights while the average is swapped in

    def handles(self, event: str) -> bool:
        """Validation events only when ``use_for_validation``; ``on_fit_end`` only with ``apply_at_end``."""
        if event in ("on_validation_start", "on_validation_end"):
            return self.use_for_validation
        if event == "on_fit_end":
            return self.apply_at_end
        return True

    def check_fit(self, trainer: TrainerView) -> None:
        """Refuse a model whose weights are sharded over processes (FSDP, ZeRO-3)."""
        refuse_sharded(bare_model(trainer), "EMA")

    # -- events -------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: TrainerView) -> None:
        """``fit`` begins (after a resume's checkpoint is loaded): find the model's tensors and put a
        restored average on their devices."""
        self._bind(bare_model(trainer))

    def on_train_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After an optimizer step that is due (past ``start_step``, every ``every_n_steps``): update the average.

        A step that did not change the weights (fp16 overflow, a non-finite step skipped) is not counted.
        """
        step, accelerator = trainer.global_step, trainer.accelerator
        if (accelerator.sync_gradients and step > self.start_step and step % self.every_n_steps == 0
                and not accelerator.optimizer_step_was_skipped):
            self.update()

    def on_validation_start(self, trainer: TrainerView) -> None:
        """Validation begins: swap the average into the model (when there is one)."""
        self._restore()  # a validation that failed outside fit may have left the average in
        if self._average is not None and self._model is bare_model(trainer):
            self._backup = [t.detach().clone() for t in self._sources]
            with torch.no_grad():
                torch._foreach_copy_(self._sources, self._average)

    def on_validation_end(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        """Validation ended: put the model's own weights back."""
        self._restore()

    def on_exception(self, trainer: TrainerView, exception: BaseException) -> None:
        """``fit`` is failing: put the model's own weights back if a validation had swapped the average in."""
        self._restore()

    def on_fit_end(self, trainer: TrainerView) -> None:
        """``fit`` finished, with ``apply_at_end``: copy the average into the model."""
        if self._average is not None:
            self.copy_to()

    # -- the average --------------------------------------------------------------------------------
    def update(self) -> None:
        """Fold the model's current weights into the average (the first update copies them)."""
        if self._model is None:
            raise RuntimeError("EMA.update() needs the model: it is found when fit begins.")
        with torch.no_grad():
            sources = [t.detach() for t in self._sources]
            if self._average is None:
                self._average = [t.clone() for t in sources]
            else:
                torch._foreach_lerp_(self._average, sources, 1.0 - self.decay)
        self.num_updates += 1

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict with the averaged tensors in place of the weights (integer buffers as they are).

        The values are the average's own tensors, which later updates change: clone them to keep a snapshot.
        """
        if self._model is None or self._average is None:
            raise RuntimeError(f"EMA has no average yet: the first update comes after optimizer step "
                               f"{self.start_step + 1} of fit.")
        averaged = dict(zip(self._names, self._average))
        return {name: averaged.get(name, value) for name, value in self._model.state_dict().items()}

    def copy_to(self, module: nn.Module | None = None) -> None:
        """Load the average into ``module`` (default: the model trained), a module with the same weights' names."""
        state = self.averaged_state_dict()
        target = module if module is not None else self._model
        assert target is not None
        target.load_state_dict(state)

    def _bind(self, model: nn.Module) -> None:
        if model is not self._model:
            tensors = averaged_tensors(model)
            if self._average is not None and self._model is not None:  # a new model: keep the average as loaded state
                self._loaded = dict(zip(self._names, (t.cpu() for t in self._average)))
                self._average = None
            self._model, self._names, self._sources = model, list(tensors), list(tensors.values())
        if self._loaded is not None:
            loaded, self._loaded = self._loaded, None
            missing = [name for name in self._names if name not in loaded]
            extra = [name for name in loaded if name not in self._sources_by_name()]
            if missing or extra:
                raise ValueError(f"The checkpoint's EMA average does not match this model: it lacks {missing[:5]} and "
                                 f"has {extra[:5]} besides. Resume with the model the checkpoint was trained with.")
            self._average = [loaded[name].to(device=t.device, dtype=t.dtype) for name, t in
                             zip(self._names, self._sources)]

    def _sources_by_name(self) -> dict[str, torch.Tensor]:
        return dict(zip(self._names, self._sources))

    def _restore(self) -> None:
        if self._backup is not None:
            backup, self._backup = self._backup, None
            with torch.no_grad():
                torch._foreach_copy_(self._sources, backup)

    # -- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The average (tensors by name) and the number of updates, saved in every checkpoint."""
        average = None if self._average is None else dict(zip(self._names, self._average))
        if average is None and self._loaded is not None:
            average = self._loaded
        return {"num_updates": self.num_updates, "average": average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the average back from a checkpoint; it moves to the model's devices when ``fit`` begins."""
        self.num_updates = int(state.get("num_updates", 0))
        average = state.get("average")
        self._loaded = dict(average) if average is not None else None
        self._average = None
        if self._model is not None and self._loaded is not None:
            self._bind(self._model)
