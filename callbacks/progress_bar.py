"""ProgressBar: a tqdm bar for training and a nested one for validation, on the main process only.

Where stderr is not a terminal (a batch job's log), it prints plain lines instead: one every
``line_every_n_steps`` optimizer steps and one at each epoch's end, with the step, the loss,
the learning rate and the speed.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .base import Callback

if TYPE_CHECKING:
    from .protocols import TrainerView

MIN_REFRESH_SECONDS = 0.1  # the bar is redrawn at most this often, however short the steps


class ProgressBar(Callback):
    """Shows batches per epoch with the loss, the learning rate and it/s.

    Args:
        refresh_every_n_steps: how often (in optimizer steps, and at most ten times a second) the
            bar, the loss and the lr shown are updated.
        enabled: ``None`` (default) shows bars only when stderr is a terminal, so logs of batch
            jobs stay free of carriage-return noise (they get plain lines); ``True``/``False`` force it.
        line_every_n_steps: without a terminal, a line every this many optimizer steps (and one at
            each epoch's end); ``None``: epoch ends only.
    """

    def __init__(self, refresh_every_n_steps: int = 10, enabled: bool | None = None,
                 line_every_n_steps: int | None = 100) -> None:
        for name, value in (("refresh_every_n_steps", refresh_every_n_steps), ("line_every_n_steps", line_every_n_steps)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"ProgressBar({name}={value!r}): use a whole number >= 1.")
        self.refresh_every_n_steps = refresh_every_n_steps
        self.enabled = enabled
        self.line_every_n_steps = line_every_n_steps
        self._since: tuple[float, int] = (time.monotonic(), 0)  # when the last line was printed, and the step
        self.train_bar: Any = None
        self.val_bar: Any = None
        self._postfix: dict[str, str] = {}
        self._pending = 0  # batches done but not yet shown
        self._next_refresh = 0.0  # time.monotonic() before which the bar is not redrawn

    def _show(self, trainer: TrainerView) -> bool:
        wanted = sys.stderr.isatty() if self.enabled is None else self.enabled
        return bool(wanted and trainer.is_main_process)

    def _lines(self, trainer: TrainerView) -> bool:
        """Plain lines instead of bars: no terminal, and not switched off."""
        return self.enabled is None and trainer.is_main_process and not sys.stderr.isatty()

    def _line(self, trainer: TrainerView, what: str, extra: dict[str, float] | None = None) -> None:
        now, step = time.monotonic(), trainer.global_step
        started, first = self._since
        parts = [what, f"step {step}"]
        if "train_loss" in trainer.metrics:
            parts.append(f"loss {trainer.metrics['train_loss']:.4f}")
        parts.append(f"lr {trainer.optimizer.param_groups[0]['lr']:.2e}")
        if step > first and now > started:
            parts.append(f"{(step - first) / (now - started):.2f} steps/s")
        parts += [f"{name} {value:.4f}" for name, value in (extra or {}).items()]
        print(" | ".join(parts), file=sys.stderr, flush=True)
        self._since = (now, step)

    def on_fit_start(self, trainer: TrainerView) -> None:
        """Start the clock of the plain lines' speed; open the bar of an epoch that a resumed fit continues."""
        self._since = (time.monotonic(), trainer.global_step)
        if trainer.progress.batch_in_epoch:  # resumed inside an epoch: its on_train_epoch_start has run before
            self._open_train_bar(trainer)

    def _open_train_bar(self, trainer: TrainerView) -> None:
        self._pending = 0
        loader = trainer.train_loader
        total = len(loader) if hasattr(loader, "__len__") else None
        self.train_bar = tqdm(total=total, initial=trainer.progress.batch_in_epoch, desc=f"epoch {trainer.current_epoch}",
                              disable=not self._show(trainer), dynamic_ncols=True, leave=True, file=sys.stderr)

    def on_train_epoch_start(self, trainer: TrainerView) -> None:
        self._open_train_bar(trainer)

    def on_train_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Most batches are only counted: the bar advances in bulk at refresh steps (tqdm's
        # bookkeeping on every batch would cost more than a short training step can spare).
        self._pending += 1
        step, every = trainer.progress.global_step, self.line_every_n_steps
        if step % self.refresh_every_n_steps and (every is None or step % every):
            return
        if not trainer.accelerator.sync_gradients:  # inside an accumulation group: the step is not done
            return
        if every is not None and step % every == 0 and self._lines(trainer):
            self._line(trainer, f"epoch {trainer.current_epoch}")
        if step % self.refresh_every_n_steps or (now := time.monotonic()) < self._next_refresh:
            return
        self._next_refresh = now + MIN_REFRESH_SECONDS
        bar = self.train_bar
        bar.update(self._pending)
        self._pending = 0
        if bar.disable:
            return
        if "train_loss" in trainer.metrics:
            self._postfix["loss"] = f"{trainer.metrics['train_loss']:.4f}"
        self._postfix["lr"] = f"{trainer.optimizer.param_groups[0]['lr']:.2e}"
        bar.set_postfix(self._postfix, refresh=False)

    def _flush(self) -> None:
        if self.train_bar is not None and self._pending:
            self.train_bar.update(self._pending)
        self._pending = 0

    def on_validation_start(self, trainer: TrainerView) -> None:
        self._flush()
        loader = trainer.eval_loader
        total = len(loader) if loader is not None and hasattr(loader, "__len__") else None
        nested = self.train_bar is not None and not self.train_bar.disable
        self.val_bar = tqdm(total=total, desc="validating", leave=False, position=1 if nested else 0,
                            disable=not self._show(trainer), dynamic_ncols=True, file=sys.stderr)

    def on_validation_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.val_bar is not None:
            self.val_bar.update(1)

    def on_validation_end(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        if self.val_bar is not None:
            self.val_bar.close()  # leave=False: the nested bar leaves no line behind
            self.val_bar = None
        if self.train_bar is not None and not self.train_bar.disable and metrics:
            self._postfix.update({name: f"{value:.4f}" for name, value in metrics.items()})
            self.train_bar.set_postfix(self._postfix)

    def on_train_epoch_end(self, trainer: TrainerView) -> None:
        self._close()
        if self._lines(trainer):
            validated = {name: value for name, value in trainer.metrics.items() if name.startswith("val_")}
            self._line(trainer, f"epoch {trainer.current_epoch} done", validated)

    def on_fit_end(self, trainer: TrainerView) -> None:
        self._close()

    def on_exception(self, trainer: TrainerView, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        self._flush()
        for bar in (self.val_bar, self.train_bar):
            if bar is not None:
                bar.close()
        self.train_bar = self.val_bar = None
