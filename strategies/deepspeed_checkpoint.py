"""DeepSpeed checkpoints: each process's ZeRO partitions in safetensors plus JSON, nothing pickled.

A ``zero/`` folder holds, per process, the ZeRO optimizer's state (fp32 master weights and
moments), the engine's counters and, for ZeRO-3, that process's parameter shards; ``meta.json``
records the layout, so a checkpoint is refused on another ZeRO stage or process count. Only
NVMe-offloaded state, which DeepSpeed alone can read back, goes to DeepSpeed's own (pickled) files
in a ``deepspeed/`` folder; reading those needs the caller's explicit trust.
"""

from __future__ import annotations

from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from .base import check_loaded_keys
from .state_format import (
    StoredTensor,
    load_state_entries,
    load_state_files,
    open_state,
    read_json,
    read_stored,
    save_state_files,
    write_json,
)

PARTITIONS_DIR, NATIVE_DIR = "zero", "deepspeed"
_LOSS_SCALER_KEY = "__loss_scaler__"


def save_partitions(engine: Any, module: nn.Module, folder: Path, zero_stage: int, process_index: int,
                    num_processes: int) -> None:
    """Every process writes its partitions of ``engine``'s state (``module`` is the user's model inside it)."""
    folder.mkdir(parents=True, exist_ok=True)
    optimizer = engine.optimizer
    _checkpoint_event(optimizer, "prologue")
    try:
        state: dict[str, Any] = {"engine": {"global_steps": engine.global_steps, "global_samples": engine.global_samples,
                                            "skipped_steps": engine.skipped_steps}}
        if hasattr(optimizer, "state_dict"):
            state["optimizer"] = _plain_optimizer_state(optimizer.state_dict())
        if engine.lr_scheduler is not None and hasattr(engine.lr_scheduler, "state_dict"):
            state["lr_scheduler"] = engine.lr_scheduler.state_dict()
        state["model"] = _local_model_partition(module, zero_stage, process_index)
        save_state_files(state, folder, f"rank_{process_index}")
    finally:
        _checkpoint_event(optimizer, "epilogue")
    if process_index == 0:
        import deepspeed

        meta = {"zero_stage": zero_stage, "num_processes": num_processes, "deepspeed_version": deepspeed.__version__,
                "parameters": {n: list(p.ds_shape if hasattr(p, "ds_shape") else p.shape)
                               for n, p in module.named_parameters()}}
        if zero_stage == 3:  # where each parameter's part lies in a process's flat fp32 groups: the same on every one
            meta["fragments"] = {n: [int(v) for v in optimizer.grad_position[optimizer.get_param_id(p)]]
                                 for n, p in module.named_parameters()
                                 if hasattr(p, "ds_id") and optimizer.get_param_id(p) in optimizer.grad_position}
        write_json(folder / "meta.json", meta)


def load_partitions(engine: Any, module: nn.Module, folder: Path, zero_stage: int, process_index: int,
                    num_processes: int) -> None:
    """Every process reads its partitions back into ``engine``; a different layout is one clear error."""
    meta = read_json(folder / "meta.json")
    if zero_stage == 3 == meta["zero_stage"] and meta["num_processes"] != num_processes and "fragments" in meta:
        _reshard_zero3(engine, module, folder, meta, process_index, num_processes)
        return
    if meta["num_processes"] != num_processes or meta["zero_stage"] != zero_stage:
        raise ValueError(
            f"{folder.parent} holds ZeRO-{meta['zero_stage']} partitions of {meta['num_processes']} process(es); this "
            f"run is ZeRO-{zero_stage} on {num_processes}. Resume with the same layout (ZeRO-3 partitions also resume "
            "on another process count), or start a new run from full weights written by accelerator.save_model() "
            "or `trainer merge-weights`."
        )
    state = load_state_files(folder, f"rank_{process_index}", device="cpu")
    _load_model_partition(module, state.get("model", {}), zero_stage, process_index)
    optimizer = engine.optimizer
    if "optimizer" in state:
        _checkpoint_event(optimizer, "prologue")
        restored = _restore_optimizer_state(state["optimizer"], optimizer)
        everyone = [restored] * num_processes  # indexed by rank: this process reads its own entry
        if zero_stage == 3:
            optimizer.load_state_dict(everyone, load_optimizer_states=True)
        else:
            optimizer.load_state_dict(everyone, load_optimizer_states=True, load_from_fp32_weights=True)
            optimizer.update_lp_params()  # the model's weights from the fp32 master weights
        _checkpoint_event(optimizer, "epilogue")
    _restore_counters(engine, state)


