"""``notebook_launcher``: run a training function on several processes from a notebook or a REPL.

Jupyter cannot run ``trainer launch`` on a cell, so the function itself is started on N processes
through torch's elastic launcher (``torch.distributed.launcher.api.elastic_launch``) with the
``fork`` start method, which needs no pickling of a function defined in the notebook. Forking a
process whose CUDA is initialised breaks CUDA in the children, so that is refused up front.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from trainer import launch_environment as variables
from trainer.precision import canonical_precision
from trainer.state import PartialState
from trainer.utils.environment import patch_environment


def _entry(function: Callable[..., Any]) -> Callable[..., Any]:
    """What each forked process runs: a fresh process state, then the user's function."""

    @functools.wraps(function)
    def run(*args: Any) -> Any:
        PartialState._reset_state()  # the fork copied the parent's (empty or single-process) state
        return function(*args)

    return run


def notebook_launcher(function: Callable[..., Any], args: tuple = (), num_processes: int | None = None,
                      mixed_precision: str = "no", use_port: str | int = "29500", master_addr: str = "127.0.0.1",
                      node_rank: int = 0, num_nodes: int = 1, rdzv_backend: str = "static", max_restarts: int = 0,
                      monitor_interval: float = 0.1, cpu: bool = False) -> dict[int, Any]:
    """Run ``function(*args)`` on ``num_processes`` processes of this machine (one when None or 1).

    Returns each local process's return value by rank. Inside ``function``, ``Accelerator()`` and
    ``PartialState()`` see the launched layout, the precision and ``cpu`` as ``trainer launch`` sets them.
    """
    settings = {variables.PRECISION: canonical_precision(mixed_precision), variables.USE_CPU: "1" if cpu else "0"}
    if num_processes in (None, 1) and num_nodes == 1:
        with patch_environment(**settings):
            return {0: function(*args)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        raise RuntimeError(
            "CUDA was already initialised in this process, and forked processes cannot use it. Restart the notebook's "
            "kernel and call notebook_launcher before anything touches the GPU (build and move models inside the "
            "launched function)."
        )
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError(
            "A torch.distributed process group already exists in this process, so it cannot launch others. Restart "
            "the kernel, and create the Accelerator inside the launched function rather than before."
        )
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=num_nodes, max_nodes=num_nodes, nproc_per_node=num_processes or 1,
                          run_id=uuid.uuid4().hex, rdzv_endpoint=f"{master_addr}:{use_port}",
                          rdzv_backend=rdzv_backend, rdzv_configs={"rank": node_rank}, max_restarts=max_restarts,
                          monitor_interval=monitor_interval, start_method="fork")
    with patch_environment(**settings):
        return elastic_launch(config, entrypoint=_entry(function))(*args)


def debug_launcher(function: Callable[..., Any], args: tuple = (), num_processes: int = 2) -> dict[int, Any]:
    """Run ``function(*args)`` on ``num_processes`` CPU processes of this machine (to debug distributed code)."""
    import socket

    with socket.socket() as probe:  # a free local port, so debug runs never collide with a real job's 29500
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return notebook_launcher(function, args, num_processes=num_processes, use_port=port, cpu=True)
