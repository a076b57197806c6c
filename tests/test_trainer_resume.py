"""Trainer resume is bit-exact wherever training stopped, including after SIGKILL."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_setup import make_trainer

from callbacks import Callback, EarlyStopping
from trainer import PartialState

WORKER = Path(__file__).parent / "workers" / "trainer_worker.py"


class Crash(Exception):
    pass


class SaveThenCrash(Callback):
    """Saves a checkpoint at one point of the loop, then fails as a crashed job would."""

    def __init__(self, event: str, epoch: int, batch: int | None, path: Path) -> None:
        self.event, self.epoch, self.batch, self.path = event, epoch, batch, path

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        if self.event == "batch" and (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            self._crash(trainer)

    def on_train_epoch_end(self, trainer):
        if self.event == "epoch_end" and trainer.current_epoch == self.epoch:
            self._crash(trainer)

    def on_validation_end(self, trainer, metrics):
        if self.event == "validation" and trainer.progress.position == [self.epoch, self.batch]:
            self._crash(trainer)

    def _crash(self, trainer):
        trainer.save_checkpoint(self.path)
        raise Crash()


def final_state(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    optimizer = trainer.optimizer.state_dict()
    return {k: v.clone() for k, v in model.state_dict().items()}, optimizer


def assert_same(a, b):
    weights_a, opt_a = a
    weights_b, opt_b = b
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key
    for index, state in opt_a["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_b["state"][index][name]), (index, name)
    assert opt_a["param_groups"] == opt_b["param_groups"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    callbacks = [EarlyStopping("val_loss", patience=100), ValidationLog()]
    trainer = make_trainer(tmp_path_factory.mktemp("straight"), callbacks=callbacks)
    trainer.fit()
    PartialState._reset_state()
    return final_state(trainer), trainer.global_step, dict(trainer.metrics), early_stopping_state(trainer)


class ValidationLog(Callback):
    """Every validation's position and loss; saved with checkpoints, so a resumed run continues the log."""

    def __init__(self) -> None:
        self.log = []

    def on_validation_end(self, trainer, metrics):
        self.log.append([*trainer.progress.position, metrics["val_loss"]])

    def state_dict(self):
        return {"log": self.log}

    def load_state_dict(self, state):
        self.log = [list(entry) for entry in state["log"]]


def early_stopping_state(trainer):
    """Callback states: a validation run twice or skipped on resume shows in the log."""
    states = trainer.callbacks.state_dict()
    return states["EarlyStopping[val_loss]"], states["ValidationLog"]


STOPS = {
    "mid-epoch at a boundary": ("batch", 0, 3),       # 4 batches done: 2 full groups
    "mid-epoch off a boundary": ("batch", 1, 4),      # 5 batches done: inside a group
    "last batch, before the epoch's validation": ("batch", 1, 8),
    "at an epoch end": ("epoch_end", 0, None),
    "before a step validation": ("batch", 2, 5),      # batch 5 ends a group; step 12 validates after it
    "after the epoch's validation": ("validation", 1, 9),  # before on_train_epoch_end
}


@pytest.mark.parametrize("stop", list(STOPS))
def test_resume_anywhere_is_bit_identical(tmp_path, uninterrupted, stop):
    event, epoch, batch = STOPS[stop]
    checkpoint = tmp_path / "ckpt"
    first = make_trainer(tmp_path, callbacks=[EarlyStopping("val_loss", patience=100), ValidationLog(),
                                              SaveThenCrash(event, epoch, batch, checkpoint)])
    with pytest.raises(Crash):
        first.fit()
    PartialState._reset_state()
    resumed = make_trainer(tmp_path, init_seed=99, callbacks=[EarlyStopping("val_loss", patience=100), ValidationLog()])
    resumed.fit(resume=checkpoint)
    state, steps, metrics, stopping = uninterrupted
    assert resumed.global_step == steps
    assert early_stopping_state(resumed) == stopping
    assert_same(final_state(resumed), state)
    assert resumed.metrics["val_loss"] == metrics["val_loss"]


def run_worker(output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRAINER_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(WORKER), "--output-dir", str(output_dir), *extra],
                          capture_output=True, text=True, timeout=240, env=env)


def test_sigkill_at_a_random_step_then_resume_latest(tmp_path):
    straight = run_worker(tmp_path / "straight", "--result", str(tmp_path / "straight.safetensors"))
    assert straight.returncode == 0, straight.stderr
    kill_at = random.Random(os.getpid()).randrange(3, 25)  # 27 batches in 3 epochs
    killed = run_worker(tmp_path / "run", "--kill-at-batch", str(kill_at))
    assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr)
    resumed = run_worker(tmp_path / "run", "--resume", "latest", "--result", str(tmp_path / "resumed.safetensors"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step" in resumed.stdout
    a, b = load_file(str(tmp_path / "straight.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"killed at batch {kill_at}"


def test_sigkill_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path):
    killed = run_worker(tmp_path / "run", "--kill-during-save", "3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    root = tmp_path / "run" / "checkpoints"
    latest = (root / "latest").read_text().strip()
    assert latest == "epoch=0-step=2"  # the second save; the third never completed
    assert (root / latest / "accelerator.json").is_file()
    assert not (root / "epoch=0-step=3").exists()
    assert any(p.name.startswith(".epoch=0-step=3.tmp-") for p in root.iterdir())  # the unfinished write
    straight = run_worker(tmp_path / "straight", "--result", str(tmp_path / "straight.safetensors"))
    resumed = run_worker(tmp_path / "run", "--resume", "latest", "--result", str(tmp_path / "resumed.safetensors"))
    assert straight.returncode == 0 and resumed.returncode == 0, resumed.stderr
    assert "resumed at step 2" in resumed.stdout
    a, b = load_file(str(tmp_path / "straight.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_checkpoint_with_a_pickle(tmp_path):
    import pickle

    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit()
    latest = tmp_path / "checkpoints" / (tmp_path / "checkpoints" / "latest").read_text().strip()
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (latest / "trainer_state.pkl").write_bytes(pickle.dumps(Payload()))
    PartialState._reset_state()
    with pytest.raises(ValueError, match="Refusing to load"):
        make_trainer(tmp_path).fit(resume="latest")
    assert not marker.exists()


def test_resume_latest_without_checkpoints_starts_fresh(tmp_path, capsys):
    trainer = make_trainer(tmp_path, max_epochs=1, checkpoint=False)
    trainer.fit(resume="latest")
    assert trainer.global_step == 5
    assert "starting from the beginning" in capsys.readouterr().out
