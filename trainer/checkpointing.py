"""What ``Accelerator.save_state`` writes and ``load_state`` reads, file by file.

Layout of a checkpoint directory (``_<i>`` suffixes for the second and later object of a kind)::

    accelerator.json            counts of each kind, precision, process count, accumulation position
    model.safetensors           weights of each prepared model
    optimizer.json/.safetensors each optimizer's state dict (tensors apart from the structure)
    scheduler.json              each scheduler's state dict
    dataloader.json             each data loader's epoch, position and shuffle seed
    precision.json              the fp16 loss scaler
    gradients_<rank>.safetensors  each process's gradients accumulated so far, when saved inside a group
    custom.json/.safetensors    objects given to register_for_checkpointing
    random_states_<rank>.json/.safetensors   python, numpy, torch and device RNG states per process
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from trainer.checkpoint_io import (
    commit_directory,
    load_state_files,
    new_scratch_directory,
    read_json,
    save_state_files,
    write_json,
)
from trainer.random_state import capture_rng_state, restore_rng_state

if TYPE_CHECKING:
    from trainer.accelerator import Accelerator
    from trainer.utils.configurations import ProjectConfiguration

FORMAT_VERSION = 1


def _name(kind: str, index: int) -> str:
    return kind if index == 0 else f"{kind}_{index}"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (a sharded DTensor's local shard; a plain tensor itself)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _like_parameter(local: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """A loaded gradient in the parameter's form (sharded like it when the parameter is a DTensor)."""
    from torch.distributed.tensor import DTensor

    if isinstance(parameter, DTensor):
        return DTensor.from_local(local.to(parameter.device), parameter.device_mesh, parameter.placements)
    return local


def _gradients_file(model_index: int, process_index: int) -> str:
    return f"{_name('gradients', model_index)}_{process_index}.safetensors"


def _counts(accelerator: Accelerator) -> dict[str, int]:
    return {"models": len(accelerator._models), "optimizers": len(accelerator._optimizers),
            "schedulers": len(accelerator._schedulers), "dataloaders": len(accelerator._dataloaders),
            "custom_objects": len(accelerator._custom_objects)}


def save_accelerator_state(accelerator: Accelerator, target: Path,
                           before_commit: Callable[[Path], None] | None = None) -> None:
    """Write every piece into a scratch directory on the main process, then swap it in.

    ``before_commit`` runs with the scratch directory once everything is written and before it
    replaces ``target`` (a place for callbacks to add files of their own).
    """
    strategy = accelerator.strategy
    main = accelerator.is_main_process
    scratch = strategy.broadcast_object(str(new_scratch_directory(target)) if main else None)
    scratch_path = Path(scratch)
    try:
        optimizers = [opt.optimizer for opt in accelerator._optimizers]
        own_format = strategy.save_training_state(accelerator._models, optimizers, scratch_path)
        for index, model in enumerate(accelerator._models):
            if not own_format:
                strategy.save_module(model, scratch_path / f"{_name('model', index)}.safetensors")
            if accelerator.accumulation.micro_step:
                # Inside an accumulation group the gradients are part of the state: without them
                # the resumed group would miss the micro-batches already done. Each process has its
                # own (they are not synchronised until the group ends).
                grads = {name: _local(p.grad).detach().contiguous().cpu()
                         for name, p in accelerator.unwrap_model(model).named_parameters() if p.grad is not None}
                if grads:
                    save_file(grads, str(scratch_path / _gradients_file(index, accelerator.process_index)))
        meta, tensors = capture_rng_state()
        save_state_files({"meta": meta, "tensors": tensors}, scratch_path, f"random_states_{accelerator.process_index}")
        # Optimizer state may be sharded, so every process asks the strategy for it.
        optimizer_states = [] if own_format else [strategy.optimizer_state_dict(opt) for opt in optimizers]
        if main:
            for index, state in enumerate(optimizer_states):
                save_state_files(state, scratch_path, _name("optimizer", index))
            for index, scheduler in enumerate(accelerator._schedulers):
                save_state_files(scheduler.state_dict(), scratch_path, _name("scheduler", index))
            for index, loader in enumerate(accelerator._dataloaders):
                save_state_files(loader.state_dict(), scratch_path, _name("dataloader", index))
            for index, obj in enumerate(accelerator._custom_objects):
                save_state_files(obj.state_dict(), scratch_path, _name("custom", index))
            save_state_files(accelerator.precision.state_dict(), scratch_path, "precision")
            write_json(scratch_path / "accelerator.json", {
                "format_version": FORMAT_VERSION,
                "counts": _counts(accelerator),
                "mixed_precision": accelerator.mixed_precision,
                "num_processes": accelerator.num_processes,
                "strategy": accelerator.strategy.name,
                "accumulation": accelerator.accumulation.state_dict(),
                "save_iteration": accelerator.save_iteration,
            })
        if before_commit is not None:
            before_commit(scratch_path)
        strategy.barrier()
    except BaseException:
        if main:
            shutil.rmtree(scratch_path, ignore_errors=True)
        raise
    if main:
        commit_directory(scratch_path, target)
    strategy.barrier()


