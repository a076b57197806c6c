"""Experiment trackers: one Tracker class per backend, and names that resolve to them."""

from .aim_tracker import AimTracker
from .base import Tracker, TrackerPackageMissing
from .clearml_tracker import ClearMLTracker
from .comet_tracker import CometMLTracker
from .csv_tracker import CSVTracker
from .dvclive_tracker import DVCLiveTracker
from .mlflow_tracker import MLflowTracker
from .registry import (
    TRACKERS,
    TrackersArgument,
    TrackerSpec,
    default_trackers,
    installed_trackers,
    make_tracker,
    make_trackers,
    register_tracker,
)
from .tensorboard_tracker import TensorBoardTracker
from .wandb_tracker import WandbTracker

__all__ = [
    "TRACKERS", "AimTracker", "CSVTracker", "ClearMLTracker", "CometMLTracker", "DVCLiveTracker", "MLflowTracker",
    "TensorBoardTracker", "Tracker", "TrackerPackageMissing", "TrackerSpec", "TrackersArgument", "WandbTracker",
    "default_trackers", "installed_trackers", "make_tracker", "make_trackers", "register_tracker",
]
