"""Fault catalogue: real multi-process launches that lose a process end with one summary, on every machine.

The worker is a few lines: it starts the process group through ``PartialState`` (so the launch's
process-group timeout applies), writes its pid to ``pid.<rank>.<restart>`` and all-reduces in a
loop. Two machines are two ``trainer launch`` processes on 127.0.0.1 (machine 0 started first);
the test SIGKILLs one worker and times how long each launcher takes to end.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed_helpers import REPO_ROOT, _kill_group, _worker_env, free_port, run_cli

WORKER = '''\
import os, sys, time
import torch
import torch.distributed as dist
from trainer import PartialState

out, steps, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rank, restart = int(os.environ["RANK"]), os.environ.get("TRAINER_RESTART_COUNT", "0")
print(f"rank {rank} start timeout {os.environ.get('TRAINER_PROCESS_GROUP_TIMEOUT')}", flush=True)
if mode == "raise" and rank == 1:  # before the process group: rank 0 waits in it until it is stopped
    raise RuntimeError("rank 1 fails on purpose")
if mode == "sigkill" and rank == 1:
    os.kill(os.getpid(), 9)
state = PartialState()
if mode == "hang" and rank == 1:  # alive, but never reaches the collective
    time.sleep(3600)
with open(f"{out}/.pid.{rank}.{restart}", "w") as file:
    file.write(str(os.getpid()))
os.replace(f"{out}/.pid.{rank}.{restart}", f"{out}/pid.{rank}.{restart}")
value = torch.ones(1)
for _ in range(steps):
    dist.all_reduce(value)
    time.sleep(0.05)
print(f"rank {rank} done restart {restart}", flush=True)
'''
TIMEOUT = 10  # --process_group_timeout of the two-machine launches
# What a launcher traceback would show: torchrun's exception or a frame of torchrun, its agent or run_script.py.
NO_LAUNCHER_TRACEBACK = ("ChildFailedError", "SignalException", 'distributed/run.py", line', 'agent/server/api.py", line',
                         'launcher/api.py", line', 'run_script.py", line')


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("worker") / "worker.py"
    path.write_text(WORKER)
    return path


def launcher(args: list[str], log: Path) -> subprocess.Popen:
    """``trainer launch --cpu ARGS`` in a session of its own, its output in ``log``.out/.err."""
    env = {**_worker_env(), "TRAINER_CONFIG_FILE": "/nonexistent/default_config.yaml"}
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen([sys.executable, "-m", "trainer.cli.main", "launch", "--cpu", *args], cwd=REPO_ROOT,
                                env=env, stdout=out, stderr=err, start_new_session=True)


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def stop_leftovers(launchers: list[subprocess.Popen], out: Path, worker: Path) -> None:
    """Leave nothing running: the launchers' sessions, then any worker whose pid file is there."""
    for process in launchers:
        if process.poll() is None:
            _kill_group(process)
    for pid_file in out.glob("pid.*"):
        pid = int(pid_file.read_text())
        try:
            if worker.name in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass


def gone(pid: int) -> bool:
    """The process has ended (a zombie waiting for its parent counts as ended)."""
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return True


def summary_of(text: str) -> str:
    """The launch's own lines (the summary), without the workers' output."""
    return "\n".join(line for line in text.splitlines() if line.startswith(("trainer launch:", "  rank", "  A process")))


# -- one machine ---------------------------------------------------------------------------------------------------


def test_a_failed_rank_is_summed_up_with_its_exit_code_and_traceback_file(tmp_path, worker):
    code, out, err = run_cli("launch", "--num_processes", "2", "--cpu", str(worker), str(tmp_path), "50", "raise",
                             timeout=90)
    assert code == 1
    lines = summary_of(err).splitlines()
    assert lines[-2] == "trainer launch: rank 1 failed and the other process on this machine was stopped:"
    assert lines[-1].startswith("  rank 1 (local rank 1, pid ")
    assert "exit code 1, RuntimeError: rank 1 fails on purpose; traceback above and in " in lines[-1]
    error_file = Path(lines[-1].split("traceback above and in ")[1].rstrip("."))
    assert error_file.name == "error.json" and "rank 1 fails on purpose" in error_file.read_text()
    assert f'File "{worker}", line 10, in <module>' in err  # the script's own traceback, from its first frame
    assert not any(marker in err for marker in NO_LAUNCHER_TRACEBACK), err
    assert "rank 0 start timeout 600" in out  # the launch's default process-group timeout reached the processes


def test_a_sigkilled_rank_is_named_with_its_signal_and_no_traceback(tmp_path, worker):
    code, _, err = run_cli("launch", "--num_processes", "2", "--cpu", str(worker), str(tmp_path), "50", "sigkill",
                           timeout=90)
    assert code == 1
    lines = summary_of(err).splitlines()
    assert lines[-2] == "trainer launch: rank 1 failed and the other process on this machine was stopped:"
    assert lines[-1].startswith("  rank 1 (local rank 1, pid ") and lines[-1].endswith(
        "killed by SIGKILL, no traceback: it was killed from outside the script (the out-of-memory killer, `kill -9`, "
        "a scheduler ending the job).")
    assert "Traceback" not in err and "traceback above" not in err


