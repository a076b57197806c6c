"""Seeding and the random-number states that a checkpoint must carry for an exact resume."""

from __future__ import annotations

import os
import random
from typing import Any, cast

import numpy as np
import torch

from trainer.devices import accelerator_type


def _device_module() -> Any:
    kind = accelerator_type()
    return None if kind is None else getattr(torch, kind, None)


def set_seed(seed: int, device_specific: bool = False, deterministic: bool = False) -> None:
    """Seed python, numpy, torch and the accelerator.

    Args:
        device_specific: add the process index to the seed, so ranks draw different numbers
            (e.g. different dropout masks) while the run stays reproducible.
        deterministic: also ask torch for deterministic kernels (slower; errors on ops that have none).
    """
    if device_specific:
        from trainer.state import PartialState

        seed += PartialState().process_index
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # seeds every device's default generator too
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True)


def capture_rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The RNG states of python, numpy, torch and the accelerator, as (JSON part, tensor part)."""
    py_version, py_state, py_gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    meta: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    module = _device_module()
    if module is not None and hasattr(module, "get_rng_state_all"):
        meta["device_type"] = accelerator_type()
        for index, state in enumerate(module.get_rng_state_all()):
            tensors[f"device_{index}"] = state
    return meta, tensors


def restore_rng_state(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Put back what ``capture_rng_state`` returned."""
    python = meta["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy = meta["numpy"]
    np.random.set_state((numpy["kind"], np.array(numpy["keys"], dtype=np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(tensors["torch_cpu"])
    module = _device_module()
    device_states = [tensors[k] for k in sorted((k for k in tensors if k.startswith("device_")),
                                                key=lambda k: int(k.split("_")[1]))]
    if device_states and module is not None and meta.get("device_type") == accelerator_type():
        module.set_rng_state_all(device_states)


def forked_rng(device: torch.device) -> Any:
    """A context that restores the CPU (and this device's) RNG state when it exits.

    Devices without a ``torch.<type>`` module (XLA keeps its generator elsewhere) fork the CPU's only.
    """
    if device.type == "cpu" or getattr(torch, device.type, None) is None:
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device.index or 0], device_type=device.type)
