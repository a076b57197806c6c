"""``trainer env``: the facts to paste into a bug report."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform

import torch

from trainer.cluster import detect_cluster_environment
from trainer.devices import accelerator_type

PACKAGES = ("torch", "numpy", "safetensors", "datasets", "evaluate", "tqdm", "mlflow", "wandb", "deepspeed")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict[str, str]:
    kind = accelerator_type()
    facts = {
        "trainer": _version("trainer-kit"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "accelerator": kind or "none (CPU)",
        "accelerator devices": str(torch.accelerator.device_count() if kind else 0),
        "launcher": detect_cluster_environment().launcher,
    }
    facts.update({name: _version(name) for name in PACKAGES})
    return facts


def run(args: argparse.Namespace) -> int:
    for key, value in collect().items():
        print(f"- {key}: {value}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("env", help="print versions and the machine's accelerators")
    parser.set_defaults(func=run)
