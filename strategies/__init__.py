"""Strategies: where the computation is placed and how processes stay in step."""

from strategies.base import Strategy
from strategies.ddp import DDP
from strategies.deepspeed import ConfigOptimizer, DeepSpeed
from strategies.fsdp import FSDP
from strategies.megatron import Megatron
from strategies.registry import available_strategies, resolve_strategy
from strategies.single_device import SingleDevice
from strategies.xla import XLA

__all__ = ["DDP", "FSDP", "ConfigOptimizer", "DeepSpeed", "Megatron", "SingleDevice", "Strategy", "XLA", "available_strategies",
           "resolve_strategy"]
