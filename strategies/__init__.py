"""Strategies: where the computation is placed and how processes stay in step."""

from strategies.base import Strategy
from strategies.registry import available_strategies, resolve_strategy
from strategies.single_device import SingleDevice

__all__ = ["SingleDevice", "Strategy", "available_strategies", "resolve_strategy"]
