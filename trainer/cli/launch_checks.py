"""What ``trainer launch`` checks before any process starts: the machines' layout, the port, the SLURM context.

Each check raises one :class:`CliError` naming the flag (or configuration key: they share their
names), what is wrong and the fix, so a launch that cannot work stops before it starts, on
every machine, instead of hanging in a rendezvous.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from typing import Any

from trainer.cli.errors import CliError
from trainer.cluster import srun_step_missing

DEFAULT_MULTI_MACHINE_PORT = 29500  # torchrun's, where several machines name no port


def check_layout(config: dict[str, Any]) -> None:
    """The machines, processes, ranks, address, port and restarts fit together."""
    machines, processes, rank = config["num_machines"], config["num_processes"], config["machine_rank"]
    port = config["main_process_port"]
    if port is not None and not 1 <= port <= 65535:
        raise CliError(f"--main_process_port {port} is not a port; use one from 1024 to 65535 that is free on machine 0.")
    if not 0 <= rank < machines:
        raise CliError(f"--machine_rank {rank} does not fit --num_machines {machines}: give each machine its own "
                       f"rank from 0 to {machines - 1} (machine 0 is the one at --main_process_ip).")
    if processes % machines:
        example = machines * max(1, processes // machines)
        raise CliError(f"--num_processes {processes} is not a multiple of --num_machines {machines}: it counts the "
                       f"processes of all machines together, the same number on each (e.g. {example}).")
    if config.get("max_restarts", 0) < 0:
        raise CliError(f"--max_restarts {config['max_restarts']} must be 0 or more.")
    if config.get("monitor_interval", 0.1) <= 0:
        raise CliError(f"--monitor_interval {config['monitor_interval']} must be a positive number of seconds.")
    if machines == 1:
        return
    if not config["main_process_ip"]:
        raise CliError("Several machines need --main_process_ip (the address of machine 0), the same on every machine.")
    if config["rdzv_backend"] == "static" and config.get("max_restarts", 0) > 0:
        raise CliError(f"--max_restarts {config['max_restarts']} does not work with the static rendezvous on several "
                       "machines: torchrun's static rendezvous hands the restarted processes the addresses of the ones "
                       "that died, and every machine hangs; pass --rdzv_backend c10d (on every machine) to restart, or "
                       "--max_restarts 0.")


def check_port(config: dict[str, Any]) -> None:
    """On the machine that hosts the rendezvous, refuse a ``--main_process_port`` something already listens on."""
    port = config["main_process_port"]
    if config["machine_rank"] != 0 or (config["num_machines"] == 1 and not port):
        return  # another machine's port, or torchrun picks a free one
    port = port or DEFAULT_MULTI_MACHINE_PORT
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store does: TIME_WAIT is no conflict
        try:
            probe.bind(("", port))
        except OSError as error:
            if error.errno not in (errno.EADDRINUSE, errno.EACCES):
                return  # e.g. no IPv4 on this machine: torchrun will say what it finds
            why = "is in use on this machine" if error.errno == errno.EADDRINUSE else "needs root on this machine"
            flag = f"--main_process_port {port}" if config["main_process_port"] else f"Port {port} (torchrun's default)"
            raise CliError(f"{flag} {why}: another job, or an earlier run still stopping, listens on it; pass a free "
                           "port with --main_process_port" + (" (the same on every machine)" if config["num_machines"] > 1
                                                            else ", or leave it out to let torchrun pick one") + ".") from None


def slurm_warning(env: Mapping[str, str], total: int, machines: int) -> str | None:
    """A warning when SLURM asked for several tasks but this is no ``srun`` step: what starts instead, and the fix."""
    why = srun_step_missing(env)
    if why is None:
        return None
    what = "one process, on its own" if total == 1 else f"{total // machines} process(es) under torchrun on this machine"
    return (f"trainer launch: warning: {why}: this starts {what}, not one process per SLURM task; to run one process per "
            "task, run `srun trainer launch ...` in the job script.")


def environment_warnings(config: dict[str, Any], env: Mapping[str, str] | None = None) -> list[str]:
    """Warnings about the environment the launch runs in (printed, the launch goes on)."""
    env = os.environ if env is None else env
    total = config["num_processes"]
    warning = slurm_warning(env, total, config["num_machines"])
    return [warning] if warning else []
