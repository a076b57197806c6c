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
import pickle
import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from trainer.inference.tensor_reader import TensorLocation

__all__ = ["CheckpointError", "CheckpointFiles", "check_against_model"]

# Names a folder's weights go by, most preferred first (an index wins over a single file).
_FOLDER_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Files a training run writes next to the weights; never mistaken for the weights themselves.
_NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state.pth"}
# safetensors refuses headers above 100 MB; a larger length field means the first 8 bytes are not one.
_MAX_HEADER = 100_000_000
# With the mmap backend, every page read stays resident until the file is closed, so a handle is
# renewed once this many bytes were read through it (pread reads keep nothing).
_MMAP_REOPEN_BYTES = 64 * 2**20
_LIST_LIMIT = 20

_DTYPES: dict[str, torch.dtype] = {
    name: dtype
    for name, dtype in {
        "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
        "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
        "F64": torch.float64, "C64": torch.complex64,
        "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None), "U64": getattr(torch, "uint64", None),
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None), "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    }.items()
    if dtype is not None
}

# None until the first open tells whether this safetensors accepts backend="pread".
_PREAD: bool | None = None


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is: the message names the file, the problem and the fix.

    From ``check_against_model`` it also carries the full, sorted ``missing``, ``unexpected`` and
    ``mismatched`` lists (the message shows only the first few of each).
    """

    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[str] = []


@dataclass(frozen=True)
class _TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    offset: int  # the byte in its file where the data starts (safetensors) or its position in the state dict (torch)


@dataclass
class _ShardInfo:
    safetensors: bool
    tensors: dict[str, _TensorInfo]  # every tensor in the file, in file order
    nbytes: int
    metadata: dict[str, Any]


def _listing(items: Iterable[str], limit: int = _LIST_LIMIT) -> str:
    """``a, b, c`` or ``a, b, ... and 7 more``: errors stay readable for models with thousands of tensors."""
    items = list(items)
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _lfs_pointer(path: Path) -> None:
    """A Git LFS pointer left in place of the weights is the most common 'corrupt' checkpoint."""
    with open(path, "rb") as f:
        head = f.read(32)
    if head.startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{path} is a Git LFS pointer, not the weights it stands for; fetch the real file "
                              "(git lfs pull, or download it again).")


# --- safetensors ------------------------------------------------------------------------------------


def _read_safetensors_header(path: Path) -> _ShardInfo:
    """Names, shapes, dtypes and sizes from the header alone, with every size checked against the file's.

    The header is 8 bytes of little-endian length followed by that much JSON; tensor data follows
    and must end exactly where the largest ``data_offsets`` end says. Checking this up front turns a
    cut-short download into a clear error here rather than a crash when the last layer is read.
    """
    size = path.stat().st_size
    _lfs_pointer(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is truncated: it is {size} bytes, too short even for a safetensors header; "
                                  "download or copy it again.")
        length = int.from_bytes(head, "little")
        if length > _MAX_HEADER:
            raise CheckpointError(f"{path} has a corrupt safetensors header: its first 8 bytes give a header length of "
                                  f"{length} bytes, which no safetensors file has; the file is damaged or not safetensors, "
                                  "so download or re-save it.")
        if length > size - 8:
            raise CheckpointError(f"{path} is truncated: its header alone should be {length} bytes but only {size - 8} "
                                  "follow the length field; download or copy it again.")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header: it is not valid JSON ({e}); the file is "
                              "damaged, so download or re-save it.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header: it is JSON but not an object of tensors; "
                              "the file is damaged, so download or re-save it.")

    metadata = header.pop("__metadata__", None)
    tensors: dict[str, _TensorInfo] = {}
    end_max = 0
    for name, entry in header.items():
        try:
            dtype_name, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (isinstance(dtype_name, str) and isinstance(shape, list)
                  and all(type(d) is int and d >= 0 for d in (*shape, start, end)) and start <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(f"{path} has a corrupt safetensors header: the entry for tensor {name!r} is malformed "
                                  f"({json.dumps(entry)[:200]}); the file is damaged, so download or re-save it.")
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"{path} stores tensor {name!r} as {dtype_name}, a dtype this torch {torch.__version__} "
                                  "cannot hold; upgrade torch or convert the checkpoint to a supported dtype.")
        numel = 1
        for d in shape:
            numel *= d
        if numel * dtype.itemsize != end - start:
            raise CheckpointError(f"{path} has a corrupt safetensors header: tensor {name!r} is {dtype_name} {tuple(shape)} "
                                  f"({numel * dtype.itemsize} bytes) but its data_offsets span {end - start} bytes; the "
                                  "file is damaged, so download or re-save it.")
        tensors[name] = _TensorInfo(tuple(shape), dtype, end - start, 8 + length + start)
        end_max = max(end_max, end)

    data = size - 8 - length
    if data < end_max:
        raise CheckpointError(f"{path} is truncated: its header describes {8 + length + end_max} bytes but the file has "
                              f"{size} ({end_max - data} missing); download or copy it again.")
    if data > end_max:
        raise CheckpointError(f"{path} is corrupt: it has {data - end_max} bytes after the last tensor its header "
                              "describes, so the header and the data disagree; download or re-save it.")
    try:  # safetensors' own checks (overlapping or out-of-order offsets), with its message inside ours
        with safe_open(str(path), framework="pt", device="cpu"):
            pass
    except Exception as e:
        raise CheckpointError(f"{path} is not a valid safetensors file (safetensors says: {e}); download or re-save "
                              "it.") from None
    ordered = dict(sorted(tensors.items(), key=lambda item: item[1].offset))
    meta = metadata if isinstance(metadata, dict) else {}
    return _ShardInfo(safetensors=True, tensors=ordered, nbytes=end_max, metadata=meta)


def _open_safetensors(path: Path) -> Any:
    """A ``safe_open`` handle, with the pread backend where this safetensors has it.

    The default backend memory-maps the file and every page read stays in this process's resident
    memory until the handle closes; pread copies each tensor out and keeps nothing, so iterating a
    shard costs about one tensor of memory. Older safetensors have only the mmap backend, and
    ``_SafetensorsReader`` renews those handles as it goes instead.
    """
    global _PREAD
    if _PREAD is not False:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu", backend="pread")
            _PREAD = True
            return handle
        except Exception:
            if _PREAD:  # pread works here, so the file itself is the problem
                raise
    handle = safe_open(str(path), framework="pt", device="cpu")
    _PREAD = False
    return handle


class _SafetensorsReader:
    """Reads tensors of one safetensors file, renewing an mmap handle so its resident pages stay bounded."""

    def __init__(self, path: Path):
        self.path = path
        self._handle: Any = None
        self._read = 0

    def get(self, name: str, nbytes: int) -> torch.Tensor:
        if self._handle is not None and not _PREAD and self._read and self._read + nbytes > _MMAP_REOPEN_BYTES:
            self.close()
        try:
            if self._handle is None:
                self._handle = _open_safetensors(self.path)
                self._read = 0
            tensor = self._handle.get_tensor(name)
        except Exception as e:
            self.close()
            raise CheckpointError(f"Reading tensor {name!r} from {self.path} failed ({e}); the file changed or was damaged "
                                  "after it was opened, so download or re-save it.") from None
        self._read += nbytes
        return tensor

    def close(self) -> None:
        """Unmap now rather than whenever the handle is collected (tensors already read stay valid)."""
        handle, self._handle = self._handle, None
        if handle is not None:
            handle.__exit__(None, None, None)


# --- torch files ------------------------------------------------------------------------------------


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    """A torch-saved state dict, memory-mapped, with nothing unpickled beyond tensors and plain containers."""
    _lfs_pointer(path)
    with open(path, "rb") as f:
        head = f.read(4)
    try:
        state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"a {found.group(1)} object" if found else "objects other than tensors and plain containers"
        raise CheckpointError(f"{path} needs pickle beyond torch.load(weights_only=True): it contains {what}, and "
                              "unpickling that could run code; if you trust its source, load it once with weights_only=False "
                              "and save just the tensors (torch.save(model.state_dict(), ...), or safetensors).") from None
    except Exception as e:
        if head[:1] == b"\x80":  # a bare pickle: torch's format before zip files
            raise CheckpointError(f"{path} is in torch's legacy (pre-1.6) format, which cannot be memory-mapped; re-save it "
                                  "with a current torch.save or convert it to safetensors.") from None
        if not head.startswith(b"PK\x03\x04"):
            raise CheckpointError(f"{path} is neither a torch checkpoint nor a safetensors file; check that the path "
                                  "points at the weights.") from None
        reason = str(e).split(". ")[0]
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({reason}); it is probably truncated or "
                              "corrupt, so download or copy it again.") from None
    if isinstance(state, Mapping) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        return dict(state)
    if isinstance(state, Mapping):
        nested = [k for k, v in state.items() if isinstance(v, Mapping) and any(torch.is_tensor(t) for t in v.values())]
        if nested:
            raise CheckpointError(f"{path} holds a training checkpoint, not a flat state dict (the weights are under "
                                  f"{nested[0]!r}); save checkpoint[{nested[0]!r}] on its own and load that file.")
        others = [str(k) for k, v in state.items() if not (isinstance(k, str) and torch.is_tensor(v))]
        raise CheckpointError(f"{path} is not a state dict of tensors (entries {_listing(others, 5)} are not tensors); "
                              "save model.state_dict() and load that file.")
    raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; save model.state_dict() "
                          "and load that file.")


def _torch_info(state: dict[str, torch.Tensor]) -> _ShardInfo:
    tensors = {name: _TensorInfo(tuple(t.shape), t.dtype, t.numel() * t.element_size(), i)
               for i, (name, t) in enumerate(state.items())}
    storages: dict[int, int] = {}  # tied weights share a storage, which the file holds once
    for t in state.values():
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return _ShardInfo(safetensors=False, tensors=tensors, nbytes=sum(storages.values()), metadata={})


def _is_safetensors_file(path: Path) -> bool:
    """By suffix, else by content: a torch file is a zip (or a legacy pickle), safetensors starts with a length and '{'."""
    if path.name.endswith(".safetensors"):
        return True
    if path.name.endswith(_TORCH_SUFFIXES):
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    return not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80") and head[8:9] == b"{"


# --- the checkpoint ---------------------------------------------------------------------------------


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
        self._shard_info: dict[Path, _ShardInfo] = {}
        self._info: dict[str, _TensorInfo] = {}
        self._readers: OrderedDict[Path, _SafetensorsReader] = OrderedDict()
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
        for name in _FOLDER_FILES:
            if (folder / name).is_file():
                return folder / name
        entries = sorted(e.name for e in folder.iterdir())
        indexes = [n for n in entries if n.endswith(".index.json") and (folder / n).is_file()]
        if len(indexes) == 1:
            return folder / indexes[0]
        weights = [n for n in entries if (folder / n).is_file() and n not in _NOT_WEIGHTS
                   and (n.endswith(".safetensors") or n.endswith(_TORCH_SUFFIXES))]
        safetensors = [n for n in weights if n.endswith(".safetensors")]
        for group in (safetensors, weights):
            if len(group) == 1:
                return folder / group[0]
        if len(indexes) > 1:
            raise CheckpointError(f"Checkpoint folder {folder} has several index files ({_listing(indexes)}); pass the "
                                  "path of the one to load.")
        if len(weights) > 1:
            raise CheckpointError(f"Checkpoint folder {folder} has several weight files ({_listing(weights)}) and no index "
                                  "JSON; pass one file's path, or add an index (model.safetensors.index.json) that maps "
                                  "each tensor name to its file.")
        found = f"it holds {_listing(entries)}" if entries else "it is empty"
        raise CheckpointError(f"Checkpoint folder {folder} has no recognisable checkpoint ({found}); expected one of "
                              f"{', '.join(_FOLDER_FILES)} (or a single .safetensors/.bin file), so check the path or "
                              "finish the download.")

    def _read_shard(self, shard: Path) -> _ShardInfo:
        if _is_safetensors_file(shard):
            return _read_safetensors_header(shard)
        return _torch_info(_load_torch(shard))  # mapped, not read: only the pickled structure is loaded

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
            raise CheckpointError(f"Index file {index} maps tensors to invalid shard names ({_listing(bad, 5)}); shards "
                                  "must be file names in the index's folder, so download the index again.")
        meta = content.get("metadata")
        self.metadata = dict(meta) if isinstance(meta, dict) else {}

        shards = list(dict.fromkeys(folder / name for name in weight_map.values()))
        missing = [s for s in shards if not s.is_file()]
        if missing:
            count = sum(1 for v in weight_map.values() if folder / v in missing)
            raise CheckpointError(f"Index file {index} names {len(missing)} shard file(s) missing from {folder}: "
                                  f"{_listing(s.name for s in missing)} (holding {count} tensors); the download is "
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
            raise CheckpointError(f"Index file {index} lists tensors that its shards do not hold: {_listing(absent)}; the "
                                  "index and the shards come from different checkpoints, so download them again together.")

    # queries ----------------------------------------------------------------------------------------

    def _tensor(self, name: str) -> _TensorInfo:
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
        raise KeyError(f"{shard} is not a file of checkpoint {self.path} (its files: {_listing(s.name for s in self.shards)})")

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

    def _reader(self, shard: Path) -> _SafetensorsReader:
        reader = self._readers.pop(shard, None) or _SafetensorsReader(shard)
        self._readers[shard] = reader
        while len(self._readers) > 2:  # a dispatcher reads shard by shard; older handles are done
            self._readers.popitem(last=False)[1].close()
        return reader

    def _torch_state(self, shard: Path) -> dict[str, torch.Tensor]:
        if self._torch_cache is None or self._torch_cache[0] != shard:
            self._torch_cache = None  # let the previous mapping go before the next one is made
            self._torch_cache = (shard, _load_torch(shard))
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
                raise KeyError(f"{path} does not hold {_listing(stray)} in checkpoint {self.path}")
            listed = [n for n in listed if n in wanted]
        return self._iter_torch(path, listed) if not info.safetensors else self._iter_safetensors(path, listed)

    def _iter_torch(self, path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        cache = self._torch_cache
        state = cache[1] if cache is not None and cache[0] == path else _load_torch(path)  # mapped: read as used
        for name in names:
            yield name, state[name]

    def _iter_safetensors(self, path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        reader = _SafetensorsReader(path)  # its own handle, released when the iteration ends or is dropped
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
                        strict: bool = True, ignore: Iterable[str] = ()) -> None:
    """Raise one ``CheckpointError`` listing every way the checkpoint and the model disagree, before loading starts.

    ``expected`` maps each model tensor name to ``(shape, dtype)``. Missing keys (in the model, not
    the checkpoint) and shape mismatches are always errors; unexpected keys (only in the checkpoint)
    are errors when ``strict``. ``ignore`` holds names or shell-style patterns (``"*.attn.bias"``) left
    out on both sides, such as a tied ``lm_head.weight`` saved once. Dtypes may differ: loading casts.
    All problems are reported together so that one run shows everything to fix.
    """
    patterns = list(ignore)

    def kept(name: str) -> bool:
        return not any(fnmatch.fnmatchcase(name, p) for p in patterns)

    model = {n: (tuple(shape), dtype) for n, (shape, dtype) in expected.items() if kept(n)}
    stored = {n for n in files.names() if kept(n)}
    missing = sorted(set(model) - stored)
    unexpected = sorted(stored - set(model)) if strict else []
    mismatched = sorted(f"{n}: checkpoint {files.shape(n)} vs model {model[n][0]}"
                        for n in stored & set(model) if files.shape(n) != model[n][0])
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s) (in the model, not the checkpoint): {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) (in the checkpoint, not the model): {_listing(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
    hint = _prefix_hint(missing, sorted(stored - set(model)))
    if not hint and mismatched:
        hint = "did you build the model from the same config as the checkpoint?"
    if not hint:
        hint = ("did you build the model from the same config as the checkpoint? A weight saved once for tied parameters "
                "(such as lm_head.weight) belongs in ignore.")
    error = CheckpointError(f"Checkpoint {files.path} does not match the model: " + "; ".join(parts) + f". Hint: {hint}")
    error.missing, error.unexpected, error.mismatched = missing, unexpected, mismatched
    raise error
