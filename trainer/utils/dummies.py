"""``DummyOptim`` and ``DummyScheduler``: stand for what a DeepSpeed config describes (Accelerate's names)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from trainer.strategies import ConfigOptimizer
from trainer.strategies.deepspeed_config import ConfigScheduler


class DummyOptim(ConfigOptimizer):
    """Prepare it in place of an optimizer when the DeepSpeed config has an ``optimizer`` section.

    ``lr`` and ``weight_decay`` (and ``betas``/``eps`` among ``kwargs``) fill the config's ``"auto"`` values.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.001, weight_decay: float = 0, **kwargs: Any) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, **kwargs)
        self.lr, self.weight_decay, self.kwargs = lr, weight_decay, kwargs


class DummyScheduler(ConfigScheduler):
    """Prepare it in place of an LR scheduler when the DeepSpeed config has a ``scheduler`` section.

    ``total_num_steps`` and ``warmup_num_steps`` fill the section's ``"auto"`` values; the engine
    steps the real scheduler. ``lr_scheduler_callable(optimizer)`` builds one instead.
    """

    def __init__(self, optimizer: Any, total_num_steps: int | None = None, warmup_num_steps: int = 0,
                 lr_scheduler_callable: Any = None, **kwargs: Any) -> None:
        super().__init__(optimizer, total_num_steps, warmup_num_steps, lr_scheduler_callable, **kwargs)
