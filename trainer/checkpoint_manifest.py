"""``manifest.json``: every file of a checkpoint with its size and checksum, checked before a load.

``save_state`` writes the manifest last, on the main process, once every process's files (and the
files of ``before_commit`` callbacks, and a strategy's own sharded files) are in the scratch folder,
so it covers the whole folder, recursively. ``load_state`` compares the folder with it before
anything is read: a changed byte, a file cut short, missing or added is one ``CheckpointError``
naming the checkpoint and the file. The checksum is XXH3-128 (``xxhash``): about 10 GB/s on one
core, so checking costs little next to reading the files from disk. Checkpoints written before
manifests existed have none and load without the check; ``verify=False`` or
``TRAINER_VERIFY_CHECKPOINTS=0`` skips it.
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import xxhash

from trainer.checkpoint_errors import CheckpointError, error_report, raise_agreed

MANIFEST = "manifest.json"
FORMAT = "trainer-checkpoint-manifest"
FORMAT_VERSION = 1
ALGORITHM = "xxh3_128"
ENVIRONMENT_SWITCH = "TRAINER_VERIFY_CHECKPOINTS"
_OFF, _ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on", "")
_LISTED = 5


def verification_enabled(verify: bool) -> bool:
    """``verify``, unless ``TRAINER_VERIFY_CHECKPOINTS`` turns checking off (either switch does)."""
    value = os.environ.get(ENVIRONMENT_SWITCH, "").strip().lower()
    if value not in _OFF + _ON:
        raise ValueError(f"{ENVIRONMENT_SWITCH}={os.environ[ENVIRONMENT_SWITCH]!r} is not a switch: set it to 0 to load "
                         "checkpoints without checking them against their manifest, or 1 (the default) to check.")
    return verify and value not in _OFF


def file_checksum(path: Path) -> str:
    """The XXH3-128 checksum of a file's bytes, read through a memory map (no copy)."""
    with open(path, "rb") as file:
        if os.fstat(file.fileno()).st_size == 0:
            return xxhash.xxh3_128(b"").hexdigest()
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
            return xxhash.xxh3_128(view).hexdigest()


def checkpoint_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (recursively, as ``/``-separated relative paths), the manifest excepted."""
    return sorted(path.relative_to(folder).as_posix() for path in Path(folder).rglob("*")
                  if path.is_file() and path.relative_to(folder).as_posix() != MANIFEST)


def write_manifest(folder: Path) -> None:
    """Record the size and checksum of every file in ``folder``; called last, on the main process."""
    folder = Path(folder)
    files = {name: {"bytes": (folder / name).stat().st_size, ALGORITHM: file_checksum(folder / name)}
             for name in checkpoint_files(folder)}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "algorithm": ALGORITHM, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(folder: Path) -> dict[str, dict[str, Any]] | None:
    """The files a checkpoint's manifest lists (name -> bytes and checksum); None when it has no manifest."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    fix = f"load an earlier checkpoint, or pass verify=False to load_state() to load {folder} unchecked"
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"The checkpoint {folder} has a damaged {MANIFEST} (not valid JSON: {error}), so its files "
                              f"cannot be checked; {fix}.") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    valid = isinstance(files, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get(ALGORITHM), str)
        for entry in files.values())
    if not valid or manifest.get("format") != FORMAT:
        raise CheckpointError(f"The checkpoint {folder} has a damaged {MANIFEST}: it is not a list of files with their "
                              f"sizes and {ALGORITHM} checksums; {fix}.")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"The checkpoint {folder} has a {MANIFEST} of version {manifest['format_version']}; this "
                              f"release reads up to version {FORMAT_VERSION}. Upgrade trainer-kit, or pass verify=False.")
    return files


def manifest_problems(folder: Path, files: dict[str, dict[str, Any]], process_index: int = 0,
                      num_processes: int = 1) -> list[str]:
    """What differs between ``folder`` and its manifest, one line per file; this process's share of the files.

    The listed files are split between the processes (each checks every ``num_processes``-th);
    process 0 also looks for files the manifest does not list.
    """
    folder = Path(folder)
    problems = []
    for name in sorted(files)[process_index::num_processes]:
        entry, path = files[name], folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            cut = "cut short" if size < entry["bytes"] else "longer than saved"
            problems.append(f"{name} is {size:,} bytes, {cut} (it was saved with {entry['bytes']:,})")
        elif file_checksum(path) != entry[ALGORITHM]:
            problems.append(f"{name} is damaged (its bytes changed since it was saved: the checksum differs)")
    if process_index == 0:
        problems += [f"{name} was added after the save (the manifest does not list it)"
                     for name in checkpoint_files(folder) if name not in files]
    return problems


def damage_error(folder: Path, problems: list[str]) -> CheckpointError:
    """One error for everything ``manifest_problems`` found, with the fix."""
    shown = "; ".join(problems[:_LISTED]) + (f"; and {len(problems) - _LISTED} more" if len(problems) > _LISTED else "")
    only_added = all("was added" in problem for problem in problems)
    fix = ("Remove the added file(s), or pass verify=False to load_state() to load it with them" if only_added else
           "Load an earlier checkpoint (this one is damaged or was changed after it was saved), or pass verify=False "
           "to load_state() to load it anyway")
    return CheckpointError(f"The checkpoint {folder} does not match its {MANIFEST}: {shown}. {fix}.")


def verify_checkpoint(folder: Path, process_index: int, num_processes: int,
                      gather: Callable[[Any], list[Any]]) -> None:
    """Check ``folder`` against its manifest (if it has one), the files split between the processes.

    Every process raises the same ``CheckpointError`` when any file differs; ``gather`` is the
    strategy's ``all_gather_object``.
    """
    error: Exception | None = None
    problems: list[str] = []
    try:
        files = read_manifest(folder)
        if files is not None:
            problems = manifest_problems(folder, files, process_index, num_processes)
    except Exception as caught:
        error = caught
    reports = gather((error_report(error), problems))
    raise_agreed(error, [report for report, _ in reports])
    found = sorted(problem for _, share in reports for problem in share)
    if found:
        raise damage_error(folder, found)
