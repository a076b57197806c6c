"""Launch a worker script on several local processes with torchrun, for the multi-process tests.

The workers talk over gloo on 127.0.0.1, so the tests need no accelerator and no network. Each
launch runs in its own session (process group); if it outlives its timeout, the whole group is
killed so that no worker is left behind, and the test fails with everything the workers printed.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

WORKERS_DIR = Path(__file__).resolve().parent / "workers"
REPO_ROOT = Path(__file__).resolve().parent.parent

# Variables of an outer launcher (a CI job under SLURM or torchrun) that must not leak into the
# workers: torchrun sets its own, and detect_cluster_environment() would otherwise read these.
_LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "MPI_LOCAL", "TORCHELASTIC_")
_LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                   "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Launched processes keep their temporary files (torchrun's torchelastic_* log folders among them)
# in one folder of the test session, removed when the session ends.
_SCRATCH = tempfile.mkdtemp(prefix="trainer-tests-")
atexit.register(shutil.rmtree, _SCRATCH, ignore_errors=True)


def _worker_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if key not in _LAUNCHER_NAMES and not key.startswith(_LAUNCHER_PREFIXES)}
    env["TMPDIR"] = _SCRATCH
    env["TRAINER_USE_CPU"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    """Terminate the launch's whole process group (torchrun and its workers), then reap torchrun."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _report(title: str, cmd: Sequence[str], returncode: int | None, stdout: str, stderr: str) -> str:
    return (f"{title}\ncommand: {' '.join(cmd)}\nreturn code: {returncode}\n"
            f"----- stdout -----\n{stdout}\n----- stderr -----\n{stderr}")


def run_distributed(script_path: str | os.PathLike, nproc: int = 2, args: Sequence[str] = (),
                    timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``script_path`` on ``nproc`` local processes with torchrun and assert that it succeeded.

    Returns the CompletedProcess (stdout and stderr as text). On failure or timeout the assertion
    message holds the command, the return code and both streams.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(script_path), *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_worker_env(), cwd=REPO_ROOT, start_new_session=True)
    try:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            raise AssertionError(_report(f"distributed run timed out after {timeout} s",
                                         cmd, proc.returncode, stdout, stderr)) from None
    finally:
        if proc.poll() is None:  # interrupted (e.g. Ctrl-C): leave nothing running
            _kill_group(proc)
    assert proc.returncode == 0, _report("distributed run failed", cmd, proc.returncode, stdout, stderr)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_cli(*args: str, timeout: float = 240, stdin: str | None = None, home: Path | None = None,
            cwd: Path | None = None) -> tuple[int, str, str]:
    """Run ``trainer <args>`` in its own session with the workers' environment; (exit code, stdout, stderr).

    ``home`` is where the default launch configuration is looked for (none by default); ``cwd`` is
    the working directory (default: the repository). On a timeout the whole session is stopped and
    the test fails with what it printed.
    """
    env = _worker_env()
    env["TRAINER_CONFIG_FILE"] = str((home or Path("/nonexistent")) / "default_config.yaml")
    process = subprocess.Popen([sys.executable, "-m", "trainer.cli.main", *args], cwd=cwd or REPO_ROOT, env=env,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: torchrun passes it on to its workers, which run in sessions of their own.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
        raise AssertionError(f"timed out:\n{out}\n{err}") from None
    return process.returncode, out, err


_ATTEMPTS = """
import sys
import torch.distributed as dist
for code in sys.argv[1:]:
    try:
        exec(code)
    except ImportError as error:
        print("ERROR", type(error).__name__, error, "| process group:", dist.is_initialized())
"""


def import_errors_without(module: str, attempts: Sequence[str], scratch: Path) -> list[str]:
    """Run each line of ``attempts`` in a fresh process where ``module`` cannot be imported.

    Returns one line per ImportError raised: its type, its message and whether a process group
    existed by then (a missing package must be reported before any work).
    """
    (scratch / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None  # as if not installed\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(scratch), str(REPO_ROOT)]), "TRAINER_USE_CPU": "1"}
    result = subprocess.run([sys.executable, "-c", _ATTEMPTS, *attempts], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()
