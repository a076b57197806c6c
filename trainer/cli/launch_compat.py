"""``accelerate launch`` flags that ``trainer launch`` also takes: each has its effect here, or one clear refusal.

Flags that map to a launch setting change the configuration (``--dynamo_backend`` → ``dynamo_config``),
the processes' environment (``--num_cpu_threads_per_process`` → ``OMP_NUM_THREADS``) or torchrun's own
arguments (``--tee``, ``--log_dir``, ``--role``, ``--rdzv_conf``). Flags of launch modes that do not
exist here (TPU pods, SageMaker, DeepSpeed's multi-node runners, ...) stop the launch with the reason.
"""

from __future__ import annotations

import argparse
from typing import Any

from trainer.parallelism import TRAINED

_REFUSED = {
    **dict.fromkeys(["tpu", "tpu_cluster", "no_tpu_cluster", "tpu_use_sudo", "vm", "downcast_bf16"],
                    "TPU pod launches are not available; run on the TPU host with --use_xla"),
    **dict.fromkeys(["aws_access_key_id", "aws_secret_access_key"], "SageMaker launches are not available"),
    **dict.fromkeys(["deepspeed_hostfile", "deepspeed_exclusion_filter", "deepspeed_inclusion_filter",
                     "deepspeed_multinode_launcher", "mpirun_hostfile"],
                    "several machines are launched with torchrun here: run trainer launch on each machine with "
                    "--num_machines, --machine_rank and --main_process_ip"),
    "deepspeed_moe_layer_cls_names": "the DeepSpeed strategy has no expert-parallel layers",
    "fsdp_version": "the FSDP strategy is FSDP2 (fully_shard) only; drop the flag",
    "fsdp_use_orig_params": "FSDP2 always keeps the original parameters; drop the flag",
    "enable_cpu_affinity": "CPU affinity is not set by trainer launch; use numactl or taskset around it",
    "use_parallelism_config": "N-D parallelism is a strategy option here",
}
_PARALLELISM = ["cp_backend", "cp_comm_strategy", "cp_size", "dp_replicate_size", "dp_shard_size", "pp_size",
                "sp_attn_implementation", "sp_backend", "sp_seq_length", "sp_seq_length_is_variable", "sp_size", "tp_size"]
_LAYOUT_SIZES = tuple(f"{dimension}_size" for dimension in TRAINED)  # applied to the configuration
_VALUE_FLAGS_REFUSED = ["aws_access_key_id", "aws_secret_access_key", "deepspeed_hostfile", "deepspeed_exclusion_filter",
                        "deepspeed_inclusion_filter", "deepspeed_multinode_launcher", "mpirun_hostfile",
                        "deepspeed_moe_layer_cls_names", "fsdp_version", "vm"]


def _flag(name: str) -> list[str]:
    return [f"--{name}", f"--{name.replace('_', '-')}"] if "_" in name else [f"--{name}"]


