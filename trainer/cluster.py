"""Where this process sits in a job, read from whatever launched it.

torchrun, SLURM's ``srun`` and the MPI launchers each describe the job with their own
environment variables. They are read here, once, into one ``ClusterEnvironment`` so that the
rest of the code asks one object and never looks at a launcher's variables again.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_MASTER_ADDR = "127.0.0.1"
DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class ClusterEnvironment:
    """The rank layout of the job this process belongs to."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = DEFAULT_MASTER_ADDR
    master_port: int = DEFAULT_MASTER_PORT
    launcher: str = "none"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise KeyError(name)
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Environment variable {name}={value!r} must be a whole number.") from None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as ``node[003-005,9],gpu1``."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    match = re.match(r"^([^\[]+)\[([^\],\-]+)[^\]]*\](.*)$", first)
    if match is None:
        return first
    return match.group(1) + match.group(2) + match.group(3)


def _from_torchrun(env: Mapping[str, str]) -> ClusterEnvironment:
    world_size = _int(env, "WORLD_SIZE", 1)
    return ClusterEnvironment(
        rank=_int(env, "RANK"),
        world_size=world_size,
        local_rank=_int(env, "LOCAL_RANK", 0),
        local_world_size=_int(env, "LOCAL_WORLD_SIZE", world_size),
        master_addr=env.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR,
        master_port=_int(env, "MASTER_PORT", DEFAULT_MASTER_PORT),
        launcher="torchrun",
    )


def _slurm_tasks_on_this_node(env: Mapping[str, str], world_size: int) -> int:
    if env.get("SLURM_NTASKS_PER_NODE"):
        return _int(env, "SLURM_NTASKS_PER_NODE")
    # SLURM_TASKS_PER_NODE looks like "4(x2),3": the first group is this node's count
    # only on the first node, but a uniform layout is by far the common case.
    tasks = env.get("SLURM_TASKS_PER_NODE", "")
    match = re.match(r"^(\d+)", tasks)
    return int(match.group(1)) if match else world_size


def _from_slurm(env: Mapping[str, str]) -> ClusterEnvironment:
    world_size = _int(env, "SLURM_NTASKS")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
    master_addr = env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist else DEFAULT_MASTER_ADDR)
    # A port derived from the job id lets two jobs that share a node pick different ports.
    job_id = _int(env, "SLURM_JOB_ID", 0)
    return ClusterEnvironment(
        rank=_int(env, "SLURM_PROCID"),
        world_size=world_size,
        local_rank=_int(env, "SLURM_LOCALID", 0),
        local_world_size=_slurm_tasks_on_this_node(env, world_size),
        master_addr=master_addr,
        master_port=_int(env, "MASTER_PORT", 10000 + job_id % 50000),
        launcher="slurm",
    )


def _from_mpi(env: Mapping[str, str], prefix: str, launcher: str) -> ClusterEnvironment:
    names = {
        "ompi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "OMPI_COMM_WORLD_LOCAL_SIZE"),
        "pmi": ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    }[prefix]
    world_size = _int(env, names[1])
    local_world_size = _int(env, names[3], world_size)
    if world_size > local_world_size and not env.get("MASTER_ADDR"):
        raise RuntimeError(
            f"This {launcher} job spans several machines but MASTER_ADDR is not set: export "
            "MASTER_ADDR (and MASTER_PORT) to the address of the rank-0 machine in the job script."
        )
    return ClusterEnvironment(
        rank=_int(env, names[0]),
        world_size=world_size,
        local_rank=_int(env, names[2], 0),
        local_world_size=local_world_size,
        master_addr=env.get("MASTER_ADDR") or DEFAULT_MASTER_ADDR,
        master_port=_int(env, "MASTER_PORT", DEFAULT_MASTER_PORT),
        launcher=launcher,
    )


def inside_srun(env: Mapping[str, str]) -> bool:
    """True under ``srun``; an interactive ``salloc`` shell or a batch script alone is not a job step."""
    return "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env


def srun_step_missing(env: Mapping[str, str]) -> str | None:
    """Why SLURM's task variables are no job step here, when several tasks are asked for; else None.

    ``SLURM_NTASKS`` above 1 with ``SLURM_PROCID`` but no ``SLURM_STEP_ID`` is a batch script, an
    ``salloc`` shell, or copies started by something other than ``srun``: each copy then runs alone.
    """
    tasks = env.get("SLURM_NTASKS", "")
    if inside_srun(env) or "SLURM_PROCID" not in env or not tasks.isdigit() or int(tasks) < 2:
        return None
    return (f"SLURM_NTASKS={tasks} and SLURM_PROCID={env['SLURM_PROCID']} are set but SLURM_STEP_ID is not, so this "
            "is not a task of an srun job step")


def detect_cluster_environment(env: Mapping[str, str] | None = None) -> ClusterEnvironment:
    """Read the job layout from the launcher's variables: torchrun first, then SLURM, then MPI."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torchrun(env)
    if inside_srun(env):
        return _from_slurm(env)
    if "OMPI_COMM_WORLD_RANK" in env:
        return _from_mpi(env, "ompi", "Open MPI")
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return _from_mpi(env, "pmi", "MPICH/Intel MPI")
    return ClusterEnvironment()
