"""Callbacks: code that runs at the Trainer's events (progress, checkpoints, early stopping, metrics, trackers)."""

from callbacks.base import EVENTS, Callback
from callbacks.bus import CallbackBus
from callbacks.early_stopping import EarlyStopping
from callbacks.lr_monitor import LearningRateMonitor
from callbacks.metrics import Metrics, load_metric
from callbacks.model_checkpoint import ModelCheckpoint
from callbacks.progress_bar import ProgressBar
from callbacks.trackers import (
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
    "TensorBoardTracker", "Tracker", "WandbTracker", "load_metric", "register_tracker",
]
