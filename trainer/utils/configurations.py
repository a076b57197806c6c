"""``DataLoaderConfiguration``, ``ProjectConfiguration`` and ``GradientAccumulationPlugin``: Accelerate's grouped arguments.

Each holds settings the ``Accelerator`` also takes one by one; ``trainer.accelerator_settings``
turns them into those settings. What cannot mean the same here is refused with the reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from trainer.utils.kwargs_handlers import KwargsHandler


@dataclass
class DataLoaderConfiguration:
    """How ``prepare`` shards data loaders.

    Args:
        split_batches: the loader's batch size is the global one, cut among the processes.
        dispatch_batches: process 0 reads each batch and sends every process its slice (see
            ``trainer.data_dispatch``). Unset or False: every process reads its own share, an
            ``IterableDataset`` too (Accelerate dispatches those by default; the same samples reach
            the same processes either way when the data is deterministic).
        even_batches: complete the last round with samples from the start so every process steps
            equally often.
        use_seedable_sampler: shuffle with a seeded sampler. Shuffling here is always seeded (exact
            resume needs it), so True and False both mean that.
        data_seed: the shuffling seed (default: the process's torch seed).
        non_blocking: copy batches to the device with ``non_blocking=True``.
        use_stateful_dataloader: save the loaders' positions in checkpoints; they always are here.
    """

    split_batches: bool = False
    dispatch_batches: bool | None = None
    even_batches: bool = True
    use_seedable_sampler: bool = False
    data_seed: int | None = None
    non_blocking: bool = False
    use_stateful_dataloader: bool = False


@dataclass
class ProjectConfiguration:
    """Where a run writes, and how ``save_state()`` names and prunes checkpoints.

    Args:
        project_dir: the run's folder; checkpoints go to ``project_dir/checkpoints``.
        logging_dir: where trackers write (default: ``project_dir``).
        automatic_checkpoint_naming: ``save_state()`` writes ``checkpoints/checkpoint_<n>`` in
            ``project_dir`` and ignores any folder it is given.
        total_limit: with automatic naming, keep at most this many checkpoints (the oldest go).
        iteration: the number of the next automatically named checkpoint.
        save_on_each_node: accepted for files written for Accelerate; checkpoints are written once,
            by the processes that hold the state, on a filesystem all of them see.
    """

    project_dir: str | os.PathLike | None = None
    logging_dir: str | os.PathLike | None = None
    automatic_checkpoint_naming: bool = False
    total_limit: int | None = None
    iteration: int = 0
    save_on_each_node: bool = False

    def __post_init__(self) -> None:
        if self.logging_dir is None:
            self.logging_dir = self.project_dir
        if self.total_limit is not None and (not isinstance(self.total_limit, int) or self.total_limit < 1):
            raise ValueError(f"ProjectConfiguration(total_limit={self.total_limit!r}): keep at least one checkpoint, "
                             "or pass None to keep them all.")

    def set_directories(self, project_dir: str | os.PathLike | None = None) -> None:
        """Set ``project_dir`` (and ``logging_dir`` when it had none)."""
        self.project_dir = project_dir
        if self.logging_dir is None:
            self.logging_dir = project_dir


@dataclass
class GradientAccumulationPlugin(KwargsHandler):
    """Gradient accumulation: ``num_steps`` micro-batches per optimizer step.

    Args:
        num_steps: micro-batches per optimizer step.
        adjust_scheduler: on a micro-step that does not step the optimizer, a prepared scheduler's
            ``step()`` only counts the call (as Accelerate does), so its warnings stay quiet.
        sync_with_dataloader: the end of a data loader ends an accumulation group.
        sync_each_batch: synchronise gradients on every micro-batch (less memory, more communication).
    """

    num_steps: int | None = None
    adjust_scheduler: bool = True
    sync_with_dataloader: bool = True
    sync_each_batch: bool = False

    def policy_arguments(self) -> dict[str, Any]:
        """``GradientAccumulation``'s arguments."""
        if self.num_steps is None:
            raise ValueError("GradientAccumulationPlugin needs num_steps (the micro-batches per optimizer step).")
        return {"steps": self.num_steps, "sync_with_dataloader": self.sync_with_dataloader,
                "sync_each_batch": self.sync_each_batch, "adjust_scheduler": self.adjust_scheduler}
