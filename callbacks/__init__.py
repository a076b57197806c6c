"""Callbacks: code that runs at the Trainer's events (progress, checkpoints, early stopping, metrics, trackers)."""

from .base import EVENTS, Callback
from .batch_size_finder import BatchSizeFinder
from .bus import CallbackBus
from .device_stats import DeviceStatsMonitor
from .early_stopping import EarlyStopping
from .ema import EMA
from .lr_finder import LearningRateFinder, LRFinderResult
from .lr_monitor import LearningRateMonitor
from .metrics import Metrics, load_metric
from .model_checkpoint import ModelCheckpoint
from .model_summary import ModelSummary
from .profiler import Profiler
from .progress_bar import ProgressBar
from .swa import StochasticWeightAveraging
from .throughput import ThroughputMonitor
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
    "BatchSizeFinder", "LRFinderResult", "LearningRateFinder",
    "EMA", "DeviceStatsMonitor", "ModelSummary", "Profiler", "StochasticWeightAveraging", "ThroughputMonitor",
    "EVENTS", "AimTracker", "CSVTracker", "Callback", "CallbackBus", "ClearMLTracker", "CometMLTracker", "DVCLiveTracker",
    "EarlyStopping", "LearningRateMonitor", "MLflowTracker", "Metrics", "ModelCheckpoint", "ProgressBar",
    "TensorBoardTracker", "Timer", "Tracker", "WandbTracker", "load_metric", "register_tracker",
]
