"""Strategies: where the computation is placed and how processes stay in step.

Also importable as ``trainer.strategies`` (the same modules), which a ``strategies.py`` of your
own cannot shadow.
"""

from .base import Strategy
from .ddp import DDP
from .deepspeed import ConfigOptimizer, DeepSpeed
from .fsdp import FSDP
from .megatron import Megatron
from .registry import available_strategies, register_strategy, resolve_strategy
from .single_device import SingleDevice
from .spec import Option, Package, StrategySpec
from .xla import XLA

__all__ = ["DDP", "FSDP", "XLA", "ConfigOptimizer", "DeepSpeed", "Megatron", "Option", "Package", "SingleDevice", "Strategy",
           "StrategySpec", "available_strategies", "register_strategy", "resolve_strategy"]