def load_accelerator_state(accelerator: Accelerator, source: Path, strict: bool = True) -> None:
    """Check the checkpoint matches what was prepared, then restore it; RNG states come last."""
    info_path = source / "accelerator.json"
    if not info_path.is_file():
        raise FileNotFoundError(
            f"{source} is not a checkpoint written by save_state(): it has no accelerator.json."
        )
    _refuse_foreign_files(source)
    info = read_json(info_path)
    saved, current = info["counts"], _counts(accelerator)
    if strict and saved != current:
        raise ValueError(
            f"The checkpoint {source} holds {saved} but this Accelerator has prepared {current}. "
            "Prepare (and register) the same objects in the same order before load_state(), or pass strict=False."
        )
    device = accelerator.device
    models, optimizers = accelerator._models[: saved["models"]], accelerator._optimizers[: saved["optimizers"]]
    own_format = accelerator.strategy.load_training_state(models, [opt.optimizer for opt in optimizers], source)
    for index, model in enumerate(models):
        if not own_format:
            accelerator.strategy.load_module(model, source / f"{_name('model', index)}.safetensors", strict=strict)
        grads_path = source / _gradients_file(index, accelerator.process_index)
        grads = load_file(str(grads_path), device=str(device)) if grads_path.is_file() else {}
        for name, p in accelerator.unwrap_model(model).named_parameters():
            p.grad = _like_parameter(grads[name], p) if name in grads else None
    for index, optimizer in enumerate([] if own_format else optimizers):
        optimizer.load_state_dict(load_state_files(source, _name("optimizer", index), device))
    for index, scheduler in enumerate(accelerator._schedulers[: saved["schedulers"]]):
        scheduler.load_state_dict(load_state_files(source, _name("scheduler", index)))
    for index, loader in enumerate(accelerator._dataloaders[: saved["dataloaders"]]):
        loader.load_state_dict(load_state_files(source, _name("dataloader", index)),
                               resume=accelerator.dataloader_config.use_stateful_dataloader)
    for index, obj in enumerate(accelerator._custom_objects[: saved["custom_objects"]]):
        obj.load_state_dict(load_state_files(source, _name("custom", index)))
    accelerator.precision.load_state_dict(load_state_files(source, "precision"))
    accelerator.accumulation.load_state_dict(info.get("accumulation", {}))
    accelerator.save_iteration = int(info.get("save_iteration", 0)) + 1
    rng_name = f"random_states_{accelerator.process_index}"
    if (source / f"{rng_name}.json").is_file():
        rng = load_state_files(source, rng_name)
        restore_rng_state(rng["meta"], rng["tensors"])


SAFE_SUFFIXES = (".json", ".safetensors")


def _refuse_foreign_files(source: Path) -> None:
    """Refuse a checkpoint holding anything but JSON and safetensors (a pickle could run code)."""
    foreign = sorted(p.name for p in source.iterdir() if p.is_file() and p.suffix not in SAFE_SUFFIXES)
    if foreign:
        raise ValueError(
            f"Refusing to load {source}: it contains {foreign}, which are neither JSON nor safetensors. "
            "Checkpoints written by save_state() hold only those two formats; a file such as a pickle can "
            "run code when read. Remove the file(s) if the checkpoint is otherwise yours."
        )


def save_target(project: ProjectConfiguration, output_dir: str | os.PathLike | None, iteration: int) -> Path:
    """Where ``save_state`` writes: ``output_dir``, or (no folder, or automatic naming) the next numbered checkpoint."""
    if output_dir is not None and not project.automatic_checkpoint_naming:
        return Path(output_dir)
    if output_dir is not None:
        warnings.warn(f"save_state({os.fspath(output_dir)!r}) writes to project_dir/checkpoints/checkpoint_{iteration}: "
                      "ProjectConfiguration(automatic_checkpoint_naming=True) names the checkpoints.", UserWarning,
                      stacklevel=3)
    project_dir = Path(project.project_dir) if project.project_dir is not None else None
    target = numbered_checkpoint(project_dir, iteration, "save_state")
    if project.automatic_checkpoint_naming and target.exists():
        raise ValueError(f"The checkpoint {target} exists already: this run would write over it. Start numbering after "
                         "it (ProjectConfiguration(iteration=...) or accelerator.save_iteration), or use another "
                         "project_dir.")
    return target


def numbered_checkpoint(project_dir: Path | None, iteration: int | None, caller: str) -> Path:
    """``project_dir/checkpoints/checkpoint_<iteration>`` to save; with no iteration, the latest one there to load."""
    if project_dir is None:
        raise ValueError(f"{caller}() needs a directory: pass one, or create the Accelerator with project_dir= to "
                         "use numbered checkpoints.")
    root = project_dir / "checkpoints"
    if iteration is not None:
        return root / f"checkpoint_{iteration}"
    latest = latest_checkpoint(root)
    if latest is None:
        raise FileNotFoundError(f"{caller}(): no checkpoint_<n> directory under {root}.")
    return latest


def latest_checkpoint(root: Path) -> Path | None:
    """The ``checkpoint_<n>`` directory with the largest n under ``root``."""
    numbered = _numbered(root)
    return numbered[-1] if numbered else None


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` highest-numbered ``checkpoint_<n>`` directories under ``root``; return the deleted."""
    doomed = _numbered(root)[:-keep] if keep > 0 else _numbered(root)
    for folder in doomed:
        shutil.rmtree(folder)
    return doomed


def _numbered(root: Path) -> list[Path]:
    """The ``checkpoint_<n>`` directories under ``root``, lowest n first."""
    if not root.is_dir():
        return []
    numbered = [(int(m.group(1)), p) for p in root.iterdir()
                if p.is_dir() and (m := re.fullmatch(r"checkpoint_(\d+)", p.name))]
    return [path for _, path in sorted(numbered)]
