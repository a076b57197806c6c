"""What the compat scripts check about their own runs; every check fails loudly with what it saw.

Kept apart from the scripts so that each script's body is its upstream's calls plus a few lines
that record losses and predictions and call these.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from offline import load_dataset


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def check_loss_fell(first: list[float], last: list[float], by: float = 0.9) -> None:
    """The mean training loss of the last epoch is below ``by`` x that of the first."""
    assert first and last, "no training loss was recorded"
    assert mean(last) < by * mean(first), f"the training loss did not fall: first epoch {mean(first):.4f}, last {mean(last):.4f}"


def validation_labels(name: str = "mrpc") -> list[int]:
    """The labels of the validation split, in order, as the offline loader builds it."""
    return list(load_dataset("nyu-mll/glue", name)["validation"]["label"])


def check_every_sample_once(references: list[torch.Tensor], expected: list[int]) -> None:
    """The references gathered over one evaluation pass are the validation labels, each exactly once, in order."""
    seen = torch.cat([ref.cpu() for ref in references]).tolist()
    assert len(seen) == len(expected), f"gathered {len(seen)} references for {len(expected)} validation samples"
    assert seen == expected, "the gathered references are not the validation labels in order"


def check_accuracy(metric: dict[str, Any], at_least: float) -> None:
    assert metric["accuracy"] >= at_least, f"accuracy {metric['accuracy']:.3f} < {at_least}: the model did not learn"


def flat_parameters(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def check_same_on_every_process(accelerator: Any, model: torch.nn.Module) -> None:
    """Every process holds the same parameter values (gathered one row per process)."""
    rows = accelerator.gather(flat_parameters(model)[None])
    assert rows.shape[0] == accelerator.num_processes, rows.shape
    spread = (rows - rows[0]).abs().max().item()
    assert spread == 0.0, f"the processes' parameters differ by up to {spread:.3g}"


def say(accelerator: Any, marker: str) -> None:
    """The script's last line on this process: ``<marker> OK rank <i>``, written in one call."""
    sys.stdout.write(f"{marker} OK rank {accelerator.process_index}\n")
    sys.stdout.flush()
