"""``DummyOptim``: stands for the optimizer a DeepSpeed config describes (Accelerate's name and signature)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from trainer.strategies import ConfigOptimizer


class DummyOptim(ConfigOptimizer):
    """Prepare it in place of an optimizer when the DeepSpeed config has an ``optimizer`` section.

    ``lr`` and ``weight_decay`` (and ``betas``/``eps`` among ``kwargs``) fill the config's ``"auto"`` values.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.001, weight_decay: float = 0, **kwargs: Any) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, **kwargs)
        self.lr, self.weight_decay, self.kwargs = lr, weight_decay, kwargs
