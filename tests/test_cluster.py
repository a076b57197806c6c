"""``detect_cluster_environment``: the rank layout read from torchrun, SLURM and MPI variables.

Every test passes an explicit environment dict, so the machine's own variables play no part.
"""

from __future__ import annotations

import pytest

from trainer.cluster import (
    DEFAULT_MASTER_ADDR,
    DEFAULT_MASTER_PORT,
    ClusterEnvironment,
    detect_cluster_environment,
    first_slurm_host,
)

# -- no launcher ------------------------------------------------------------------------------


def test_empty_environment_is_a_single_process():
    cluster = detect_cluster_environment({})
    assert cluster == ClusterEnvironment(rank=0, world_size=1, local_rank=0, local_world_size=1,
                                         master_addr="127.0.0.1", master_port=29500, launcher="none")
    assert cluster.is_distributed is False
    assert (DEFAULT_MASTER_ADDR, DEFAULT_MASTER_PORT) == ("127.0.0.1", 29500)


def test_unrelated_variables_are_ignored():
    cluster = detect_cluster_environment({"LOCAL_RANK": "3", "SLURM_JOB_ID": "77", "HOME": "/root"})
    assert cluster == ClusterEnvironment()


def test_rank_without_world_size_is_not_torchrun():
    assert detect_cluster_environment({"RANK": "2"}) == ClusterEnvironment()


# -- torchrun ------------------------------------------------------------------------------------


def test_torchrun_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29612"}
    cluster = detect_cluster_environment(env)
    assert cluster == ClusterEnvironment(rank=5, world_size=8, local_rank=1, local_world_size=4,
                                         master_addr="10.1.2.3", master_port=29612, launcher="torchrun")
    assert cluster.is_distributed is True


def test_torchrun_defaults_for_missing_optional_variables():
    cluster = detect_cluster_environment({"RANK": "1", "WORLD_SIZE": "3"})
    assert cluster == ClusterEnvironment(rank=1, world_size=3, local_rank=0, local_world_size=3,
                                         master_addr="127.0.0.1", master_port=29500, launcher="torchrun")


def test_torchrun_single_process_is_not_distributed():
    cluster = detect_cluster_environment({"RANK": "0", "WORLD_SIZE": "1"})
    assert (cluster.world_size, cluster.launcher, cluster.is_distributed) == (1, "torchrun", False)


def test_torchrun_takes_precedence_over_slurm_and_mpi():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0",
           "OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"}
    cluster = detect_cluster_environment(env)
    assert (cluster.launcher, cluster.rank, cluster.world_size, cluster.local_rank) == ("torchrun", 3, 4, 3)


@pytest.mark.parametrize("name", ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"])
def test_torchrun_non_integer_variable_names_the_variable(name):
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "29500"}
    env[name] = "two"
    with pytest.raises(ValueError) as excinfo:
        detect_cluster_environment(env)
    assert str(excinfo.value) == f"Environment variable {name}='two' must be a whole number."


def test_non_integer_rank_message():
    with pytest.raises(ValueError, match=r"^Environment variable RANK='1\.5' must be a whole number\.$"):
        detect_cluster_environment({"RANK": "1.5", "WORLD_SIZE": "2"})


def test_empty_optional_variable_falls_back_to_its_default():
    cluster = detect_cluster_environment({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "", "MASTER_PORT": ""})
    assert (cluster.local_rank, cluster.master_port) == (0, 29500)


def test_empty_required_rank_raises_key_error():
    with pytest.raises(KeyError, match="RANK"):
        detect_cluster_environment({"RANK": "", "WORLD_SIZE": "2"})


# -- SLURM ------------------------------------------------------------------------------------------

SRUN_ENV = {
    "SLURM_PROCID": "4",
    "SLURM_NTASKS": "12",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_ID": "123456",
    "SLURM_JOB_NODELIST": "node[003-005,9]",
    "SLURM_TASKS_PER_NODE": "4(x3)",
}


def test_slurm_under_srun():
    cluster = detect_cluster_environment(SRUN_ENV)
    # port: 10000 + 123456 % 50000 = 10000 + 23456
    assert cluster == ClusterEnvironment(rank=4, world_size=12, local_rank=0, local_world_size=4,
                                         master_addr="node003", master_port=33456, launcher="slurm")
    assert cluster.is_distributed is True


def test_slurm_step_nodelist_wins_over_job_nodelist():
    env = {**SRUN_ENV, "SLURM_STEP_NODELIST": "gpu[17-18]"}
    assert detect_cluster_environment(env).master_addr == "gpu17"


def test_slurm_master_addr_and_port_from_the_environment_win():
    env = {**SRUN_ENV, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "12345"}
    cluster = detect_cluster_environment(env)
    assert (cluster.master_addr, cluster.master_port) == ("10.0.0.7", 12345)


def test_slurm_ntasks_per_node_wins_over_tasks_per_node():
    env = {**SRUN_ENV, "SLURM_NTASKS_PER_NODE": "6", "SLURM_LOCALID": "2"}
    cluster = detect_cluster_environment(env)
    assert (cluster.local_rank, cluster.local_world_size) == (2, 6)


