"""XLA: one process on one XLA device (a TPU core, or the CPU with ``PJRT_DEVICE=CPU``).

XLA records operations lazily and compiles the recorded graph when it is cut. The strategy cuts it
after every backward and every optimizer step, so each training step compiles to the same few graphs
that XLA caches, instead of one graph that grows over the whole run. Tensors on the XLA device cannot
be written by safetensors directly, so checkpoints go through CPU copies, in the same files as a
single-device run (a checkpoint moves between the two).

torch_xla is an optional package whose version must match torch's exactly; it is checked before
any work starts. One process only: several XLA devices (a TPU slice) need collectives this
strategy does not implement.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base import Strategy, check_loaded_keys
from .spec import Package, StrategySpec
from .state_format import load_state_files, read_json, save_state_files, write_json

_RNG_FILE = "xla_random_state.json"
PACKAGE = Package("torch_xla", "torch_xla",
                  "pip install 'torch_xla==<your torch version>' (e.g. pip install torch==2.9.0 torch_xla==2.9.0)",
                  note=". Run it on the CPU with PJRT_DEVICE=CPU, on TPUs with PJRT_DEVICE=TPU.")


def _xla() -> tuple[Any, Any]:
    """(torch_xla, torch_xla.core.xla_model), imported only when the strategy is used."""
    PACKAGE.require("The XLA strategy")
    import torch_xla
    import torch_xla.core.xla_model as xm

    return torch_xla, xm


def _name(kind: str, index: int) -> str:
    """The file names a single-device checkpoint uses, so the two stay interchangeable."""
    return kind if index == 0 else f"{kind}_{index}"


class XLA(Strategy):
    """Train on one XLA device; the graph is cut after each backward and each optimizer step."""

    spec = StrategySpec(name="xla", summary="one process on one XLA device (a TPU core, or the CPU with PJRT_DEVICE=CPU)",
                        distributed_types=("XLA",), package=PACKAGE)

    def __init__(self) -> None:
        super().__init__()
        PACKAGE.require("The XLA strategy")
        self._moved: dict[int, tuple[nn.Parameter, nn.Parameter]] = {}  # id(CPU parameter) -> (it, its device copy)

    def setup_environment(self, device: torch.device, process_index: int = 0, num_processes: int = 1) -> None:
        if num_processes > 1:
            raise ValueError(f"strategy='xla' runs one process on one XLA device, but this job has {num_processes}; "
                             "launch a single process.")
        torch_xla, _ = _xla()
        # The Accelerator's own device pick knows nothing of XLA; the device is torch_xla's.
        super().setup_environment(torch_xla.device(), process_index, num_processes)

    def setup_module(self, module: nn.Module) -> nn.Module:
        # Moving to an XLA device makes new Parameter objects (a CPU tensor cannot become an XLA one
        # in place), so an optimizer built on the CPU model would step tensors the model no longer uses.
        if not self._moved:
            # torch.manual_seed does not reach XLA's generator (dropout on the device draws from it): seed it
            # from the run's seed, so a seeded run draws the same masks in any process.
            _xla()[1].set_rng_state(torch.initial_seed() % 2**63)
        before = list(module.parameters())
        module = module.to(self.root_device)
        self._moved.update({id(old): (old, new) for old, new in zip(before, module.parameters())})
        return module

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Point the optimizer at the parameters ``setup_module`` moved to the device."""
        for group in optimizer.param_groups:
            group["params"] = [self._moved[id(p)][1] if id(p) in self._moved else p for p in group["params"]]
        stranded = [p for group in optimizer.param_groups for p in group["params"] if p.device.type != "xla"]
        if stranded:
            raise ValueError(f"strategy='xla': the optimizer holds {len(stranded)} parameter(s) that are not on the XLA "
                             "device; prepare the model before the optimizer, or in the same prepare() call.")
        return optimizer

    def backward(self, loss: torch.Tensor, module: nn.Module | None = None, **kwargs: Any) -> None:
        loss.backward(**kwargs)
        _xla()[0].sync()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, **kwargs: Any) -> Any:
        torch_xla, xm = _xla()
        result = xm.optimizer_step(optimizer, optimizer_args=kwargs)
        torch_xla.sync()
        return result

    def step_function(self, optimizer: torch.optim.Optimizer) -> Callable[..., Any]:
        return lambda **kwargs: self.optimizer_step(optimizer, **kwargs)

    # -- checkpoint IO: CPU copies, the single-device file layout -----------------------------------
    def save_module(self, module: nn.Module, path: Path) -> None:
        state = {key: value.detach().cpu().contiguous() for key, value in self.unwrap_module(module).state_dict().items()}
        save_file(state, str(path))

    def load_module(self, module: nn.Module, path: Path, strict: bool = True) -> None:
        missing, unexpected = self.unwrap_module(module).load_state_dict(load_file(str(path)), strict=False)
        check_loaded_keys(path, missing, unexpected, strict)

    def save_training_state(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                            directory: Path) -> bool:
        for index, module in enumerate(modules):
            self.save_module(module, directory / f"{_name('model', index)}.safetensors")
        for index, optimizer in enumerate(optimizers):
            save_state_files(optimizer.state_dict(), directory, _name("optimizer", index))  # CPU copies
        # Dropout on the device draws from XLA's own generator, which the CPU/CUDA RNG state does not cover.
        write_json(directory / _RNG_FILE, {"seed": int(_xla()[1].get_rng_state())})
        return True

    def load_training_state(self, modules: list[nn.Module], optimizers: list[torch.optim.Optimizer],
                            directory: Path) -> bool:
        if not (directory / f"{_name('model', 0)}.safetensors").is_file() and modules:
            return False
        for index, module in enumerate(modules):
            self.load_module(module, directory / f"{_name('model', index)}.safetensors")
        for index, optimizer in enumerate(optimizers):
            # Read to the CPU; the optimizer moves its state next to its parameters.
            optimizer.load_state_dict(load_state_files(directory, _name("optimizer", index), "cpu"))
        if (directory / _RNG_FILE).is_file():
            _xla()[1].set_rng_state(read_json(directory / _RNG_FILE)["seed"])
        return True
