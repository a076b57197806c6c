"""ModelCheckpoint: save the training state every n steps or epochs, or when a metric improves."""

from __future__ import annotations

import difflib
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .base import Callback

if TYPE_CHECKING:
    from .protocols import TrainerView

MODES = ("min", "max")


def metric_or_error(metrics: dict[str, float], name: str, who: str) -> float:
    """``metrics[name]``, or one error naming the metrics there are (and the closest one)."""
    if name in metrics:
        return float(metrics[name])
    close = difflib.get_close_matches(name, list(metrics), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise KeyError(f"{who} monitors {name!r}, which validation did not produce.{hint} Available: {sorted(metrics)}.")


class ModelCheckpoint(Callback):
    """Write full training checkpoints (model, optimizer, scheduler, loop position, RNG, callbacks).

    Args:
        dirpath: where checkpoints go; default ``trainer.output_dir / "checkpoints"``.
        every_n_steps: save after every n optimizer steps.
        every_n_epochs: save at the end of every n epochs (the default when nothing else is asked).
        monitor: save after each validation, ranking checkpoints by this metric.
        mode: ``"min"`` or ``"max"``: which direction of ``monitor`` is better.
        save_top_k: how many to keep (the best by ``monitor``, else the most recent); -1 keeps all.
        save_last: always keep the most recent checkpoint too, so that ``fit(resume="latest")``
            continues from where training stopped rather than from the best point.
        async_save: copy the state and let a background thread write it while training goes on.
            The next save, the end of ``fit`` and a stop on a signal wait for it; ``latest`` moves,
            and checkpoints that retention drops are deleted, once the new one is in place.
    """

    checkpoints = True

    def __init__(self, dirpath: str | Path | None = None, every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, monitor: str | None = None, mode: str = "min",
                 save_top_k: int = 1, save_last: bool = True, async_save: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"ModelCheckpoint(mode={mode!r}): use 'min' or 'max'.")
        if not isinstance(save_top_k, int) or save_top_k < -1:
            raise ValueError(f"ModelCheckpoint(save_top_k={save_top_k!r}): use a whole number >= 0, or -1 for all.")
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"ModelCheckpoint({name}={value!r}): use a whole number >= 1, or None.")
        if every_n_steps is None and every_n_epochs is None and monitor is None:
            every_n_epochs = 1
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self.every_n_steps, self.every_n_epochs = every_n_steps, every_n_epochs
        self.monitor, self.mode = monitor, mode
        self.save_top_k, self.save_last, self.async_save = save_top_k, save_last, async_save
        self.saved: list[dict[str, Any]] = []  # {"name", "step", "score"}, oldest first
        self._root: Path | None = self.dirpath  # where the checkpoints are (known once the Trainer is seen)

    @property
    def state_key(self) -> str:
        """Unique per configuration, so several ModelCheckpoints keep their records apart."""
        where = "" if self.dirpath is None else f", dirpath={self.dirpath}"
        return (f"ModelCheckpoint[monitor={self.monitor}, every_n_steps={self.every_n_steps}, "
                f"every_n_epochs={self.every_n_epochs}{where}]")

    @property
    def best(self) -> dict[str, Any] | None:
        """The saved checkpoint with the best ``monitor`` value (among those whose weights are finite)."""
        scored = [r for r in self.saved if r["score"] is not None and r.get("finite", True)]
        return min(scored, key=self._rank) if scored else None

    @property
    def best_model_path(self) -> str:
        """The folder of the best checkpoint (by ``monitor``), or ``""`` while there is none."""
        best = self.best
        return str(self._root / best["name"]) if best is not None and self._root is not None else ""

    def check_fit(self, trainer: TrainerView) -> None:
        if self.monitor is not None and not trainer.validates:
            raise ValueError(
                f"ModelCheckpoint(monitor={self.monitor!r}) can never save: this run does not validate (it has no "
                "eval_data, or eval_every_n_steps and eval_every_n_epochs are both None). Pass eval_data to the "
                "Trainer, or use ModelCheckpoint(every_n_steps=...) / every_n_epochs without monitor."
            )

    def root(self, trainer: TrainerView) -> Path:
        self._root = self.dirpath if self.dirpath is not None else trainer.checkpoint_dir
        return self._root

    # -- when to save -----------------------------------------------------------------------------
    def handles(self, event: str) -> bool:
        needed = {"on_train_batch_end": self.every_n_steps is not None, "on_validation_end": self.monitor is not None,
                  "on_train_epoch_end": self.every_n_epochs is not None}
        return needed.get(event, True)

    def on_train_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None:
        n = self.every_n_steps
        if n is not None and trainer.accelerator.sync_gradients and trainer.global_step % n == 0:
            self.save(trainer)

    def on_validation_end(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        if self.monitor is not None and trainer.fitting:
            self.save(trainer, score=metric_or_error(metrics, self.monitor, "ModelCheckpoint"))

    def on_train_epoch_end(self, trainer: TrainerView) -> None:
        n = self.every_n_epochs
        if n is not None and (trainer.current_epoch + 1) % n == 0:
            self.save(trainer)

    # -- saving and retention -------------------------------------------------------------------------
    def save(self, trainer: TrainerView, score: float | None = None) -> Path:
        """Save now (replacing a checkpoint of the same step), then drop what retention excludes."""
        root = self.root(trainer)
        name = f"epoch={trainer.current_epoch}-step={trainer.global_step}"
        if trainer.accelerator.accumulation.micro_step:  # inside an accumulation group
            name += f"-batch={trainer.progress.batch_in_epoch}"
        previous = next((r for r in self.saved if r["name"] == name), None)
        if previous is not None:
            self.saved.remove(previous)
            if score is None:
                score = previous["score"]
        finite = trainer.weights_are_finite()
        self.saved.append({"name": name, "step": trainer.global_step, "score": score, **({} if finite else {"finite": False})})
        dropped, usable = self._retain()
        main = trainer.is_main_process

        def delete_dropped(path: Path) -> None:  # once the new checkpoint is in place
            if main:
                for dropped_name in dropped:
                    shutil.rmtree(root / dropped_name, ignore_errors=True)
                if dropped and usable is not None:
                    trainer.point_latest_to(root / usable)

        return trainer.save_checkpoint(root / name, point_latest=finite, blocking=not self.async_save,
                                       after_commit=delete_dropped)

    def _rank(self, record: dict[str, Any]) -> float:
        score = record["score"]
        if score is None or math.isnan(score):
            return math.inf
        return score if self.mode == "min" else -score

    def _retain(self) -> tuple[list[str], str | None]:
        """Drop from ``saved`` what retention excludes: (the names dropped, the newest usable one kept)."""
        if self.save_top_k == -1:
            return [], None
        if self.monitor is not None:
            kept = sorted(self.saved, key=self._rank)[: self.save_top_k]
        else:
            kept = self.saved[len(self.saved) - self.save_top_k:] if self.save_top_k else []
        keep = {r["name"] for r in kept}
        if self.save_last and self.saved:
            keep.add(self.saved[-1]["name"])
        finite = [r for r in self.saved if r.get("finite", True)]
        if finite:  # the newest checkpoint with finite weights is never deleted: it is where to resume from
            keep.add(finite[-1]["name"])
        dropped = [r["name"] for r in self.saved if r["name"] not in keep]
        self.saved = [r for r in self.saved if r["name"] in keep]
        usable = [r["name"] for r in self.saved if r.get("finite", True)]
        return dropped, usable[-1] if usable else None

    def state_dict(self) -> dict[str, Any]:
        return {"saved": [dict(r) for r in self.saved]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = [dict(r) for r in state.get("saved", [])]