def test_slurm_minimal_srun_variables_use_defaults():
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "3"}
    cluster = detect_cluster_environment(env)
    assert cluster == ClusterEnvironment(rank=1, world_size=2, local_rank=0, local_world_size=2,
                                         master_addr="127.0.0.1", master_port=10000, launcher="slurm")


def test_slurm_job_id_port_wraps_below_60000():
    env = {**SRUN_ENV, "SLURM_JOB_ID": "249999"}
    assert detect_cluster_environment(env).master_port == 10000 + 49999


def test_slurm_batch_shell_without_step_id_is_a_single_process():
    env = {k: v for k, v in SRUN_ENV.items() if k != "SLURM_STEP_ID"}
    assert detect_cluster_environment(env) == ClusterEnvironment()


def test_slurm_non_integer_procid_names_the_variable():
    env = {**SRUN_ENV, "SLURM_PROCID": "x"}
    with pytest.raises(ValueError, match=r"^Environment variable SLURM_PROCID='x' must be a whole number\.$"):
        detect_cluster_environment(env)


@pytest.mark.parametrize(("nodelist", "first"), [
    ("node[003-005,9]", "node003"),
    ("node[003-005,9],gpu1", "node003"),
    ("node[9,003-005]", "node9"),
    ("gpu1,node[1-2]", "gpu1"),
    ("a[1,3],b[2-4]", "a1"),
    ("gpu-node[7]", "gpu-node7"),
    ("host17", "host17"),
    ("  node[10-11] ", "node10"),
    ("login.cluster.example.org", "login.cluster.example.org"),
    ("node[1-2]-ib", "node1-ib"),
    ("node[07-09]-ib,gpu1", "node07-ib"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


# -- MPI ------------------------------------------------------------------------------------------------


def test_open_mpi_variables():
    env = {"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "head", "MASTER_PORT": "23456"}
    cluster = detect_cluster_environment(env)
    assert cluster == ClusterEnvironment(rank=6, world_size=8, local_rank=2, local_world_size=4,
                                         master_addr="head", master_port=23456, launcher="Open MPI")


def test_open_mpi_single_node_needs_no_master_addr():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    cluster = detect_cluster_environment(env)
    assert cluster == ClusterEnvironment(rank=1, world_size=4, local_rank=1, local_world_size=4,
                                         master_addr="127.0.0.1", master_port=29500, launcher="Open MPI")


def test_mpich_intel_pmi_variables():
    env = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
           "MASTER_ADDR": "10.9.8.7"}
    cluster = detect_cluster_environment(env)
    assert cluster == ClusterEnvironment(rank=3, world_size=4, local_rank=1, local_world_size=2,
                                         master_addr="10.9.8.7", master_port=29500, launcher="MPICH/Intel MPI")


def test_pmi_rank_without_size_is_not_mpi():
    assert detect_cluster_environment({"PMI_RANK": "1"}) == ClusterEnvironment()


def test_open_mpi_takes_precedence_over_pmi():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "PMI_RANK": "0", "PMI_SIZE": "5"}
    cluster = detect_cluster_environment(env)
    assert (cluster.launcher, cluster.rank, cluster.world_size) == ("Open MPI", 1, 2)


@pytest.mark.parametrize(("env", "launcher"), [
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, "Open MPI"),
    ({"PMI_RANK": "0", "PMI_SIZE": "8", "MPI_LOCALNRANKS": "4"}, "MPICH/Intel MPI"),
])
def test_multi_node_mpi_without_master_addr_raises(env, launcher):
    with pytest.raises(RuntimeError) as excinfo:
        detect_cluster_environment(env)
    message = str(excinfo.value)
    assert message.startswith(f"This {launcher} job spans several machines but MASTER_ADDR is not set")
    assert "export MASTER_ADDR" in message


def test_multi_node_mpi_with_master_addr_is_accepted():
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "MASTER_ADDR": "node01"}
    cluster = detect_cluster_environment(env)
    assert (cluster.rank, cluster.world_size, cluster.local_rank, cluster.local_world_size,
            cluster.master_addr, cluster.master_port) == (5, 8, 1, 4, "node01", 29500)


def test_mpi_non_integer_size_names_the_variable():
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "many"}
    with pytest.raises(ValueError, match=r"^Environment variable OMPI_COMM_WORLD_SIZE='many' must be a whole"):
        detect_cluster_environment(env)


# -- reading os.environ ---------------------------------------------------------------------------------


def test_reads_os_environ_when_no_mapping_is_given(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    monkeypatch.setenv("MASTER_ADDR", "example-host")
    monkeypatch.setenv("MASTER_PORT", "4242")
    assert detect_cluster_environment() == ClusterEnvironment(
        rank=2, world_size=6, local_rank=0, local_world_size=3, master_addr="example-host", master_port=4242,
        launcher="torchrun")


def test_an_empty_master_addr_means_the_default():
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": ""}
    assert detect_cluster_environment(env).master_addr == DEFAULT_MASTER_ADDR
