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
    ...                         whatever the save hooks wrote (``trainer.checkpoint_hooks``), listed in accelerator.json
    manifest.json               every other file's size and checksum, written last

A save fails before writing anything when the disk lacks the space, and every process raises the
same error when one of them fails. A load checks everything (``checkpoint_manifest`` and
``checkpoint_checks``) before it restores the first object.
"""

from __future__ import annotations

import functools
import json
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from safetensors.torch import load_file, save_file, save_model

from trainer.checkpoint_checks import (
    check_gradients_file,
    check_model_file,
    check_optimizer_file,
    check_rng_file,
    check_strategy,
    check_tensor_refs,
    load_checked_state,
    missing_file,
    read_info,
    read_state_json,
    restoring,
)
from trainer.checkpoint_errors import (
    CheckpointError,
    CheckpointFileNotFoundError,
    agree_on_error,
    error_report,
    not_writable,
    out_of_space,
    raise_agreed,
)
from trainer.checkpoint_io import (
    check_free_space,
    commit_directory,
    find_intact_copy,
    leftovers,
    new_scratch_directory,
    remove_leftovers,
    split_state,
    write_error,
    write_json,
    write_split_state,
)
from trainer.checkpoint_manifest import verification_enabled, verify_checkpoint, write_manifest
from trainer.checkpoint_numbering import (  # noqa: F401  (their home before; the Accelerator calls them from here)
    latest_checkpoint,
    numbered_checkpoint,
    prune_checkpoints,
    save_target,
)
from trainer.model_files import writes_whole_weights
from trainer.random_state import capture_rng_state, restore_rng_state

if TYPE_CHECKING:
    from trainer.accelerator import Accelerator
    from trainer.checkpoint_async import StagingBuffers

FORMAT_VERSION = 1
SAFE_SUFFIXES = (".json", ".safetensors")
_SMALL_FILES = 2**16  # JSON and RNG states, on top of the tensors (and a header entry per tensor)


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


# -- save -----------------------------------------------------------------------------------------------------------
def estimated_bytes(accelerator: Accelerator) -> int:
    """About what a checkpoint of ``accelerator`` takes on disk: its tensors (whole, however sharded) and a margin."""
    seen: set[tuple[int, int]] = set()
    total = _SMALL_FILES + 2**14 * accelerator.num_processes  # each process's RNG states

    def add(tensor: Any, copies: int = 1) -> None:
        nonlocal total
        if torch.is_tensor(tensor):
            local = _local(tensor)
            key = (local.untyped_storage().data_ptr(), int(local.storage_offset())) if local.device.type != "meta" else None
            if key is None or key not in seen:
                total += (tensor.numel() * tensor.element_size() + 256) * copies
                if key is not None:
                    seen.add(key)

    for model in accelerator._models:
        for value in accelerator.unwrap_model(model).state_dict().values():
            add(value)
        if accelerator.accumulation.micro_step:  # every process writes its own gradients
            for parameter in accelerator.unwrap_model(model).parameters():
                add(parameter.grad, accelerator.num_processes if parameter.grad is not None and
                    not hasattr(parameter.grad, "to_local") else 1)
    for optimizer in accelerator._optimizers:
        for state in getattr(optimizer.optimizer, "state", {}).values():
            for value in state.values():
                add(value)
    return total


@dataclass
class StagedState:
    """What one process writes into a checkpoint's scratch folder, taken from the live objects.

    ``files`` are ``(name, skeleton, tensors)`` as ``split_state`` gives them; ``models`` are the
    full weights to write with ``safetensors.save_model`` (tied weights once).
    """

    models: list[tuple[str, dict[str, torch.Tensor]]] = field(default_factory=list)
    tensors: list[tuple[str, dict[str, torch.Tensor]]] = field(default_factory=list)
    files: list[tuple[str, Any, dict[str, torch.Tensor]]] = field(default_factory=list)
    info: dict[str, Any] | None = None
    started: list[Future[Any]] = field(default_factory=list)  # writes the strategy began in the background

    def write(self, scratch: Path) -> None:
        """Write every file into ``scratch`` (once the strategy's own background writes are done)."""
        for future in self.started:
            future.result()
        for name, state in self.models:
            save_model(cast("torch.nn.Module", _StateHolder(state)), str(scratch / name))
        for name, tensors in self.tensors:
            save_file(tensors, str(scratch / name))
        for name, skeleton, tensors in self.files:
            write_split_state(skeleton, tensors, scratch, name)
        if self.info is not None:
            write_json(scratch / "accelerator.json", self.info)


class _StateHolder:
    """Stands in for a module whose ``state_dict`` was taken already (``save_model`` asks only for that)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self._state)


def _stage_state(accelerator: Accelerator, scratch: Path, buffers: StagingBuffers | None,
                 process_group: Any = None) -> StagedState:
    """Take this process's part of the state from the live objects: copied into ``buffers`` when given.

    Without ``buffers`` the staged tensors are the live ones (a synchronous save writes them at once).
    With them, a strategy with a format of its own may start its write in the background
    (``save_training_state_async``, over ``process_group``); otherwise it writes its files here,
    as does one whose weights need gathering. The rest waits in the returned state.
    """
    strategy = accelerator.strategy
    staged = StagedState()

    def copy(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tensors if buffers is None else buffers.copy(prefix, tensors)

    def add_file(name: str, state: Any) -> None:
        skeleton, tensors = split_state(state)
        staged.files.append((name, skeleton, copy(f"{name}/", tensors)))

    optimizers = [opt.optimizer for opt in accelerator._optimizers]
    started = None if buffers is None else strategy.save_training_state_async(accelerator._models, optimizers,
                                                                               scratch, process_group)
    if started is not None:
        staged.started.append(started)
    own_format = started is not None or strategy.save_training_state(accelerator._models, optimizers, scratch)
    whole = not own_format and writes_whole_weights(strategy)  # process 0 writes each model's state_dict
    hooks, hook_files = accelerator._state_hooks, []
    weights = ([accelerator.unwrap_model(model).state_dict() for model in accelerator._models]
               if whole and (hooks.save or accelerator.is_main_process) else [])
    if hooks.save:  # they may save models their own way, and take those models' weights out of the list
        hook_files = hooks.run_save(list(accelerator._models), weights, scratch)
    model_files = len(weights) if whole else len(accelerator._models)
    for index, model in enumerate(accelerator._models):
        if not own_format and not whole:  # gathered by the strategy: written here
            strategy.save_module(model, scratch / f"{_name('model', index)}.safetensors")
        if accelerator.accumulation.micro_step:
            # Inside an accumulation group the gradients are part of the state: without them
            # the resumed group would miss the micro-batches already done. Each process has its
            # own (they are not synchronised until the group ends).
            grads = {name: _local(p.grad).detach().contiguous().cpu()
                     for name, p in accelerator.unwrap_model(model).named_parameters() if p.grad is not None}
            if grads:
                grads_file = _gradients_file(index, accelerator.process_index)
                staged.tensors.append((grads_file, copy(f"{grads_file}/", grads)))
    if accelerator.is_main_process:
        for index, state in enumerate(weights):
            name = f"{_name('model', index)}.safetensors"
            staged.models.append((name, copy(f"{name}/", state)))
    meta, tensors = capture_rng_state()
    add_file(f"random_states_{accelerator.process_index}", {"meta": meta, "tensors": tensors})
    # Optimizer state may be sharded, so every process asks the strategy for it.
    optimizer_states = [] if own_format else [strategy.optimizer_state_dict(opt) for opt in optimizers]
    if accelerator.is_main_process:
        for index, state in enumerate(optimizer_states):
            add_file(_name("optimizer", index), state)
        for index, scheduler in enumerate(accelerator._schedulers):
            add_file(_name("scheduler", index), scheduler.state_dict())
        for index, loader in enumerate(accelerator._dataloaders):
            add_file(_name("dataloader", index), loader.state_dict())
        for index, obj in enumerate(accelerator._custom_objects):
            add_file(_name("custom", index), obj.state_dict())
        add_file("precision", accelerator.precision.state_dict())
        staged.info = {
            "format_version": FORMAT_VERSION,
            "counts": _counts(accelerator),
            "mixed_precision": accelerator.mixed_precision,
            "num_processes": accelerator.num_processes,
            "strategy": accelerator.strategy.name,
            "accumulation": accelerator.accumulation.state_dict(),
            "save_iteration": accelerator.save_iteration,
            "model_files": model_files,
        }
        if hook_files:
            staged.info["hook_files"] = hook_files  # the save hooks' own: loading leaves them to the load hooks
    return staged


def _as_write_error(error: Exception, target: Path, needed: int, free: int | None) -> Exception:
    return write_error(error, target, needed, free) if out_of_space(error) or not_writable(error) else error


@dataclass
class _Commit:
    """How a save's files are agreed on and put in place (on the calling thread, or the writer's)."""

    scratch: Path
    target: Path
    main: bool
    needed: int
    free: int
    gather: Callable[[Any], list[Any]]
    broadcast: Callable[[Any], Any]
    after_commit: Callable[[Path], None] | None

    def run(self, write: Callable[[], None]) -> None:
        """``write()`` on every process; once all succeeded, the manifest and the swap (main process)."""
        scratch, target, main = self.scratch, self.target, self.main
        error: Exception | None = None
        try:
            try:
                write()
            except Exception as caught:
                error = _as_write_error(caught, target, self.needed, self.free)
            agree_on_error(error, self.gather)  # in place of a barrier: all files are written
            if main:
                try:
                    write_manifest(scratch)
                    commit_directory(scratch, target)
                except Exception as caught:
                    error = _as_write_error(caught, target, self.needed, self.free)
        except BaseException:
            if main:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        if main and error is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        elif main:
            remove_leftovers(target, "old")  # the new checkpoint is in place: copies crashed saves left are no longer needed
        raise_agreed(error, [self.broadcast(error_report(error) if main else None)])
        if self.after_commit is not None:
            self.after_commit(target)


def save_accelerator_state(accelerator: Accelerator, target: Path,
                           before_commit: Callable[[Path], None] | None = None,
                           after_commit: Callable[[Path], None] | None = None, blocking: bool = True) -> None:
    """Write every piece into a scratch directory, then (main process) add the manifest and swap it in.

    ``before_commit`` runs with the scratch directory, on the calling thread, before the
    checkpoint is put in place (a place for callbacks to add files of their own);
    ``after_commit(target)`` runs on every process once it is in place. Whatever fails (a full
    disk, a read-only folder, a state that cannot be stored) fails on every process, the scratch
    directory is removed and ``target`` keeps its previous checkpoint.

    With ``blocking=False`` the state is copied into reused buffers here and written by the
    accelerator's background writer; this returns once the copy is taken.
    """
    strategy, main, target = accelerator.strategy, accelerator.is_main_process, Path(target)
    writer = accelerator.checkpoint_writer
    writer.wait()  # the previous asynchronous save is complete (or raises) before this one starts
    needed = estimated_bytes(accelerator)
    scratch: Path | None = None
    error: Exception | None = None
    free = 0
    if main:
        try:
            remove_leftovers(target, "tmp")  # what saves that crashed left, before the space is counted
            scratch = new_scratch_directory(target)
            free = check_free_space(target, needed)
        except Exception as caught:
            error = caught
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
    shared = strategy.broadcast_object((str(scratch), error_report(error), free) if main else None)
    raise_agreed(error, [shared[1]])
    scratch, free = Path(shared[0]), shared[2]
    if blocking:
        def write() -> None:
            _stage_state(accelerator, scratch, None).write(scratch)
            if before_commit is not None:
                before_commit(scratch)

        _Commit(scratch, target, main, needed, free, strategy.all_gather_object, strategy.broadcast_object,
                after_commit).run(write)
        return
    writer.prepare()
    staged: StagedState | None = None
    try:
        staged = _stage_state(accelerator, scratch, accelerator.staging_buffers, writer.group)
        if before_commit is not None:
            before_commit(scratch)
    except Exception as caught:
        error = _as_write_error(caught, target, needed, free)
    try:
        agree_on_error(error, strategy.all_gather_object)
    except BaseException:
        if main:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    commit = _Commit(scratch, target, main, needed, free, writer.all_gather_object, writer.broadcast_object,
                     after_commit)
    writer.submit(functools.partial(commit.run, functools.partial(cast(StagedState, staged).write, scratch)))


# -- load -----------------------------------------------------------------------------------------------------------
def resolve_checkpoint(source: Path) -> Path:
    """``source``, or the complete previous checkpoint a save interrupted between its two renames left beside it.

    Loading that copy is loading what ``source`` held before the unfinished save (a save that did
    not return counts as not having happened); a warning names it.
    """
    if (source / "accelerator.json").is_file():
        return source
    copy = find_intact_copy(source)
    if copy is not None and not source.exists():
        warnings.warn(f"{source} does not exist: a save_state() replacing it was interrupted after it moved the previous "
                      f"checkpoint aside. Loading that complete previous checkpoint from {copy}; the next "
                      f"save_state({str(source)!r}) puts a new one in place and removes the copy.", UserWarning, stacklevel=4)
        return copy
    hints = [f"A save interrupted while replacing it left the previous checkpoint, complete, at {copy}: load that path."
             if copy else "Check the path: save_state() writes the folder it is given."]
    unfinished = [str(path) for path, _ in leftovers(source, "tmp")]
    if unfinished:
        hints.append(f"An unfinished save left {', '.join(unfinished)} (never put in place; the next save removes it).")
    where = "" if source.exists() else " (the folder does not exist)"
    raise CheckpointFileNotFoundError(f"{source} is not a checkpoint written by save_state(): it has no accelerator.json"
                                      f"{where}. {' '.join(hints)}")


def _refuse_foreign_files(source: Path) -> None:
    """Refuse a checkpoint holding anything but JSON and safetensors (a pickle could run code), apart from
    the files the save hooks wrote (``hook_files``: never read here, they are the load hooks' to read)."""
    try:
        hook_files = set(json.loads((source / "accelerator.json").read_text()).get("hook_files", []))
    except (OSError, ValueError, AttributeError, TypeError):
        hook_files = set()  # a damaged accelerator.json is reported by the checks that follow
    foreign = sorted(p.name for p in source.iterdir()
                     if p.is_file() and p.suffix not in SAFE_SUFFIXES and p.name not in hook_files)
    if foreign:
        raise CheckpointError(
            f"Refusing to load {source}: it contains {foreign}, which are neither JSON nor safetensors. "
            "Checkpoints written by save_state() hold only those two formats; a file such as a pickle can "
            "run code when read. Remove the file(s) if the checkpoint is otherwise yours."
        )


def _check(accelerator: Accelerator, source: Path, strict: bool) -> dict[str, Any]:
    """Everything the restore will read, checked (and its JSON parsed) before any state changes but the load hooks'.

    Once the counts and the strategy are checked, the load hooks run: they are handed the models
    that would be read from the model files (where the strategy reads whole weights, as the save
    hooks were handed the weights) and may load some themselves; the rest are read in order.
    """
    info = read_info(source)
    saved, current = info["counts"], _counts(accelerator)
    if strict and {kind: saved[kind] for kind in current} != current:
        raise CheckpointError(
            f"The checkpoint {source} holds {saved} but this Accelerator has prepared {current}. "
            "Prepare (and register) the same objects in the same order before load_state(), or pass strict=False."
        )
    models = accelerator._models[: saved["models"]]
    own_format = check_strategy(source, info, accelerator.strategy.name, len(models))
    to_read = list(models)
    if accelerator._state_hooks.load:
        handed = to_read if not own_format and writes_whole_weights(accelerator.strategy) else []
        accelerator._state_hooks.run_load(handed, source)
    files = info.get("model_files", saved["models"])
    hooked = bool(accelerator._state_hooks.load) or files != saved["models"]
    if not own_format and hooked and len(to_read) != files:
        raise CheckpointError(
            f"The checkpoint {source} holds {files} model file(s) (its save hooks saved {saved['models'] - files} of its "
            f"{saved['models']} model(s) their own way), but {len(to_read)} model(s) are left to load from those files "
            f"after the load hooks. A load hook must take out of `models` exactly the models whose weights the save "
            "hook took out of `weights` (register_load_state_pre_hook beside register_save_state_pre_hook)."
        )
    for index, model in enumerate([] if own_format else to_read):
        check_model_file(source, f"{_name('model', index)}.safetensors", accelerator.unwrap_model(model), strict)
    for index, model in enumerate(models):
        module = accelerator.unwrap_model(model)
        if (source / _gradients_file(index, accelerator.process_index)).is_file():
            check_gradients_file(source, _gradients_file(index, accelerator.process_index), module)

    def states(kind: str, counted: str, objects: list[Any], required: tuple[str, ...] = ()) -> list[Any]:
        found = []
        for index in range(min(saved[counted], len(objects))):
            skeleton = read_state_json(source, f"{_name(kind, index)}.json", required)
            check_tensor_refs(source, _name(kind, index), skeleton)
            found.append(skeleton)
        return found

    optimizers = accelerator._optimizers[: saved["optimizers"]]
    precision = read_state_json(source, "precision.json")
    check_tensor_refs(source, "precision", precision)
    return {
        "info": info, "own_format": own_format, "precision": precision, "to_read": to_read,
        "optimizers": [] if own_format else [check_optimizer_file(source, _name("optimizer", index), opt.optimizer)
                                             for index, opt in enumerate(optimizers)],
        "scheduler": states("scheduler", "schedulers", accelerator._schedulers),
        "dataloader": states("dataloader", "dataloaders", accelerator._dataloaders, ("iteration",)),
        "custom": states("custom", "custom_objects", accelerator._custom_objects),
        "rng": check_rng_file(source, f"random_states_{accelerator.process_index}"),
    }


def _restore(accelerator: Accelerator, source: Path, plan: dict[str, Any], strict: bool) -> None:
    """Put the checked state into the prepared objects, in order; RNG states last."""
    info, device = plan["info"], accelerator.device
    saved = info["counts"]
    models, optimizers = accelerator._models[: saved["models"]], accelerator._optimizers[: saved["optimizers"]]
    own_format = accelerator.strategy.load_training_state(models, [opt.optimizer for opt in optimizers], source)
    if plan["own_format"] and not own_format:  # its own folder is there, yet the strategy did not read it
        raise missing_file(source, "model.safetensors")
    for index, model in enumerate(plan["to_read"]):
        if not own_format:
            accelerator.strategy.load_module(model, source / f"{_name('model', index)}.safetensors", strict=strict)
    for index, model in enumerate(models):
        grads_path = source / _gradients_file(index, accelerator.process_index)
        grads = load_file(str(grads_path), device=str(device)) if grads_path.is_file() else {}
        for name, p in accelerator.unwrap_model(model).named_parameters():
            p.grad = _like_parameter(grads[name], p) if name in grads else None
    for index, (optimizer, skeleton) in enumerate(zip(optimizers, plan["optimizers"])):
        with restoring(source, f"{_name('optimizer', index)}.json", "optimizer"):
            optimizer.load_state_dict(load_checked_state(source, _name("optimizer", index), skeleton, device))
    for kind, objects in (("scheduler", accelerator._schedulers), ("dataloader", accelerator._dataloaders),
                          ("custom", accelerator._custom_objects)):
        for index, (obj, skeleton) in enumerate(zip(objects, plan[kind])):
            with restoring(source, f"{_name(kind, index)}.json", type(obj).__name__):
                state = load_checked_state(source, _name(kind, index), skeleton)
                if kind == "dataloader":
                    obj.load_state_dict(state, resume=accelerator.dataloader_config.use_stateful_dataloader)
                else:
                    obj.load_state_dict(state)
    with restoring(source, "precision.json", "precision policy"):
        accelerator.precision.load_state_dict(load_checked_state(source, "precision", plan["precision"]))
    with restoring(source, "accelerator.json", "gradient accumulation"):
        accelerator.accumulation.load_state_dict(info.get("accumulation", {}))
    accelerator.save_iteration = int(info.get("save_iteration", 0)) + 1
    if plan["rng"] is not None:
        rng_name = f"random_states_{accelerator.process_index}"
        with restoring(source, f"{rng_name}.json", "random number generators"):
            rng = load_checked_state(source, rng_name, plan["rng"])
            restore_rng_state(rng["meta"], rng["tensors"])


def load_accelerator_state(accelerator: Accelerator, source: Path, strict: bool = True, verify: bool = True) -> Path:
    """Check the checkpoint (its manifest, then every file against what was prepared), then restore it.

    Returns the folder loaded: ``source``, or the intact copy an interrupted save left beside it.
    Every process raises the same error when any process finds one, before any state changes.
    """
    strategy = accelerator.strategy
    check_files = verification_enabled(verify)
    source = resolve_checkpoint(Path(source))
    error: Exception | None = None
    try:
        _refuse_foreign_files(source)
    except Exception as caught:
        error = caught
    agree_on_error(error, strategy.all_gather_object)
    if check_files:
        verify_checkpoint(source, accelerator.process_index, accelerator.num_processes, strategy.all_gather_object)
    plan: dict[str, Any] = {}
    try:
        plan = _check(accelerator, source, strict)
    except Exception as caught:
        error = caught
    agree_on_error(error, strategy.all_gather_object)
    _restore(accelerator, source, plan, strict)
    return source
