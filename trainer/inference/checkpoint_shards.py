"""One checkpoint file: its safetensors header read and checked up front, its tensors read one at a time.

A damaged file (cut short, a corrupt header, a Git LFS pointer instead of the weights, a pickle
that needs code to load) is a ``CheckpointError`` naming the file, what is wrong and the fix.
Torch files (``.bin``, ``.pt``) are only ever read with ``torch.load(weights_only=True, mmap=True)``:
nothing in a checkpoint can run code, and the file is memory-mapped rather than read into memory.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

# Names a folder's weights go by, most preferred first (an index wins over a single file).
FOLDER_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Files a training run writes next to the weights; never mistaken for the weights themselves.
NOT_WEIGHTS = {"training_args.bin", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt", "rng_state.pth"}
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
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    offset: int  # the byte in its file where the data starts (safetensors) or its position in the state dict (torch)


@dataclass
class ShardInfo:
    safetensors: bool
    tensors: dict[str, TensorInfo]  # every tensor in the file, in file order
    nbytes: int
    metadata: dict[str, Any]


def listing(items: Iterable[str], limit: int = _LIST_LIMIT) -> str:
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


def read_safetensors_header(path: Path) -> ShardInfo:
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
    tensors: dict[str, TensorInfo] = {}
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
        tensors[name] = TensorInfo(tuple(shape), dtype, end - start, 8 + length + start)
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
    return ShardInfo(safetensors=True, tensors=ordered, nbytes=end_max, metadata=meta)


def _open_safetensors(path: Path) -> Any:
    """A ``safe_open`` handle, with the pread backend where this safetensors has it.

    The default backend memory-maps the file and every page read stays in this process's resident
    memory until the handle closes; pread copies each tensor out and keeps nothing, so iterating a
    shard costs about one tensor of memory. Older safetensors have only the mmap backend, and
    ``SafetensorsReader`` renews those handles as it goes instead.
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


class SafetensorsReader:
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


def load_torch(path: Path) -> dict[str, torch.Tensor]:
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
        raise CheckpointError(f"{path} is not a state dict of tensors (entries {listing(others, 5)} are not tensors); "
                              "save model.state_dict() and load that file.")
    raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors; save model.state_dict() "
                          "and load that file.")


def torch_info(state: dict[str, torch.Tensor]) -> ShardInfo:
    tensors = {name: TensorInfo(tuple(t.shape), t.dtype, t.numel() * t.element_size(), i)
               for i, (name, t) in enumerate(state.items())}
    storages: dict[int, int] = {}  # tied weights share a storage, which the file holds once
    for t in state.values():
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return ShardInfo(safetensors=False, tensors=tensors, nbytes=sum(storages.values()), metadata={})


def is_safetensors_file(path: Path) -> bool:
    """By suffix, else by content: a torch file is a zip (or a legacy pickle), safetensors starts with a length and '{'."""
    if path.name.endswith(".safetensors"):
        return True
    if path.name.endswith(TORCH_SUFFIXES):
        return False
    with open(path, "rb") as f:
        head = f.read(9)
    return not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80") and head[8:9] == b"{"


# --- the checkpoint ---------------------------------------------------------------------------------


