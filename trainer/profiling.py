"""``accelerator.profile()``: torch.profiler around a block, one Chrome trace per process."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from trainer.state import PartialState
from trainer.utils.constants import PROFILE_PATTERN_NAME
from trainer.utils.kwargs_handlers import ProfileKwargs


class Profiling:
    """The Accelerator's profiler context (it sets ``profile_handler`` from ``kwargs_handlers``)."""

    profile_handler: ProfileKwargs | None = None

    @contextmanager
    def profile(self, profile_handler: ProfileKwargs | None = None) -> Iterator[Any]:
        """Profile the block with ``torch.profiler``; yields the profiler (call ``prof.step()`` under a schedule).

        ``profile_handler`` overrides the ``ProfileKwargs`` given to the Accelerator. With its
        ``output_trace_dir`` set, each process writes ``profile_<process_index>.json`` there on exit,
        and the processes wait for each other.
        """
        handler = profile_handler or self.profile_handler or ProfileKwargs()
        with handler.build() as profiler:
            yield profiler
        if handler.output_trace_dir is None:
            return
        state = PartialState()
        os.makedirs(handler.output_trace_dir, exist_ok=True)
        profiler.export_chrome_trace(os.path.join(handler.output_trace_dir,
                                                  PROFILE_PATTERN_NAME.format(suffix=state.process_index)))
        state.wait_for_everyone()
