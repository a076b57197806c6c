"""Experiment trackers: one Tracker class per backend, and names that resolve to them."""

from callbacks.trackers.aim_tracker import AimTracker
from callbacks.trackers.base import Tracker, TrackerPackageMissing
from callbacks.trackers.clearml_tracker import ClearMLTracker
from callbacks.trackers.comet_tracker import CometMLTracker
from callbacks.trackers.csv_tracker import CSVTracker
from callbacks.trackers.dvclive_tracker import DVCLiveTracker
from callbacks.trackers.mlflow_tracker import MLflowTracker
from callbacks.trackers.registry import (
    TRACKERS,
    default_trackers,
    installed_trackers,
    make_tracker,
    make_trackers,
    register_tracker,
)
from callbacks.trackers.tensorboard_tracker import TensorBoardTracker
from callbacks.trackers.wandb_tracker import WandbTracker

__all__ = [
    "TRACKERS", "AimTracker", "CSVTracker", "ClearMLTracker", "CometMLTracker", "DVCLiveTracker", "MLflowTracker",
    "TensorBoardTracker", "Tracker", "TrackerPackageMissing", "WandbTracker", "default_trackers", "installed_trackers",
    "make_tracker", "make_trackers", "register_tracker",
]
