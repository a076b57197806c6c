"""SIGTERM and Ctrl-C during fit: a checkpoint at the next optimizer step, exit 128 + the signal, exact resume.

Real signals are sent to a real training process at a step drawn at random; a second process
resumes from ``latest``; its final weights equal those of an uninterrupted run (accumulation 2,
dropout, a scheduler and the CSV tracker included). With two processes the signal reaches one of
them only, as when a cluster stops one node: both stop after the same step. Where a SLURM
controller answers, a real batch job gets its preemption signal, requeues itself and resumes.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from distributed_helpers import REPO_ROOT, WORKERS_DIR, _kill_group, _worker_env, free_port
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


def run_worker(mode, out, stop_at=None, signum=None, processes=1, signalled_rank=0, options=()):
    """Run the worker (under torchrun when ``processes`` > 1); send ``signum`` to one rank at ``stop_at``."""
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                                          "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    process = subprocess.Popen([sys.executable, *launcher, str(WORKER), mode, str(out), *options], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_worker_env(), cwd=REPO_ROOT,
                               start_new_session=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line.strip())
            if stop_at is not None and line.startswith(f"step {stop_at} rank {signalled_rank} "):
                os.kill(int(line.split()[-1]), signum)
                stop_at = None
        _, err = process.communicate(timeout=180)
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


def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    # With an asynchronous checkpoint at every step: the stop waits for the one being written.
    whole, interrupted, options = tmp_path / "whole", tmp_path / "interrupted", ["--async-saves"]
    code, lines, err = run_worker("resume", whole, processes=2, options=options)  # no checkpoint yet: uninterrupted
    assert code == 0, err
    total_steps = max(int(line.split()[1]) for line in lines if line.startswith("step "))

    code, lines, err = run_worker("run", interrupted, stop_at=2, signum=signal.SIGTERM, processes=2, signalled_rank=1,
                                  options=options)
    assert code != 0 and "done" not in lines, err
    stops = [line for line in (err + "\n".join(lines)).splitlines() if "Stopping on SIGTERM at step" in line]
    assert len(stops) == 1, err  # printed once, by process 0, which received no signal itself
    step = int(stops[0].split("at step ")[1].split(":")[0])
    assert 2 <= step < total_steps
    assert all(int(line.split()[1]) <= step for line in lines if line.startswith("step ")), lines  # neither went on
    assert (interrupted / "checkpoints" / "latest").read_text().strip().startswith("epoch=") and \
        f"step={step}" in (interrupted / "checkpoints" / "latest").read_text()

    code, lines, err = run_worker("resume", interrupted, processes=2, options=options)
    assert code == 0, err
    final, expected = load_file(str(interrupted / "final.safetensors")), load_file(str(whole / "final.safetensors"))
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


def _slurm_answers() -> bool:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return False
    return subprocess.run(["sinfo", "--noheader"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.skipif(not _slurm_answers(), reason="needs a SLURM controller that answers (sbatch, sinfo, scontrol on "
                                                 "PATH): e.g. apt install slurm-wlm with a one-node slurm.conf")
def test_preemption_signal_under_slurm_requeues_the_job_which_resumes_exactly(tmp_path, uninterrupted):
    total_steps, expected = uninterrupted
    log = tmp_path / "job.log"
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\nexec {sys.executable} {WORKER} resume {tmp_path} USR1\n")
    submitted = subprocess.run(["sbatch", "--parsable", "--requeue", "--open-mode=append", "-o", str(log),
                                "-D", str(REPO_ROOT), str(script)], capture_output=True, text=True, env=_worker_env(),
                               check=True)
    job = submitted.stdout.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 120
        while "step 2 " not in (log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, f"job {job} did not reach step 2: {log.read_text() if log.exists() else ''}"
            time.sleep(0.2)
        # What sbatch --signal=B:USR1@90 does when the time limit nears: the signal to the batch step.
        subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)
        deadline, hurried = time.monotonic() + 240, False
        while True:
            if not hurried and f"requeued SLURM job {job}" in log.read_text():
                # SLURM holds a requeued job back for a while; an administrator's update lets it start now.
                hurried = subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"],
                                         capture_output=True).returncode == 0
            state = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
            if "JobState=COMPLETED" in state or "JobState=FAILED" in state:
                break
            assert time.monotonic() < deadline, f"job {job} did not finish after its requeue:\n{state}\n{log.read_text()}"
            time.sleep(0.5)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    text = log.read_text()
    assert "JobState=COMPLETED" in state and "Restarts=1" in state, f"{state}\n{text}"
    assert f"requeued SLURM job {job}" in text and text.count("done") == 1, text
    final = load_file(str(tmp_path / "final.safetensors"))
    for name, value in expected.items():
        assert torch.equal(final[name], value), name
