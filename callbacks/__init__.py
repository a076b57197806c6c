"""Callbacks: code that runs at the Trainer's events (progress, checkpoints, early stopping, logging)."""

from callbacks.base import EVENTS, Callback
from callbacks.bus import CallbackBus
from callbacks.early_stopping import EarlyStopping
from callbacks.lr_monitor import LearningRateMonitor
from callbacks.model_checkpoint import ModelCheckpoint
from callbacks.progress_bar import ProgressBar

__all__ = ["EVENTS", "Callback", "CallbackBus", "EarlyStopping", "LearningRateMonitor", "ModelCheckpoint", "ProgressBar"]
