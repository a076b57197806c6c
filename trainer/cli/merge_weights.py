"""``trainer merge-weights``: a sharded checkpoint's model as whole-tensor safetensors, ready for inference.

A checkpoint saved with ``state_dict_type="SHARDED_STATE_DICT"`` holds every process's shards of
every tensor (``sharded_state/``, see ``strategies.fsdp_checkpoint``). This command joins them on
one process, with no process group and no accelerator, and writes the model's weights:

- one ``model.safetensors`` when they fit in ``--max-shard-size``;
- otherwise ``model-00001-of-0000N.safetensors``... and a ``model.safetensors.index.json`` that
  maps each tensor to its file (the layout of transformers' ``save_pretrained``).

Either loads with ``load_checkpoint_and_dispatch``, the Inferencer, ``safetensors.torch.load_file``
and transformers' ``from_pretrained`` (next to the model's ``config.json``). Tensors are read one
output file at a time, so the memory used is about one file's worth, not the model's.

    trainer merge-weights outputs/run/checkpoints/checkpoint_3 outputs/run/merged --max-shard-size 2GB
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import save_file

from trainer.cli.errors import CliError
from trainer.strategies.deepspeed_checkpoint import find_partitions, load_partition_tensors, partition_tensor_specs
from trainer.strategies.fsdp_checkpoint import ShardedCheckpointError, find_sharded_state, load_full_tensors, model_tensor_specs

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class MergeError(CliError):
    """Weights that cannot be merged as asked; the message is one sentence for the user."""


def parse_size(text: str | int) -> int:
    """Bytes in ``"5GB"`` (10^9, as transformers counts), ``"500MiB"`` (2^20) or a plain number."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if match is None:
        raise MergeError(f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB, 2GiB or a number of bytes.")
    size = int(float(match.group(1)) * _UNITS[match.group(2) or ""])
    if size < 1:
        raise MergeError(f"--max-shard-size {text!r} must be at least one byte.")
    return size


def plan_files(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names per output file, in order: a new file starts when the next tensor would overflow this one."""
    files: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if files[-1] and used + size > max_bytes:
            files.append([])
            used = 0
        files[-1].append(name)
        used += size
    return files


def merge_weights(checkpoint: str | Path, output: str | Path, max_shard_size: str | int = "5GB",
                  dtype: str | torch.dtype | None = None, model_index: int = 0, overwrite: bool = False) -> list[Path]:
    """Write one model of a sharded checkpoint as safetensors under ``output``; return the files written.

    ``dtype`` casts the floating-point tensors (e.g. ``"bfloat16"`` halves an fp32 checkpoint).
    """
    if Path(output).exists() and not Path(output).is_dir():
        raise MergeError(f"{output} is a file; pass a folder to write the weights into (it is created if missing).")
    if not Path(checkpoint).is_dir():
        raise MergeError(f"No checkpoint folder at {checkpoint}; pass the checkpoint directory saved with "
                         "state_dict_type='SHARDED_STATE_DICT' (e.g. outputs/run/checkpoints/checkpoint_3).")
    folder = find_sharded_state(Path(checkpoint))
    zero = find_partitions(Path(checkpoint)) if folder is None else None
    if folder is None and zero is None:
        raise MergeError(f"{checkpoint} is not a sharded checkpoint (it has no sharded_state/sharded_state.json and no "
                         "DeepSpeed zero/meta.json); a checkpoint saved with state_dict_type='FULL_STATE_DICT' already "
                         "holds model.safetensors.")
    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise MergeError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype.lower()]
    output = Path(output)
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise MergeError(f"Cannot create the output folder {output}: {error.strerror}; pass another folder.") from None
    previous = sorted(p for p in output.iterdir() if p.name == INDEX or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors",
                                                                                      p.name))
    if previous and not overwrite:
        raise MergeError(f"{output} already holds weights ({', '.join(p.name for p in previous)}); choose an empty "
                         "folder, or pass --overwrite to replace them.")
    if zero is not None and model_index:
        raise MergeError(f"{checkpoint} is a DeepSpeed checkpoint, whose engine holds one model: use --model-index 0.")

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        return load_full_tensors(folder, names, model_index) if folder is not None else load_partition_tensors(
            cast(Path, zero), names)

    specs = model_tensor_specs(folder, model_index) if folder is not None else partition_tensor_specs(cast(Path, zero))

    def target_dtype(saved: torch.dtype) -> torch.dtype:
        return dtype if dtype is not None and saved.is_floating_point else saved

    sizes = {name: shape.numel() * torch.empty((), dtype=target_dtype(saved)).element_size()
             for name, (shape, saved) in specs.items()}
    files = plan_files(sizes, parse_size(max_shard_size))
    names = [SINGLE] if len(files) == 1 else [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    weight_map: dict[str, str] = {}
    written = []
    for file_name, tensor_names in zip(names, files, strict=True):
        tensors = read(tensor_names)
        tensors = {name: t.to(target_dtype(t.dtype)).contiguous() for name, t in tensors.items()}
        _save(tensors, output / file_name)
        written.append(output / file_name)
        weight_map.update(dict.fromkeys(tensor_names, file_name))
        del tensors
    if len(files) > 1:  # the index goes last: a folder with an index has all its shards
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        partial = output / (INDEX + ".partial")
        partial.write_text(json.dumps(index, indent=2) + "\n")
        os.replace(partial, output / INDEX)
        written.append(output / INDEX)
    for path in previous:  # with --overwrite, the old weights go only once the new ones are all written
        if path not in written:
            path.unlink()
    return written


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one file under a temporary name, renamed once complete: an interrupted merge leaves no partial weights."""
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(partial), metadata={"format": "pt"})
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise MergeError(f"Cannot write {path}: {error.strerror}; free some space or pass another output folder "
                         "(the checkpoint is untouched).") from None


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("merge-weights", help="write a sharded checkpoint's model as safetensors",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory saved with SHARDED_STATE_DICT (or its sharded_state folder)")
    parser.add_argument("output", help="the folder to write model.safetensors (or shards and an index) into")
    parser.add_argument("--max-shard-size", "--max_shard_size", default="5GB",
                        help="largest output file, e.g. 5GB (10^9 bytes), 500MB, 2GiB; larger models are split (default 5GB)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="cast floating-point weights to this dtype (default: as saved)")
    parser.add_argument("--model-index", "--model_index", type=int, default=0,
                        help="which prepared model, for checkpoints of several (default 0, the first)")
    parser.add_argument("--overwrite", action="store_true", help="replace weights already in the output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Merge, and say what was written."""
    try:
        written = merge_weights(args.checkpoint, args.output, args.max_shard_size, args.dtype, args.model_index,
                                args.overwrite)
    except ShardedCheckpointError as error:
        raise CliError(str(error)) from None
    total = sum(p.stat().st_size for p in written)
    print(f"wrote {len(written)} file(s), {total / 1e6:.1f} MB, to {args.output}: {', '.join(p.name for p in written)}")
    return 0