def register(parser: argparse.ArgumentParser) -> None:
    """Add the flags (in their own help group)."""
    group = parser.add_argument_group("accelerate launch flags", "also accepted, as accelerate launch takes them")
    group.add_argument(*_flag("dynamo_backend"), help="torch.compile the prepared models with this backend")
    group.add_argument(*_flag("dynamo_mode"), help="torch.compile mode")
    for name in ("dynamo_use_fullgraph", "dynamo_use_dynamic", "dynamo_use_regional_compilation"):
        group.add_argument(*_flag(name), action="store_true", default=None)
    group.add_argument(*_flag("num_cpu_threads_per_process"), type=int, help="OMP_NUM_THREADS of each process")
    group.add_argument(*_flag("gpu_ids"), help="which GPUs to use ('all' or e.g. '0,1'): CUDA_VISIBLE_DEVICES")
    group.add_argument("--debug", action="store_true", default=None, help="TORCH_DISTRIBUTED_DEBUG=DETAIL")
    group.add_argument("-q", "--quiet", action="store_true", help="accepted; torchrun's start-up notice is short here")
    group.add_argument(*_flag("main_training_function"), help="accepted (names the function notebook launches call)")
    group.add_argument(*_flag("same_network"), action="store_true", help="accepted (machines reach each other directly)")
    group.add_argument(*_flag("tee"), help="torchrun --tee: copy the processes' streams into --log_dir files")
    group.add_argument(*_flag("log_dir"), help="torchrun --log-dir")
    group.add_argument(*_flag("role"), help="torchrun --role")
    group.add_argument(*_flag("rdzv_conf"), help="torchrun --rdzv-conf")
    group.add_argument(*_flag("no_python"), action="store_true", help="run the script as an executable, not with python")
    for name in _REFUSED:
        if name in _VALUE_FLAGS_REFUSED:
            group.add_argument(*_flag(name), default=None, help=argparse.SUPPRESS)
        else:
            group.add_argument(*_flag(name), action="store_true", default=None, help=argparse.SUPPRESS)
    for name in _PARALLELISM:
        group.add_argument(*_flag(f"parallelism_config_{name}"), nargs="?", const=True, default=None,
                           help=argparse.SUPPRESS)


def refusal(args: argparse.Namespace) -> str | None:
    """The reason the launch cannot go ahead with these flags, or None."""
    for name, reason in _REFUSED.items():
        if vars(args).get(name) not in (None, False):
            return f"--{name} is not available: {reason}."
    for name in _PARALLELISM:
        if name not in _LAYOUT_SIZES and vars(args).get(f"parallelism_config_{name}") is not None:
            return (f"--parallelism_config_{name} is not available: context and sequence parallelism are not available "
                    "here (the data-parallel, tensor-parallel and pipeline sizes are).")
    for name in _LAYOUT_SIZES:
        value = vars(args).get(f"parallelism_config_{name}")
        if value is not None and (value is True or not str(value).isdigit() or int(value) < 1):
            given = "" if value is True else f" {value}"
            return f"--parallelism_config_{name}{given}: give a whole number >= 1."
    return None


def apply(args: argparse.Namespace, config: dict[str, Any]) -> None:
    """Put the flags' settings into the launch configuration (before it is validated)."""
    dynamo = {key: vars(args).get(key) for key in ("dynamo_backend", "dynamo_mode", "dynamo_use_fullgraph",
                                                    "dynamo_use_dynamic", "dynamo_use_regional_compilation")}
    dynamo = {key: value for key, value in dynamo.items() if value is not None}
    if dynamo:
        config["dynamo_config"] = {**config.get("dynamo_config", {}), **dynamo}
    sizes = {f"parallelism_config_{name}": int(vars(args)[f"parallelism_config_{name}"]) for name in _LAYOUT_SIZES
             if vars(args).get(f"parallelism_config_{name}") is not None}
    if sizes:
        config["parallelism_config"] = {**config.get("parallelism_config", {}), **sizes}
    if args.gpu_ids is not None:
        config["gpu_ids"] = args.gpu_ids
    if args.debug:
        config["debug"] = True


def environment(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, str]:
    """Variables the flags (or the configuration's gpu_ids and debug) set for the processes."""
    env: dict[str, str] = {}
    if args.num_cpu_threads_per_process is not None:
        env["OMP_NUM_THREADS"] = str(args.num_cpu_threads_per_process)
    gpu_ids = str(config.get("gpu_ids", "all"))
    if gpu_ids != "all":
        env["CUDA_VISIBLE_DEVICES"] = gpu_ids
    if config.get("debug"):
        env["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
    return env


def torchrun_arguments(args: argparse.Namespace) -> list[str]:
    """torchrun's own arguments given through the flags."""
    argv = []
    for name, flag in (("tee", "--tee"), ("log_dir", "--log-dir"), ("role", "--role"), ("rdzv_conf", "--rdzv-conf")):
        if vars(args).get(name) is not None:
            argv.append(f"{flag}={vars(args)[name]}")
    return argv
