"""Accelerate's example scripts, as calls made from the trainer paths (tests/compat/), on one process and on two.

Each script makes its upstream example's Accelerator calls in the same order with the same
arguments, checks its own result and prints one ``<NAME> OK rank <i> ...`` line per process. Here
each is launched with the project's launcher and the lines of every process are looked at.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from distributed_helpers import run_cli
from tracker_helpers import csv_history

pytestmark = pytest.mark.slow  # each launch imports transformers and evaluate: about 10 s of CPU per process

COMPAT = Path(__file__).resolve().parent / "compat"
EPOCHS = 12  # the NLP scripts' num_epochs
TRAIN_BATCHES = 192 // 16  # offline MRPC train split / batch size, on one process


def launch(processes: int, script: str, *args: object) -> str:
    code, out, err = run_cli("launch", "--num_processes", str(processes), "--cpu", str(COMPAT / script),
                             *map(str, args))
    assert code == 0, f"{out}\n{err}"
    return out


def markers(out: str, name: str, processes: int) -> dict[int, str]:
    """``{rank: rest of the line}`` from the scripts' ``NAME OK rank i ...`` lines: exactly one per process."""
    found = [re.fullmatch(rf"{name} OK rank (\d+)(.*)", line) for line in out.splitlines()]
    ranks = sorted(int(match.group(1)) for match in found if match)
    assert ranks == list(range(processes)), out
    return {int(match.group(1)): match.group(2).strip() for match in found if match}


@pytest.mark.parametrize("processes", [1, 2])
def test_nlp_example(processes):
    markers(launch(processes, "nlp_example.py"), "NLP_EXAMPLE", processes)


@pytest.mark.parametrize(("processes", "tracking"), [(1, False), (2, True)])
def test_complete_nlp_example_saves_every_epoch_then_resumes(processes, tracking, tmp_path, monkeypatch):
    """Checkpoints every epoch, then a second run resumes from epoch_8. ``--with_tracking`` (log_with="all":
    every tracker installed here, all offline) only on 2 processes, where it is the main process's job:
    starting them all costs some 20 s of CPU."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # what trackers keep outside the project (ClearML's cache)
    record, logs = tmp_path / "record.json", tmp_path / "logs"
    tracking_options = ["--with_tracking", "--project_dir", logs] if tracking else []
    out = launch(processes, "complete_nlp_example.py", "--checkpointing_steps", "epoch", "--output_dir",
                 tmp_path / "first", *tracking_options, "--compat_record", record)
    batches = TRAIN_BATCHES // processes
    assert set(markers(out, "COMPLETE_NLP_EXAMPLE", processes).values()) == {f"first epoch 0 first steps {batches}"}
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == sorted(f"epoch_{e}" for e in range(EPOCHS))
    if tracking:
        history = csv_history(logs)  # "all" includes the CSV tracker, whose file is the easiest to read back
        for name in ("accuracy", "f1", "train_loss", "epoch"):
            assert [step for step, _ in history[name]] == list(range(EPOCHS)), (name, history[name])

    out = launch(processes, "complete_nlp_example.py", "--checkpointing_steps", "epoch", "--output_dir",
                 tmp_path / "resumed", "--resume_from_checkpoint", tmp_path / "first" / "epoch_8",
                 "--compat_record", record)
    assert "Resumed from checkpoint:" in out
    assert set(markers(out, "COMPLETE_NLP_EXAMPLE", processes).values()) == {f"first epoch 9 first steps {batches}"}
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["epoch_10", "epoch_11", "epoch_9"]


@pytest.mark.parametrize("processes", [1, 2])
def test_cv_example(processes, tmp_path):
    # Upstream's 4 data-loader workers on one process; none on two, where 4 forked workers per process
    # hung about one run in twenty on this 2-core machine (see the script's docstring).
    workers = ["--num_workers", "0"] if processes == 2 else []
    markers(launch(processes, "cv_example.py", "--data_dir", tmp_path, *workers), "CV_EXAMPLE", processes)


@pytest.mark.parametrize(("processes", "stateful"), [(1, False), (2, False), (2, True)])
def test_checkpointing_every_n_steps_then_resume_mid_epoch(processes, stateful, tmp_path):
    """Resumed from step_15: skip_first_batches skips what the epoch had done, or with a stateful
    loader load_state puts the loader back at its saved position."""
    record, options = tmp_path / "record.json", ["--use_stateful_dataloader"] if stateful else []
    out = launch(processes, "checkpointing.py", *options, "--checkpointing_steps", "15", "--output_dir",
                 tmp_path / "first", "--compat_record", record)
    batches = TRAIN_BATCHES // processes
    markers(out, "CHECKPOINTING", processes)
    steps = EPOCHS * batches
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == sorted(f"step_{n}" for n in range(15, steps + 1, 15))

    out = launch(processes, "checkpointing.py", *options, "--checkpointing_steps", "15", "--output_dir",
                 tmp_path / "resumed", "--resume_from_checkpoint", tmp_path / "first" / "step_15",
                 "--compat_record", record)
    assert "Resumed from checkpoint:" in out
    epoch, skipped = divmod(15, batches)  # 1 process: epoch 1 after 3 batches; 2 processes: epoch 2 after 3
    assert set(markers(out, "CHECKPOINTING", processes).values()) == {
        f"first epoch {epoch} first steps {batches - skipped}"}


@pytest.mark.parametrize("processes", [1, 2])
def test_cross_validation(processes, monkeypatch):
    monkeypatch.setenv("COMPAT_TRAIN_SIZE", "288")  # 3 folds of 192 training pairs
    markers(launch(processes, "cross_validation.py"), "CROSS_VALIDATION", processes)


@pytest.mark.parametrize("processes", [1, 2])
def test_early_stopping_stops_every_process_at_the_same_step(processes):
    lines = markers(launch(processes, "early_stopping.py"), "EARLY_STOPPING", processes)
    stops = {re.match(r"stops (\[.*?\]) asked", rest).group(1) for rest in lines.values()}
    assert len(stops) == 1, lines


@pytest.mark.parametrize(("processes", "accumulation", "expected"), [
    (1, 5, "optimizer steps per epoch 3 of 12 batches"),  # groups of 5, 5 and a short last one of 2
    (2, 4, "optimizer steps per epoch 2 of 6 batches"),  # 4 and a short last one of 2
])
def test_gradient_accumulation(processes, accumulation, expected):
    out = launch(processes, "gradient_accumulation.py", "--gradient_accumulation_steps", accumulation)
    assert set(markers(out, "GRADIENT_ACCUMULATION", processes).values()) == {expected}


@pytest.mark.parametrize("processes", [1, 2])
def test_automatic_gradient_accumulation(processes):
    lines = markers(launch(processes, "automatic_gradient_accumulation.py"), "AUTOMATIC_GRADIENT_ACCUMULATION",
                    processes)
    batches = 192 // 32 // processes
    assert set(lines.values()) == {f"batch sizes [64, 57, 51, 45, 40, 36, 32] optimizer steps per epoch "
                                   f"{(batches + 1) // 2} of {batches} batches"}


@pytest.mark.parametrize("processes", [1, 2])
def test_memory(processes):
    lines = markers(launch(processes, "memory.py"), "MEMORY", processes)
    assert set(lines.values()) == {"batch sizes [16, 14, 12]"}


@pytest.mark.parametrize("processes", [1, 2])
def test_multi_process_metrics(processes):
    lines = markers(launch(processes, "multi_process_metrics.py"), "MULTI_PROCESS_METRICS", processes)
    assert set(lines.values()) == {"samples 70"}
