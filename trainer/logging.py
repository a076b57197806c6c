"""``get_logger``: a logger that logs on the main process only, or on every process in turn.

``trainer.logging`` is Accelerate's ``accelerate.logging``. Messages start with ``[RANK i]``, the
process index. Each call takes two more keyword arguments: ``main_process_only`` (default True: the
other processes stay quiet) and ``in_order`` (every process logs, one after another by rank;
``main_process_only`` is then ignored).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from trainer.state import PartialState

LOG_LEVEL_ENV = "TRAINER_LOG_LEVEL"  # the level of loggers made without log_level=


class MultiProcessAdapter(logging.LoggerAdapter):
    """A logger adapter that knows which process it runs on (made by ``get_logger``)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        """Prefix the message with ``[RANK i]`` (this process's index), as Accelerate's adapter does."""
        msg, kwargs = super().process(msg, kwargs)
        return f"[RANK {PartialState().process_index}] {msg}", kwargs

    @staticmethod
    def _should_log(main_process_only: bool) -> bool:
        state = PartialState()
        return not main_process_only or state.is_main_process

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log ``msg`` at ``level`` on the main process (``main_process_only=True``) or on every process."""
        if not PartialState._shared_state:
            raise RuntimeError("get_logger()'s logger needs the process layout: create PartialState() or Accelerator() "
                               "before logging with it.")
        main_process_only = kwargs.pop("main_process_only", True)
        in_order = kwargs.pop("in_order", False)
        kwargs.setdefault("stacklevel", 2)
        if not self.isEnabledFor(level):
            return
        msg, kwargs = self.process(msg, kwargs)
        if not in_order and self._should_log(main_process_only):
            self.logger.log(level, msg, *args, **kwargs)
            return
        if in_order:  # every process, one after another (main_process_only does not apply)
            state = PartialState()
            for rank in range(state.num_processes):
                if rank == state.process_index:
                    self.logger.log(level, msg, *args, **kwargs)
                state.wait_for_everyone()

    @functools.lru_cache(None)  # noqa: B019 - once per adapter and message, as warnings.warn does
    def warning_once(self, *args: Any, **kwargs: Any) -> None:
        """``warning``, the first time this message is logged only."""
        self.warning(*args, **kwargs)


def get_logger(name: str, log_level: str | int | None = None) -> MultiProcessAdapter:
    """The logger ``name`` (usually ``__name__``), at ``log_level`` (default: ``TRAINER_LOG_LEVEL``, if set)."""
    logger = logging.getLogger(name)
    level = log_level if log_level is not None else os.environ.get(LOG_LEVEL_ENV)
    if level is not None:
        logger.setLevel(level.upper() if isinstance(level, str) else level)
        logger.root.setLevel(level.upper() if isinstance(level, str) else level)
    return MultiProcessAdapter(logger, {})
