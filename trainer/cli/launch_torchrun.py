"""Several processes: torchrun (``torch.distributed.run``), run in this process, and its outcome as one summary.

torchrun is called, not re-written: its arguments are built from the launch configuration, it
is parsed and run by its own ``parse_args`` and ``run``, and what it raises is turned into one
exit status and one summary (no launcher traceback):

- ``ChildFailedError``: the summary of :mod:`trainer.cli.launch_summary` (each failed rank, its exit
  code or signal, where its traceback is); exit status 1.
- ``SignalException`` (the launcher got SIGTERM/SIGINT and stopped the processes): one line,
  status 128 + the signal's number.
- anything else (a rendezvous that timed out, a store that cannot be reached): one line, status 1.

Each process runs the script through ``run_script.py``, which writes its traceback into the error
file torchrun assigns it (``TORCHELASTIC_ERROR_FILE``), so the summary can name the file.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.cli.errors import CliError, one_line
from trainer.cli.launch_summary import RankFailure, from_child_failures

RUN_SCRIPT = str(Path(__file__).with_name("run_script.py"))
# torchrun's per-process log lines ("Sending process 12 closing signal SIGTERM", "failed (exitcode: 1) local_rank: 1")
# say what the summary says, and its OMP_NUM_THREADS banner what launch.py says in one line; they are left out
# unless LOGLEVEL asks for torchrun's logs.
_QUIET_LOGGERS = ("torch.distributed.elastic.multiprocessing.api", "torch.distributed.run")
_HANDLED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, name))


@dataclass
class Outcome:
    """How one torchrun run ended: its exit status, the failed processes, or one line of reason."""

    code: int
    failures: list[RankFailure] = field(default_factory=list)
    reason: str = ""
    lost_rendezvous: bool = False  # the rendezvous (its store, on machine 0) went away while the processes ran


def torchrun_argv(config: dict[str, Any], command: list[str], extra: list[str], no_python: bool = False) -> list[str]:
    """torchrun's command line for this machine: the layout, the rendezvous and the script (run by ``run_script.py``)."""
    machines = config["num_machines"]
    per_machine = config["num_processes"] // machines
    argv = [*extra, f"--nproc_per_node={per_machine}", f"--nnodes={machines}",
            f"--monitor_interval={config.get('monitor_interval', 0.1)}"]
    if machines > 1:  # every machine's agent must agree on restarts, so torchrun's own mechanism is used
        argv.append(f"--max_restarts={config.get('max_restarts', 0)}")
    port = config["main_process_port"]
    if machines == 1 and not port:
        # One machine: torchrun's standalone rendezvous (c10d on a free local port) survives restarts
        # cleanly, where a static one can hand restarted workers their predecessors' addresses.
        argv += ["--standalone"]
    elif machines == 1:
        argv += ["--node_rank=0", "--master_addr=127.0.0.1", f"--master_port={port}"]
    elif config["rdzv_backend"] == "static":
        argv += [f"--node_rank={config['machine_rank']}", f"--master_addr={config['main_process_ip']}",
                 f"--master_port={port or 29500}"]
    else:
        argv += [f"--rdzv_backend={config['rdzv_backend']}",
                 f"--rdzv_endpoint={config['main_process_ip']}:{port or 29500}"]
    if no_python:
        return [*argv, "--no-python", *command]
    return [*argv, RUN_SCRIPT, *command]


def run_torchrun(argv: list[str]) -> Outcome:
    """Run torchrun with ``argv`` in this process; its signal handlers and log levels are put back afterwards."""
    from torch.distributed import DistError
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError

    handlers = {number: signal.getsignal(number) for number in _HANDLED_SIGNALS}
    levels = {name: logging.getLogger(name).level for name in _QUIET_LOGGERS}
    if "LOGLEVEL" not in os.environ:
        for name in _QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun.run(torchrun.parse_args(argv))
        return Outcome(0)
    except ChildFailedError as error:
        return Outcome(1, failures=from_child_failures(error.failures))
    except SignalException as error:
        name = signal.Signals(error.sigval).name
        return Outcome(128 + int(error.sigval), reason=f"stopped by {name}; the processes were stopped too.")
    except KeyboardInterrupt:
        return Outcome(130, reason="interrupted; the processes were stopped.")
    except (RendezvousError, DistError) as error:
        return Outcome(1, reason=f"{type(error).__name__}: {one_line(error)}", lost_rendezvous=True)
    except Exception as error:
        return Outcome(1, reason=f"torchrun stopped: {type(error).__name__}: {one_line(error)}")
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        gc.collect()  # the agent's store and sockets go now, before a restart opens new ones


def check_runnable(script: str, module: bool, no_python: bool) -> None:
    """Refuse a script that is not there (or a module that cannot be found) before any process starts."""
    if no_python:
        return
    if module:
        import importlib.machinery

        top = script.split(".")[0]
        if importlib.machinery.PathFinder.find_spec(top, [os.getcwd(), *sys.path]) is None and top not in sys.modules:
            raise CliError(f"No module named {top!r} (for -m {script}) in the current directory or on the Python path; "
                           "check the name, or run trainer launch from the folder that holds it.")
        return
    path = Path(script)
    if path.is_dir() and not (path / "__main__.py").is_file():  # python runs a folder's __main__.py
        raise CliError(f"{script} is a folder, not a script; pass the .py file to run (or -m package.module).")
    if not path.exists():
        raise CliError(f"No script at {script}; check the path (it is relative to {os.getcwd()}).")
