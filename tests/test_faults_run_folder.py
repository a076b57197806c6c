"""Fault catalogue: one run per output folder, and folders that cannot take the run's checkpoints.

Real second processes hold the folder's lock (alive, or killed with SIGKILL); real read-only and
full filesystems (small tmpfs mounts) stand for unwritable and full disks, skipped with the reason
where this machine cannot mount them. Each case fails before any training and leaves the saved
checkpoint loadable.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from distributed_helpers import REPO_ROOT, WORKERS_DIR, _kill_group, _worker_env, free_port
from fault_helpers import assert_resumable
from models import mlp
from trainer_setup import make_trainer

from trainer import PartialState
from trainer.callbacks import ModelCheckpoint
from trainer.fit_checks import OutputDirError
from trainer.run_lock import LOCK_NAME, OutputDirLockedError

WORKER = WORKERS_DIR / "folder_worker.py"


@contextmanager
def holder(folder: Path):
    """A real second process holding ``folder``'s lock for as long as the block runs."""
    process = subprocess.Popen([sys.executable, str(WORKER), "hold", str(folder)], stdout=subprocess.PIPE, text=True,
                               env=_worker_env(), cwd=REPO_ROOT, start_new_session=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "held"
        yield process
    finally:
        _kill_group(process)


def test_second_live_run_is_refused(run_dir):
    with holder(run_dir) as first:
        trainer = make_trainer(run_dir, max_epochs=1)
        with pytest.raises(OutputDirLockedError, match=rf"{run_dir} is in use by another run \(process {first.pid} on "
                                                       rf"host {socket.gethostname()}.*another output_dir"):
            trainer.fit()
        assert trainer.global_step == 0
    assert_resumable(run_dir)


def test_lock_held_on_another_host_is_refused(run_dir):
    (run_dir / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "node-17", "started": "2026-12-05 09:00:00"}))
    trainer = make_trainer(run_dir, max_epochs=1)
    with pytest.raises(OutputDirLockedError, match=r"process 1 on host node-17.*delete .*\.trainer\.lock"):
        trainer.fit()
    assert_resumable(run_dir)


def test_lock_of_a_killed_run_is_taken_over(run_dir):
    died = subprocess.run([sys.executable, str(WORKER), "die", str(run_dir)], env=_worker_env(), cwd=REPO_ROOT,
                          timeout=120)
    assert died.returncode == -9 and (run_dir / LOCK_NAME).is_file()
    trainer = make_trainer(run_dir, max_epochs=2)
    with pytest.warns(UserWarning, match=r"Taking over .*\.trainer\.lock: the run that held it \(process \d+ on this "
                                         r"host\) is no longer running"):
        trainer.fit(resume="latest")
    assert trainer.global_step == 10 and not (run_dir / LOCK_NAME).exists()


def test_lock_is_released_when_fit_fails(run_dir):
    from trainer_setup import ClassifierTrainer, datasets, model

    class Failing(ClassifierTrainer):
        def training_step(self, batch):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        Failing(model(), train_data=datasets()[0], batch_size=4, output_dir=run_dir, progress_bar=False).fit()
    assert not (run_dir / LOCK_NAME).exists()
    assert_resumable(run_dir)


def test_every_process_of_a_job_is_refused_alike(run_dir):
    """The job's processes share one lock (rank 0 takes it); when another run holds it, every rank stops."""
    with holder(run_dir) as first:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(WORKER), "fit", str(run_dir)]
        job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_worker_env(),
                               cwd=REPO_ROOT, start_new_session=True)
        try:
            out, err = job.communicate(timeout=180)
        finally:
            _kill_group(job)
    assert job.returncode != 0, out + err
    for rank in (0, 1):
        assert f"rank {rank} refused: The output folder {run_dir} is in use by another run (process {first.pid}" in out, \
            out + err
    assert_resumable(run_dir)


def test_output_dir_is_a_file(run_dir):
    target = run_dir / "not-a-folder"
    target.write_text("x")
    trainer = make_trainer(target, max_epochs=1)
    with pytest.raises(OutputDirError, match=r"The folder .*not-a-folder cannot be written.*Choose another output_dir"):
        trainer.fit()
    assert trainer.global_step == 0
    assert_resumable(run_dir)


@contextmanager
def tmpfs(where: Path, size: str, read_only: bool = False):
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_read_only_output_dir(run_dir, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as folder:
        trainer = make_trainer(folder / "out", max_epochs=1)
        with pytest.raises(OutputDirError, match=r"The folder .*ro/out cannot be written \(Read-only file system\).*"
                                                 r"Choose another output_dir"):
            trainer.fit()
        assert trainer.global_step == 0
    assert_resumable(run_dir)


def test_read_only_checkpoint_dirpath(run_dir, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as folder:
        trainer = make_trainer(run_dir, max_epochs=1, callbacks=[ModelCheckpoint(dirpath=folder / "ckpts")])
        with pytest.raises(OutputDirError, match=r"ro/ckpts cannot be written.*ModelCheckpoint dirpath"):
            trainer.fit()
        assert trainer.global_step == 0
    assert_resumable(run_dir)


def test_output_dir_without_room_for_a_checkpoint(run_dir, tmp_path):
    from trainer_setup import datasets

    from trainer import Trainer

    with tmpfs(tmp_path / "small", "256k") as folder:
        big = mlp(hidden=4096)  # ~53k weights: ~640 kB with AdamW's two states
        class Step(Trainer):
            def training_step(self, batch):
                return self.model(batch[0]).pow(2).mean()

        trainer = Step(big, train_data=datasets()[0], output_dir=folder / "out", progress_bar=False, trackers=[])
        with pytest.raises(OutputDirError, match=r"small/out/checkpoints has [\d,]+ bytes free and one checkpoint of "
                                                 r"this run needs about [\d,]+ .*free some space"):
            trainer.fit()
        assert trainer.global_step == 0
        assert not (folder / "out" / LOCK_NAME).exists() and not any((folder / "out" / "checkpoints").iterdir())
    assert_resumable(run_dir)


def test_disk_fills_up_during_training(tmp_path):
    """Room for one checkpoint at the start, none for the second: the save fails, the first stays latest."""
    from trainer_setup import datasets

    from trainer import Trainer
    from trainer.checkpoint_errors import CheckpointWriteError

    class Step(Trainer):
        def training_step(self, batch):
            return self.model(batch[0]).pow(2).mean()

    def build(out):
        return Step(mlp(hidden=4096), train_data=datasets()[0], output_dir=out, progress_bar=False, trackers=[],
                    max_steps=3, callbacks=[ModelCheckpoint(every_n_steps=1, save_top_k=-1)])

    with tmpfs(tmp_path / "small", "1m") as folder:
        trainer = build(folder / "out")
        with pytest.raises(CheckpointWriteError, match=r"No space left to save the checkpoint .*epoch=0-step=2: it needs "
                                                       r"about [\d,]+ bytes, and [\d,]+ bytes are free.*previous "
                                                       r"checkpoint there is untouched"):
            trainer.fit()
        root = folder / "out" / "checkpoints"
        assert (root / "latest").read_text().strip() == "epoch=0-step=1"
        assert sorted(p.name for p in root.iterdir()) == ["epoch=0-step=1", "latest"]
        PartialState._reset_state()
        resumed = build(folder / "out")
        resumed._resume("latest")
        assert resumed.global_step == 1
