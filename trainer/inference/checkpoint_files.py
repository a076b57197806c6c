"""Checkpoint files for big-model loading: find the tensors, know their shapes, read them one at a time.

Loading a model that barely fits means never holding the whole checkpoint in memory. This module
resolves a checkpoint on disk (one file, or a folder of shards with an index), reads every
safetensors header up front so that names, shapes, dtypes and sizes are known before a single
weight is read, and then reads tensors one at a time. Damaged checkpoints (cut-short downloads,
missing shards, corrupt headers, pickles that need code to load) are reported at construction,
each by a ``CheckpointError`` that names the file, says what is wrong and how to fix it, instead
of failing halfway through placing a model's weights.

Torch files (``.bin``, ``.pt``) are only ever read with ``torch.load(weights_only=True, mmap=True)``:
nothing in a checkpoint can run code, and the file is memory-mapped rather than read into memory.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from trainer.inference.checkpoint_shards import (  # noqa: F401  (CheckpointError: re-exported)
    FOLDER_FILES,
    NOT_WEIGHTS,
    TORCH_SUFFIXES,
    CheckpointError,
    SafetensorsReader,
    ShardInfo,
    TensorInfo,
    is_safetensors_file,
    listing,
    load_torch,
    read_safetensors_header,
    torch_info,
)
from trainer.inference.tensor_reader import TensorLocation

__all__ = ["CheckpointError", "CheckpointFiles", "check_against_model"]

class CheckpointFiles:
    """A checkpoint on disk, in any of these layouts:

    - one ``.safetensors`` file;
    - a folder with an index JSON (``model.safetensors.index.json`` or ``pytorch_model.bin.index.json``:
      ``{"metadata": {...}, "weight_map": {tensor name: shard file name}}``), shards in that folder;
      the index file's own path works too;
    - a folder with a single ``model.safetensors`` (or ``pytorch_model.bin``) and no index;
    - one ``.bin`` / ``.pt`` file, a torch-saved state dict, loaded only with
      ``torch.load(weights_only=True, mmap=True, map_location="cpu")``.

    Construction resolves the layout and reads every safetensors header (not the data) and maps
    every torch file, so a damaged checkpoint fails here, before any weight is placed. Tensors are
    then read one at a time; ``close()`` (or leaving a ``with`` block) releases open files, and the
    object reopens them if used again.
    """

    path: Path
    shards: list[Path]
    weight_map: dict[str, Path]
    metadata: dict[str, Any]

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self._shard_info: dict[Path, ShardInfo] = {}
        self._info: dict[str, TensorInfo] = {}
        self._readers: OrderedDict[Path, SafetensorsReader] = OrderedDict()
        self._torch_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self.metadata = {}
        p = self.path
        if not p.exists():
            if p.is_symlink():
                raise CheckpointError(f"Checkpoint path {p} is a broken link (to {os.readlink(p)}); download the checkpoint "
                                      "again.")
            raise CheckpointError(f"Checkpoint path {p} does not exist; check the path, or download the checkpoint first.")
        if p.is_dir():
            p = self._find_in_folder(p)
        if p.name.endswith(".index.json"):
            self._load_index(p)
        else:
            self._load_single(p)

    # layout -----------------------------------------------------------------------------------------

    def _find_in_folder(self, folder: Path) -> Path:
        for name in FOLDER_FILES:
            if (folder / name).is_file():
                return folder / name
        entries = sorted(e.name for e in folder.iterdir())
        indexes = [n for n in entries if n.endswith(".index.json") and (folder / n).is_file()]
        if len(indexes) == 1:
            return folder / indexes[0]
        weights = [n for n in entries if (folder / n).is_file() and n not in NOT_WEIGHTS
                   and (n.endswith(".safetensors") or n.endswith(TORCH_SUFFIXES))]
        safetensors = [n for n in weights if n.endswith(".safetensors")]
        for group in (safetensors, weights):
            if len(group) == 1:
                return folder / group[0]
        if len(indexes) > 1:
            raise CheckpointError(f"Checkpoint folder {folder} has several index files ({listing(indexes)}); pass the "
                                  "path of the one to load.")
        if len(weights) > 1:
            raise CheckpointError(f"Checkpoint folder {folder} has several weight files ({listing(weights)}) and no index "
                                  "JSON; pass one file's path, or add an index (model.safetensors.index.json) that maps "
                                  "each tensor name to its file.")
        found = f"it holds {listing(entries)}" if entries else "it is empty"
        raise CheckpointError(f"Checkpoint folder {folder} has no recognisable checkpoint ({found}); expected one of "
                              f"{', '.join(FOLDER_FILES)} (or a single .safetensors/.bin file), so check the path or "
                              "finish the download.")

    def _read_shard(self, shard: Path) -> ShardInfo:
        if is_safetensors_file(shard):
            return read_safetensors_header(shard)
        return torch_info(load_torch(shard))  # mapped, not read: only the pickled structure is loaded

    def _load_single(self, file: Path) -> None:
        info = self._read_shard(file)
        self.shards = [file]
        self._shard_info[file] = info
        self._info = dict(info.tensors)
        self.weight_map = dict.fromkeys(info.tensors, file)
        self.metadata = dict(info.metadata)

    def _load_index(self, index: Path) -> None:
        folder = index.parent
        try:
            content = json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"Index file {index} is not valid JSON ({e}); the file is damaged, so download it "
                                  "again.") from None
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"Index file {index} has no \"weight_map\" object mapping tensor names to shard files; "
                                  "it is damaged or not a checkpoint index, so download it again.")
        bad = [f"{k!r}: {v!r}" for k, v in weight_map.items() if not isinstance(v, str) or not _inside(v)]
        if bad:
            raise CheckpointError(f"Index file {index} maps tensors to invalid shard names ({listing(bad, 5)}); shards "
                                  "must be file names in the index's folder, so download the index again.")
        meta = content.get("metadata")
        self.metadata = dict(meta) if isinstance(meta, dict) else {}

        shards = list(dict.fromkeys(folder / name for name in weight_map.values()))
        missing = [s for s in shards if not s.is_file()]
        if missing:
            count = sum(1 for v in weight_map.values() if folder / v in missing)
            raise CheckpointError(f"Index file {index} names {len(missing)} shard file(s) missing from {folder}: "
                                  f"{listing(s.name for s in missing)} (holding {count} tensors); the download is "
                                  "incomplete, so download the missing files again.")
        for shard in shards:
            self._shard_info[shard] = self._read_shard(shard)
        self.shards = shards
        self.weight_map = {}
        absent = []
        for name, file in weight_map.items():
            shard = folder / file
            info = self._shard_info[shard].tensors.get(name)
            if info is None:
                absent.append(f"{name} (in {file})")
                continue
            self.weight_map[name] = shard
            self._info[name] = info
        if absent:
            raise CheckpointError(f"Index file {index} lists tensors that its shards do not hold: {listing(absent)}; the "
                                  "index and the shards come from different checkpoints, so download them again together.")

    # queries ----------------------------------------------------------------------------------------

    def _tensor(self, name: str) -> TensorInfo:
        try:
            return self._info[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in checkpoint {self.path}") from None

    def location(self, name: str) -> TensorLocation:
        """Where a tensor's bytes lie in its safetensors file, for reading it alone with ``pread``."""
        info, path = self._tensor(name), self.weight_map[name]
        if not self.is_safetensors(path):
            raise ValueError(f"{name!r} is in {path}, a torch file: its bytes have no fixed place to read; use iter_shard.")
        return TensorLocation(path, info.offset, info.offset + info.nbytes, info.dtype, info.shape)

    def _shard(self, shard: str | os.PathLike) -> Path:
        """The known shard ``shard`` names: its path as in ``shards``, or just its file name."""
        path = Path(shard)
        if path in self._shard_info:
            return path
        named = [s for s in self.shards if s.name == path.name]
        if len(named) == 1 and (path.name == str(shard) or path.resolve() == named[0].resolve()):
            return named[0]
        raise KeyError(f"{shard} is not a file of checkpoint {self.path} (its files: {listing(s.name for s in self.shards)})")

    def names(self) -> list[str]:
        """Every tensor name, in index order (file order for a single file)."""
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensor(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._tensor(name).dtype

    def nbytes(self, name: str) -> int:
        """Bytes of the tensor's data, known without reading it (what placing it will cost)."""
        return self._tensor(name).nbytes

    def shard_nbytes(self, shard: str | os.PathLike) -> int:
        """Bytes of tensor data in that file (storages shared by tied weights counted once)."""
        return self._shard_info[self._shard(shard)].nbytes

    def is_safetensors(self, shard: str | os.PathLike) -> bool:
        return self._shard_info[self._shard(shard)].safetensors

    def __contains__(self, name: object) -> bool:
        return name in self.weight_map

    def __len__(self) -> int:
        return len(self.weight_map)

    def __repr__(self) -> str:
        return f"CheckpointFiles({str(self.path)!r}, {len(self.shards)} file(s), {len(self.weight_map)} tensors)"

    # reading ----------------------------------------------------------------------------------------

    def _reader(self, shard: Path) -> SafetensorsReader:
        reader = self._readers.pop(shard, None) or SafetensorsReader(shard)
        self._readers[shard] = reader
        while len(self._readers) > 2:  # a dispatcher reads shard by shard; older handles are done
            self._readers.popitem(last=False)[1].close()
        return reader

    def _torch_state(self, shard: Path) -> dict[str, torch.Tensor]:
        if self._torch_cache is None or self._torch_cache[0] != shard:
            self._torch_cache = None  # let the previous mapping go before the next one is made
            self._torch_cache = (shard, load_torch(shard))
        return self._torch_cache[1]

    def get_tensor(self, name: str) -> torch.Tensor:
        """One tensor, read on its own (safetensors) or from the memory-mapped torch file (kept mapped until close)."""
        info = self._tensor(name)
        shard = self.weight_map[name]
        if self._shard_info[shard].safetensors:
            return self._reader(shard).get(name, info.nbytes)
        return self._torch_state(shard)[name]

    def iter_shard(self, shard: str | os.PathLike, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for the tensors of one file (all of them, or ``names``), each once, in file order.

        Tensors are read lazily, one per step, so a caller that places each tensor and drops it
        holds about one tensor of memory for safetensors, and at most one shard for torch files.
        """
        path = self._shard(shard)
        info = self._shard_info[path]
        listed = [n for n in info.tensors if self.weight_map.get(n) == path]
        if names is not None:
            wanted = set(names)
            stray = sorted(wanted.difference(listed))
            if stray:
                raise KeyError(f"{path} does not hold {listing(stray)} in checkpoint {self.path}")
            listed = [n for n in listed if n in wanted]
        return self._iter_torch(path, listed) if not info.safetensors else self._iter_safetensors(path, listed)

    def _iter_torch(self, path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        cache = self._torch_cache
        state = cache[1] if cache is not None and cache[0] == path else load_torch(path)  # mapped: read as used
        for name in names:
            yield name, state[name]

    def _iter_safetensors(self, path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        reader = SafetensorsReader(path)  # its own handle, released when the iteration ends or is dropped
        tensors = self._shard_info[path].tensors
        try:
            for name in names:
                yield name, reader.get(name, tensors[name].nbytes)
        finally:
            reader.close()

    def close(self) -> None:
        """Release open files and mappings; reading again reopens them."""
        while self._readers:
            self._readers.popitem()[1].close()
        self._torch_cache = None

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _inside(name: str) -> bool:
    """An index's shard name stays inside the index's folder (no absolute paths, no '..')."""
    normal = os.path.normpath(name)
    return bool(name) and not os.path.isabs(name) and normal != ".." and not normal.startswith(".." + os.sep)


# --- comparing with a model -------------------------------------------------------------------------


def _prefix_hint(missing: list[str], unexpected: list[str]) -> str:
    """When every name differs by one leading module name (``model.``, ``transformer.``), say which."""
    for short, long, side in ((missing, unexpected, "checkpoint"), (unexpected, missing, "model")):
        if not short or not long:
            continue
        prefixes = {n.split(".", 1)[0] + "." for n in long if "." in n}
        for prefix in prefixes:
            if all(prefix + n in long for n in short[:200]):
                other = "model" if side == "checkpoint" else "checkpoint"
                return (f"the {side}'s names start with {prefix!r} where the {other}'s do not: load into the matching "
                        "submodule or strip that prefix from the names.")
    return ""


def check_against_model(files: CheckpointFiles, expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                        strict: bool = True, ignore: Iterable[str] = (), missing_ok: bool = False
                        ) -> tuple[list[str], list[str]]:
    """Raise one ``CheckpointError`` listing every way the checkpoint and the model disagree, before loading starts.

    ``expected`` maps each model tensor name to ``(shape, dtype)``. Shape mismatches are always
    errors; missing keys (in the model, not the checkpoint) unless ``missing_ok``; unexpected keys
    (only in the checkpoint) when ``strict``. ``ignore`` holds names or shell-style patterns
    (``"*.attn.bias"``) left out on both sides, such as a tied ``lm_head.weight`` saved once. Dtypes
    may differ: loading casts. All problems are reported together so that one run shows everything
    to fix. Returns the keys only in the model and only in the checkpoint (what was let through).
    """
    patterns = list(ignore)

    def kept(name: str) -> bool:
        return not any(fnmatch.fnmatchcase(name, p) for p in patterns)

    model = {n: (tuple(shape), dtype) for n, (shape, dtype) in expected.items() if kept(n)}
    stored = {n for n in files.names() if kept(n)}
    only_model, only_stored = sorted(set(model) - stored), sorted(stored - set(model))
    missing = [] if missing_ok else only_model
    unexpected = only_stored if strict else []
    mismatched = sorted(f"{n}: checkpoint {files.shape(n)} vs model {model[n][0]}"
                        for n in stored & set(model) if files.shape(n) != model[n][0])
    if not (missing or unexpected or mismatched):
        return only_model, only_stored
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) (in the model, not the checkpoint): {listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) (in the checkpoint, not the model): {listing(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {listing(mismatched)}")
    hint = _prefix_hint(missing, only_stored)
    if not hint and mismatched:
        hint = "did you build the model from the same config as the checkpoint?"
    if not hint:
        hint = ("did you build the model from the same config as the checkpoint? A weight saved once for tied parameters "
                "(such as lm_head.weight) belongs in ignore.")
    error = CheckpointError(f"Checkpoint {files.path} does not match the model: " + "; ".join(parts) + f". Hint: {hint}")
    error.missing, error.unexpected, error.mismatched = missing, unexpected, mismatched
    raise error
