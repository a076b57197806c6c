"""BatchSizeFinder: at the start of ``fit``, train with the largest batch size that fits in memory."""

from __future__ import annotations

from collections.abc import Sized
from typing import TYPE_CHECKING, Any, cast

from torch.utils.data import IterableDataset

from .base import Callback

if TYPE_CHECKING:
    from trainer.tuning import TuningView
    from trainer.utils.memory import BatchSizeSearch

    from .protocols import TrainerView

MODES = ("power", "binsearch")


def _whole(name: str, value: Any, least: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"BatchSizeFinder({name}={value!r}): use a whole number >= {least}.")


def resumed(trainer: TrainerView) -> bool:
    """Whether ``fit`` continues a run (a checkpoint was loaded, or an earlier ``fit`` trained)."""
    return trainer.global_step > 0 or trainer.current_epoch > 0 or trainer.progress.batch_in_epoch > 0


class BatchSizeFinder(Callback):
    """Find the largest batch size that trains without running out of memory, and train with it.

    When ``fit`` starts, the training loader is rebuilt with growing batch sizes (from
    ``init_val``), each trained for ``steps_per_trial`` optimizer steps, until one runs out of
    memory. ``mode="power"`` keeps the last size that fit; ``"binsearch"`` then bisects between it
    and the size that failed. Growing stops at ``max_val`` and at the dataset's length; the search
    ends after ``max_trials`` tries. Then the loader is rebuilt with the size found and the model,
    optimizer, scheduler, loss scale, random states and logged metrics are put back exactly as
    they were: the search leaves no trace in the run. The size is printed, logged as
    ``batch_size_finder/batch_size`` and kept in checkpoints, so a resumed run trains with it
    (without searching again).

    The search runs in one process: under several processes, one running out of memory would
    leave the others waiting. It uses the same search and out-of-memory test as
    ``find_executable_batch_size`` (``trainer.utils.memory``).

    Args:
        mode: ``"power"`` (double until out of memory) or ``"binsearch"`` (then bisect).
        steps_per_trial: optimizer steps trained with each batch size.
        init_val: the first batch size tried.
        max_trials: batch sizes tried at most.
        max_val: the largest batch size to try (None: no limit but the dataset's length).
    """

    def __init__(self, mode: str = "power", steps_per_trial: int = 3, init_val: int = 2, max_trials: int = 25,
                 max_val: int | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"BatchSizeFinder(mode={mode!r}): use one of {list(MODES)}.")
        for name, value in (("steps_per_trial", steps_per_trial), ("init_val", init_val), ("max_trials", max_trials)):
            _whole(name, value, 1)
        if max_val is not None and (not isinstance(max_val, int) or isinstance(max_val, bool) or max_val < init_val):
            raise ValueError(f"BatchSizeFinder(max_val={max_val!r}): use a whole number >= init_val ({init_val}), "
                             "or None.")
        self.mode, self.steps_per_trial, self.init_val = mode, steps_per_trial, init_val
        self.max_trials, self.max_val = max_trials, max_val
        self.batch_size: int | None = None  # the size found (or restored from a checkpoint)
        self.search: BatchSizeSearch | None = None  # the last search, with the sizes it tried

    def state_dict(self) -> dict[str, Any]:
        """Called when a checkpoint is written: the batch size found, so a resumed run trains with it."""
        return {"batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called when a checkpoint is loaded: take back the batch size found before."""
        self.batch_size = state.get("batch_size", self.batch_size)

    def check_fit(self, trainer: TrainerView) -> None:
        """Called when ``fit`` begins: refuse a run of several processes (the search runs in one)."""
        processes = trainer.accelerator.num_processes
        if processes > 1:
            raise ValueError(
                f"BatchSizeFinder searches in one process and this run has {processes}: one process running out of "
                "memory would leave the others waiting. Find the batch size in a one-process run (or with "
                "trainer.tuning.scale_batch_size there) and pass it as batch_size.")

    def on_fit_start(self, trainer: TrainerView) -> None:
        """Called when ``fit`` begins, before the first epoch: search and rebuild the training loader.

        A resumed run does not search: it trains with the size its checkpoint holds (or, from a
        checkpoint of a run without this callback, with the trainer's batch size).
        """
        view = cast("TuningView", trainer)
        if resumed(trainer):
            if self.batch_size is not None:
                view.rebuild_train_loader(self.batch_size)
            return
        self.scale_batch_size(view)

    def scale_batch_size(self, trainer: Any) -> int:
        """Search now (``fit`` calls it at its start); return the batch size found, which the loader now has.

        When ``init_val`` itself runs out of memory it is halved until a size fits. When none fits
        (or another error ends the search), the error is raised with the loader and state as before.
        """
        from trainer.tuning import TrainingSnapshot, training_steps
        from trainer.utils.memory import BatchSizeSearch, search_batch_size

        view = cast("TuningView", trainer)
        original = view.train_loader.batch_size
        snapshot = TrainingSnapshot(view)
        view.rebuild_train_loader(self.init_val)  # a training loader that cannot be rebuilt fails here, untouched
        search = self.search = BatchSizeSearch(self.init_val, self.mode, self._largest(view), self.max_trials)

        def attempt(size: int) -> None:
            view.rebuild_train_loader(size)
            steps = training_steps(view)
            try:
                for _ in range(self.steps_per_trial):
                    next(steps)
            except BaseException:
                steps.close()
                snapshot.restore_step_state()  # a step that failed midway leaves gradients and a half group
                raise
            steps.close()

        succeeded = False
        try:
            search_batch_size(search, attempt)
            succeeded = True
        finally:
            view.rebuild_train_loader(search.best if succeeded else original)
            snapshot.restore()
        found = self.batch_size = search.best
        view.log("batch_size_finder/batch_size", found)
        if view.is_main_process:
            print(f"BatchSizeFinder: training with batch size {found} (tried {search.summary()}).", flush=True)
        return found

    def _largest(self, trainer: TuningView) -> int | None:
        """``max_val``, or the dataset's length if smaller: a larger batch would only repeat the dataset's size."""
        dataset = getattr(trainer.train_loader, "dataset", None)
        length = len(dataset) if isinstance(dataset, Sized) and not isinstance(dataset, IterableDataset) else None
        limits = [limit for limit in (self.max_val, length) if limit is not None]
        return min(limits) if limits else None
