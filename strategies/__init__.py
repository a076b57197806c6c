"""Strategies: where the computation is placed and how processes stay in step."""

from strategies.base import Strategy
from strategies.ddp import DDP
from strategies.deepspeed import ConfigOptimizer, DeepSpeed
from strategies.fsdp import FSDP
from strategies.registry import available_strategies, resolve_strategy
from strategies.single_device import SingleDevice

__all__ = ["DDP", "FSDP", "ConfigOptimizer", "DeepSpeed", "SingleDevice", "Strategy", "available_strategies",
           "resolve_strategy"]
