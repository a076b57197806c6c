"""Callbacks: code that runs at the Trainer's events (logging, checkpointing, early stopping)."""

from callbacks.base import EVENTS, Callback

__all__ = ["EVENTS", "Callback"]