def test_a_hung_rank_ends_the_launch_after_the_process_group_timeout(tmp_path, worker):
    started = time.monotonic()
    code, _, err = run_cli("launch", "--num_processes", "2", "--cpu", "--process_group_timeout", "4", str(worker),
                           str(tmp_path), "50", "hang", timeout=90)
    assert code == 1 and time.monotonic() - started < 40
    lines = summary_of(err).splitlines()
    assert lines[-2] == "trainer launch: rank 0 failed and the other process on this machine was stopped:"
    assert lines[-1].startswith("  rank 0 (local rank 0, pid ") and "exit code 1, RuntimeError: " in lines[-1]
    assert "Timed out" in lines[-1] or "timed out" in lines[-1], lines[-1]


def test_a_busy_port_is_one_line_before_torchrun_starts(tmp_path, worker):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, err = run_cli("launch", "--num_processes", "2", "--cpu", "--main_process_port", str(port),
                                 str(worker), str(tmp_path), "5", "none", timeout=60)
    assert code == 2 and out == ""
    assert err == (f"trainer launch: --main_process_port {port} is in use on this machine: another job, or an earlier "
                   "run still stopping, listens on it; pass a free port with --main_process_port, or leave it out to "
                   "let torchrun pick one.\n")


def test_sigterm_to_the_launcher_stops_every_process_with_one_line(tmp_path, worker):
    process = launcher(["--num_processes", "2", str(worker), str(tmp_path), "400", "none"], tmp_path / "launch")
    try:
        wait_for(lambda: len(list(tmp_path.glob("pid.*"))) == 2, 60, "both workers")
        pids = [int(path.read_text()) for path in tmp_path.glob("pid.*")]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 128 + signal.SIGTERM
        err = (tmp_path / "launch.err").read_text()
        assert summary_of(err).splitlines()[-1] == "trainer launch: stopped by SIGTERM; the processes were stopped too."
        assert not any(marker in err for marker in NO_LAUNCHER_TRACEBACK), err
        for pid in pids:
            wait_for(lambda pid=pid: gone(pid), 10, f"worker {pid} to end")
    finally:
        stop_leftovers([process], tmp_path, worker)


# -- two machines on this host -------------------------------------------------------------------------------------


def two_machines(tmp_path: Path, worker: Path, backend: str, steps: int, extra: list[str] = ()):
    """Machine 0, then (once it listens) machine 1: 2 processes each, the same port and backend."""
    port = free_port()
    common = ["--num_machines", "2", "--num_processes", "4", "--main_process_ip", "127.0.0.1",
              "--main_process_port", str(port), "--rdzv_backend", backend, "--process_group_timeout", str(TIMEOUT),
              *extra]
    launchers = [launcher([*common, "--machine_rank", "0", str(worker), str(tmp_path), str(steps), "none"], tmp_path / "m0")]
    wait_for(lambda: listening(port) or launchers[0].poll() is not None, 60, "machine 0's rendezvous")
    launchers.append(launcher([*common, "--machine_rank", "1", str(worker), str(tmp_path), str(steps), "none"],
                              tmp_path / "m1"))
    return launchers


@pytest.mark.parametrize("machine", [0, 1], ids=["killed-on-machine-0", "killed-on-machine-1"])
@pytest.mark.parametrize("backend", ["static", "c10d"])
def test_a_lost_rank_ends_the_launch_on_every_machine(tmp_path, worker, backend, machine):
    launchers = two_machines(tmp_path, worker, backend, steps=600)
    try:
        victim = 2 * machine + 1  # the second process of that machine
        wait_for(lambda: len(list(tmp_path.glob("pid.*.0"))) == 4, 90, "the four workers")
        pid = int((tmp_path / f"pid.{victim}.0").read_text())
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        ended = []
        for process in launchers:
            process.wait(timeout=TIMEOUT + 30)
            ended.append(time.monotonic() - killed)
        assert max(ended) < TIMEOUT + 15, ended
        errors = [(tmp_path / f"m{m}.err").read_text() for m in (0, 1)]
        assert all(process.returncode == 1 for process in launchers), errors
        lines = summary_of(errors[machine])
        assert f"failed on machine {machine} (of 2)" in lines or f"failed and the other process on machine {machine}" in lines
        assert f"  rank {victim} (local rank 1, pid {pid}): killed by SIGKILL, no traceback" in lines
        other = summary_of(errors[1 - machine])
        assert "failed" in other or "lost the rendezvous" in other, errors[1 - machine]
        assert not any(marker in error for marker in NO_LAUNCHER_TRACEBACK for error in errors), errors
    finally:
        stop_leftovers(launchers, tmp_path, worker)


def test_c10d_restarts_every_machine_after_a_lost_rank(tmp_path, worker):
    launchers = two_machines(tmp_path, worker, "c10d", steps=100, extra=["--max_restarts", "1"])
    try:
        wait_for(lambda: len(list(tmp_path.glob("pid.*.0"))) == 4, 90, "the four workers")
        os.kill(int((tmp_path / "pid.3.0").read_text()), signal.SIGKILL)
        for process in launchers:
            process.wait(timeout=90)
        outputs = [(tmp_path / f"m{m}.out").read_text() for m in (0, 1)]
        assert [process.returncode for process in launchers] == [0, 0], [(tmp_path / f"m{m}.err").read_text() for m in (0, 1)]
        # Two workers of a machine share its output file, so one line may hold the ends of two prints.
        done = re.findall(r"rank (\d+) done restart (\d+)", "".join(outputs))
        # c10d may hand the ranks to the machines in another order after the restart: every rank ends once,
        # and the processes of the machine that lost one were restarted.
        assert sorted(rank for rank, _ in done) == ["0", "1", "2", "3"], outputs
        assert any(restart == "1" for _, restart in done), outputs
    finally:
        stop_leftovers(launchers, tmp_path, worker)