def _restore_counters(engine: Any, state: dict[str, Any]) -> None:
    """The learning-rate schedule's and the engine's step counters, as one process saved them."""
    if "lr_scheduler" in state and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])
    counters = state.get("engine", {})
    engine.global_steps = int(counters.get("global_steps", engine.global_steps))
    engine.global_samples = int(counters.get("global_samples", engine.global_samples))
    engine.skipped_steps = int(counters.get("skipped_steps", engine.skipped_steps))


def zero3_whole_tensors(meta: dict[str, Any], shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The whole weights from every process's ZeRO-3 shards of them (``shards[rank]``: name -> flat shard): each
    parameter's shards joined, trimmed of their padding and shaped."""
    whole: dict[str, torch.Tensor] = {}
    for name, shape in meta["parameters"].items():
        if name in shards[0]:
            numel = int(torch.Size(shape).numel())
            whole[name] = torch.cat([shard[name].reshape(-1) for shard in shards])[:numel].view(shape).clone()
    return whole


def find_partitions(path: Path) -> Path | None:
    """The ``zero/`` folder of a checkpoint directory (or the folder itself); None if there is none."""
    for folder in (Path(path) / PARTITIONS_DIR, Path(path)):
        if (folder / "meta.json").is_file() and (folder / "rank_0.safetensors").is_file():
            return folder
    return None


def partition_tensor_specs(folder: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Name -> (shape, dtype) of the model's whole weights in a ZeRO partitions folder."""
    meta = read_json(folder / "meta.json")
    saved = load_state_entries(folder, "rank_0", "model")
    return {name: (torch.Size(shape), saved[name].dtype) for name, shape in meta["parameters"].items() if name in saved}


def load_partition_tensors(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The whole weights ``names`` of a ZeRO partitions folder (only those weights are read): joined from every
    process's ZeRO-3 shards, or process 0's whole weights under ZeRO-1/2."""
    meta = read_json(folder / "meta.json")
    if meta["zero_stage"] == 3:
        return zero3_whole_tensors(meta, [load_state_entries(folder, f"rank_{rank}", "model", names)
                                          for rank in range(meta["num_processes"])])
    return load_state_entries(folder, "rank_0", "model", names)


def _reshard_zero3(engine: Any, module: nn.Module, folder: Path, meta: dict[str, Any], process_index: int,
                   num_processes: int) -> None:
    """Read ZeRO-3 partitions written by another number of processes.

    Each parameter is partitioned on its own (its flat values cut into equal parts, the last
    padded), in the weights and in the fp32 master weights and moments alike. This process's part
    for the new count is read from the saved parts it overlaps, and only those values are read: a
    process holds about its share of the state, never the whole.
    """
    with ExitStack() as files:
        saved = [files.enter_context(open_state(folder, f"rank_{rank}")) for rank in range(meta["num_processes"])]
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                if name in saved[0]["model"]:
                    parts = [state["model"][name] for state in saved]
                    parameter.ds_tensor.copy_(_my_part(parts, 0, parts[0].shape[0], parameter.ds_numel,  # type: ignore[attr-defined]
                                                       parameter.ds_tensor.numel(), process_index))  # type: ignore[attr-defined]
        optimizers = [state["optimizer"] for state in saved]
        saved_groups = optimizers[0]["optimizer_state_dict"]
        moments = [key for key, value in _group_state(saved_groups, 0).items()
                   if isinstance(value, StoredTensor) and len(value.shape) == 1]
        zero = engine.optimizer
        flats = zero.fp32_partitioned_groups_flat
        for index, flat in enumerate(flats):  # step counts, moments (filled below), per flat group
            state = zero.optimizer.state[flat]
            group_saved = _group_state(saved_groups, min(index, len(saved_groups["param_groups"]) - 1))
            for key, value in group_saved.items():
                state[key] = torch.zeros_like(flat) if key in moments else read_stored(value)
        for name, parameter in module.named_parameters():
            if name not in meta["fragments"]:
                continue
            saved_group, saved_offset, saved_count = meta["fragments"][name]
            group, offset, count = zero.grad_position[zero.get_param_id(parameter)]
            numel, part = parameter.ds_numel, parameter.ds_tensor.numel()  # type: ignore[attr-defined]
            sources: dict[str | None, list[StoredTensor]] = {  # None: the fp32 master weights; then each moment
                None: [optimizer["fp32_flat_groups"][saved_group] for optimizer in optimizers]}
            sources.update({moment: [_group_state(optimizer["optimizer_state_dict"], saved_group)[moment]
                                     for optimizer in optimizers] for moment in moments})
            with torch.no_grad():
                for source, parts in sources.items():
                    target = flats[group] if source is None else zero.optimizer.state[flats[group]][source]
                    target.narrow(0, offset, count).copy_(
                        _my_part(parts, saved_offset, saved_count, numel, part, process_index)[:count])
        for group, saved_group_settings in zip(zero.optimizer.param_groups, saved_groups["param_groups"], strict=False):
            group.update({key: value for key, value in saved_group_settings.items() if key != "params"})
        _restore_optimizer_state(optimizers[0], zero)  # the loss scaler's numbers
        _restore_counters(engine, read_stored({key: saved[0][key] for key in ("engine", "lr_scheduler") if key in saved[0]}))


def _my_part(parts: list[StoredTensor], offset: int, saved_part: int, numel: int, part: int,
             process_index: int) -> torch.Tensor:
    """Process ``process_index``'s ``part`` values of a parameter of ``numel`` flat values, saved in parts of
    ``saved_part`` values at ``offset`` in each of ``parts`` (one per saving process, the last padded).

    Only the saved ranges that overlap this process's part are read; past ``numel`` it is zeros.
    """
    start, stop = process_index * part, min((process_index + 1) * part, numel)
    pieces, position = [], start
    while position < stop:
        rank, within = divmod(position, saved_part)
        take = min(saved_part - within, stop - position)
        pieces.append(parts[rank].read_range(offset + within, offset + within + take))
        position += take
    if not pieces:  # this process's part lies wholly in the padding (the caller copies it into its own dtype)
        return torch.zeros(part)
    mine = torch.cat(pieces)
    return torch.nn.functional.pad(mine, (0, part - mine.numel()))


def _group_state(optimizer_state: dict[str, Any], group: int) -> dict[str, Any]:
    """The torch optimizer state of flat group ``group`` (its key may have become a string on disk)."""
    per_group = optimizer_state["state"]
    return per_group[group] if group in per_group else per_group[str(group)]


def load_native(engine: Any, folder: Path, trusted: bool) -> None:
    """Read DeepSpeed's own (pickled) checkpoint files, only when the caller said they are trusted."""
    if not trusted:
        raise ValueError(
            f"{folder} holds DeepSpeed's own checkpoint files, which are Python pickles: reading one can run code. "
            "Load them only if you wrote them yourself, with DeepSpeed(trust_deepspeed_checkpoints=True)."
        )
    loaded, _ = engine.load_checkpoint(str(folder), tag="state", load_optimizer_states=True, load_lr_scheduler_states=True)
    if loaded is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint in {folder}.")


def gather_full_weights(deepspeed: Any, module: nn.Module, zero_stage: int, save_16bit: bool) -> dict[str, torch.Tensor]:
    """The full weights of the model inside the engine, on the CPU, tied ones under one name.

    Every process calls it (ZeRO-3 gathers): the fp32 master weights, assembled from every process's
    partition, unless ``save_16bit`` asks for the training-dtype weights.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    entries = module.state_dict(keep_vars=True)
    if zero_stage == 3 and not save_16bit:
        for name, tensor in entries.items():  # a collective per parameter
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            full = safe_get_full_fp32_param(tensor) if isinstance(tensor, nn.Parameter) else None
            state[name] = (full if full is not None else tensor).detach().cpu().clone().contiguous()
        return state
    parameters = list(module.parameters())
    gather = deepspeed.zero.GatheredParameters(parameters, modifier_rank=None) if zero_stage == 3 else nullcontext()
    with gather:
        for name, tensor in entries.items():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                state[name] = tensor.detach().cpu().clone().contiguous()
    return state


def load_full_weights(deepspeed: Any, engine: Any, module: nn.Module, path: Path, zero_stage: int, strict: bool) -> None:
    """Load a full-weights safetensors file into the (partitioned) model on every process; the fp32 master weights follow."""
    loaded = load_file(str(path))
    entries = module.state_dict(keep_vars=True)
    missing = sorted(set(entries) - set(loaded) - _tied_aliases(entries, loaded))
    unexpected = sorted(set(loaded) - set(entries))
    check_loaded_keys(path, missing, unexpected, strict)
    _load_whole(deepspeed, engine, module, loaded, zero_stage)


def _load_whole(deepspeed: Any, engine: Any, module: nn.Module, loaded: dict[str, torch.Tensor], zero_stage: int) -> None:
    """Copy whole tensors into the (partitioned) model: ZeRO-3 re-partitions process 0's; fp32 master weights follow."""
    entries = module.state_dict(keep_vars=True)
    parameters = list(module.parameters())
    gather = deepspeed.zero.GatheredParameters(parameters, modifier_rank=0) if zero_stage == 3 else nullcontext()
    with gather, torch.no_grad():
        for name, tensor in entries.items():
            if name in loaded:
                tensor.copy_(loaded[name].to(tensor.dtype))
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()


def _local_model_partition(module: nn.Module, zero_stage: int, process_index: int) -> dict[str, torch.Tensor]:
    """ZeRO-3: this process's shard of every parameter; ZeRO-0/1/2: the full weights, on rank 0 only."""
    if zero_stage == 3:
        return {name: p.ds_tensor.detach() for name, p in module.named_parameters() if hasattr(p, "ds_tensor")}
    if process_index != 0:
        return {}
    return {name: p.detach() for name, p in module.named_parameters()}


def _load_model_partition(module: nn.Module, saved: dict[str, torch.Tensor], zero_stage: int, process_index: int) -> None:
    with torch.no_grad():
        if zero_stage == 3:
            for name, p in module.named_parameters():
                if name in saved:
                    p.ds_tensor.copy_(saved[name])  # type: ignore[attr-defined]  # ZeRO-3 gives each parameter its shard
            return
        if process_index == 0:
            for name, p in module.named_parameters():
                if name in saved:
                    p.copy_(saved[name])
        for p in module.parameters():  # every process starts from rank 0's weights
            dist.broadcast(p.data, src=0)


def _checkpoint_event(optimizer: Any, which: str) -> None:
    hook = getattr(optimizer, f"checkpoint_event_{which}", None)
    if hook is not None:
        hook()


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _plain_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """The ZeRO optimizer's state dict with nothing that needs pickling: tensors, numbers, strings, lists, dicts.

    The loss scaler object becomes its numbers; the parameter slice mappings (rebuilt from the
    model on load) are left out.
    """
    plain: dict[str, Any] = {}
    for key, value in state.items():
        if key == "param_slice_mappings":
            continue
        if hasattr(value, "cur_scale"):
            plain[key] = {_LOSS_SCALER_KEY: {k: v for k, v in vars(value).items() if _scalar(v)}}
        elif isinstance(value, int) and not isinstance(value, bool):
            plain[key] = int(value)  # ZeRO's stage enum as a number
        else:
            plain[key] = value
    return plain


def _restore_optimizer_state(plain: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    restored = dict(plain)
    for key, value in plain.items():
        if isinstance(value, dict) and _LOSS_SCALER_KEY in value:
            scaler = optimizer.loss_scaler
            for name, number in value[_LOSS_SCALER_KEY].items():
                setattr(scaler, name, number)
            restored[key] = scaler
    if hasattr(optimizer, "_param_slice_mappings"):
        restored["param_slice_mappings"] = optimizer._param_slice_mappings
    return restored


def _tied_aliases(entries: dict[str, torch.Tensor], loaded: dict[str, torch.Tensor]) -> set[str]:
    """Names of tensors that share storage with a loaded name (tied weights are written once)."""
    by_id: dict[int, list[str]] = {}
    for name, tensor in entries.items():
        by_id.setdefault(id(tensor), []).append(name)
    return {name for names in by_id.values() if any(n in loaded for n in names) for name in names}
