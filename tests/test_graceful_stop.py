"""SIGTERM and Ctrl-C during fit: a checkpoint at the next optimizer step, exit 128 + the signal, exact resume.

Real signals are sent to a real training process at a step drawn at random; a second process
resumes from ``latest``; its final weights equal those of an uninterrupted run (accumulation 2,
dropout, a scheduler and the CSV tracker included).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys

import pytest
import torch
from distributed_helpers import REPO_ROOT, WORKERS_DIR, _kill_group, _worker_env
from safetensors.torch import load_file
from trainer_setup import make_trainer

from trainer import PartialState
from trainer.graceful_stop import StopSignals, TrainingInterrupted, as_signal

WORKER = WORKERS_DIR / "signal_worker.py"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = make_trainer(tmp_path_factory.mktemp("whole"), trackers=["csv"])
    trainer.fit()
    weights = {k: v.clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).state_dict().items()}
    PartialState._reset_state()
    return trainer.global_step, weights


def run_worker(mode, out, stop_at=None, signum=None):
    process = subprocess.Popen([sys.executable, str(WORKER), mode, str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_worker_env(), cwd=REPO_ROOT,
                               start_new_session=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line.strip())
            if stop_at is not None and line.strip() == f"step {stop_at}":
                process.send_signal(signum)
                stop_at = None
        _, err = process.communicate(timeout=120)
    finally:
        _kill_group(process)
    return process.returncode, lines, err


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted, signum):
    total_steps, expected = uninterrupted
    stop_at = random.Random(int(signum)).randrange(2, total_steps - 2)
    code, lines, err = run_worker("run", tmp_path, stop_at, signum)
    assert code == 128 + signum, err
    assert f"Stopping on {signal.Signals(signum).name} at step" in err + "\n".join(lines)
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    stopped = int(latest.split("step=")[1].split("-")[0])
    assert stop_at <= stopped < total_steps and "done" not in lines
    assert (tmp_path / "csv" / "config.json").is_file()  # the tracker ran (its status is tested with MLflow's)

    code, lines, err = run_worker("resume", tmp_path)
    assert code == 0, err
    final = load_file(str(tmp_path / "final.safetensors"))
    assert final.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(final[name], value), name


def test_a_second_ctrl_c_stops_at_once():
    with StopSignals(("SIGINT",)) as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_training_interrupted_is_an_exit_with_the_signal_code():
    error = TrainingInterrupted(signal.SIGTERM, "out/checkpoints/epoch=0-step=3")
    assert isinstance(error, SystemExit) and error.code == 143
    assert "SIGTERM after saving out/checkpoints/epoch=0-step=3" in str(error)


def test_a_misspelt_signal_name(tmp_path):
    assert as_signal("USR1") == signal.SIGUSR1
    with pytest.raises(ValueError, match=r"'SIGTREM' is not a signal name: use one such as SIGTERM"):
        make_trainer(tmp_path, stop_signals=("SIGTREM",))
