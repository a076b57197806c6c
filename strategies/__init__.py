"""Strategies: where the computation is placed and how processes stay in step."""

from .base import Strategy
from .ddp import DDP
from .deepspeed import ConfigOptimizer, DeepSpeed
from .fsdp import FSDP
from .megatron import Megatron
from .registry import available_strategies, resolve_strategy
from .single_device import SingleDevice
from .xla import XLA

__all__ = ["DDP", "FSDP", "ConfigOptimizer", "DeepSpeed", "Megatron", "SingleDevice", "Strategy", "XLA", "available_strategies",
           "resolve_strategy"]
