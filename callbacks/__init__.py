"""Callbacks: code that runs at the Trainer's events (progress, checkpoints, early stopping, metrics, trackers)."""

from .base import EVENTS, Callback
from .bus import CallbackBus
from .early_stopping import EarlyStopping
from .lr_monitor import LearningRateMonitor
from .metrics import Metrics, load_metric
from .model_checkpoint import ModelCheckpoint
from .progress_bar import ProgressBar
from .timer import Timer
from .trackers import (
    AimTracker,
    ClearMLTracker,
    CometMLTracker,
    CSVTracker,
    DVCLiveTracker,
    MLflowTracker,
    TensorBoardTracker,
    Tracker,
    WandbTracker,
    register_tracker,
)

__all__ = [
    "EVENTS", "AimTracker", "CSVTracker", "Callback", "CallbackBus", "ClearMLTracker", "CometMLTracker", "DVCLiveTracker",
    "EarlyStopping", "LearningRateMonitor", "MLflowTracker", "Metrics", "ModelCheckpoint", "ProgressBar",
    "TensorBoardTracker", "Timer", "Tracker", "WandbTracker", "load_metric", "register_tracker",
]
