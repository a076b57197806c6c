"""N-D parallel runs on 4 CPU processes (gloo) of a small Llama, for tests/test_parallelism.py.

``parallel_worker.py OUT LAYOUT ACCUMULATION``: LAYOUT is ``dp_shard=2,tp=2`` and the like. The
run takes 20 AdamW steps on fixed global batches (each data-parallel process on its part of
them), then process 0 writes the full weights, and every process its parameter and optimizer
bytes, to OUT. The test runs the same steps on one process and compares.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
from checks import leave  # noqa: E402
from parallel_setup import BATCH, global_batch, llama, llama_trainer, local_bytes, token_dataset, train  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from trainer import Accelerator, ParallelismConfig  # noqa: E402


def settings(layout: str) -> dict[str, Any]:
    """``dp_shard=2,tp=2`` -> ParallelismConfig's keywords (sizes get ``_size``; ``pp_schedule=GPipe`` stays)."""
    parts = dict(part.split("=") for part in layout.split(","))
    return {(name if not value.isdigit() else f"{name}_size"): (int(value) if value.isdigit() else value)
            for name, value in parts.items()}


def run(out: Path, layout: str, accumulation: int) -> None:
    config = ParallelismConfig(**settings(layout))
    accelerator = Accelerator(parallelism_config=config, gradient_accumulation_steps=accumulation)
    model = llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    shard = accelerator.strategy.distributed_sampler_kwargs
    train(accelerator, model, optimizer, accumulation, shard["rank"], shard["num_replicas"],
          forward_backward=config.pp_size > 1)
    tag = f"{layout.replace('=', '').replace(',', '_')}_k{accumulation}"
    weights = accelerator.get_state_dict(model)  # the whole weights, gathered onto process 0
    if accelerator.is_main_process:
        (out / tag).mkdir()
        save_file({name: value.contiguous() for name, value in weights.items()}, str(out / tag / "model.safetensors"))
    (out / f"{tag}_bytes_{accelerator.process_index}.json").write_text(json.dumps(local_bytes(model, optimizer)))
    facts = {"pp": accelerator.pipeline_parallel_rank, "dp_replicate": accelerator.data_parallel_rank,
             "dp_shard": accelerator.data_parallel_shard_rank, "cp": accelerator.context_parallel_rank,
             "tp": accelerator.tensor_parallel_rank, "mesh": list(accelerator.torch_device_mesh.mesh_dim_names),
             "config": accelerator.parallelism_config is config, "fsdp2": accelerator.is_fsdp2,
             "composable": accelerator.is_composable_parallelism_enabled, "save": accelerator.should_save_model,
             "multi_device": accelerator.multi_device}
    (out / f"{tag}_layout_{accelerator.process_index}.json").write_text(json.dumps(facts))
    accelerator.wait_for_everyone()


def prepared(layout: str, state_dict_type: str) -> tuple[Accelerator, torch.nn.Module, torch.optim.Optimizer]:
    from trainer.utils import FullyShardedDataParallelPlugin

    accelerator = Accelerator(parallelism_config=ParallelismConfig(**settings(layout)),
                              fsdp_plugin=FullyShardedDataParallelPlugin(state_dict_type=state_dict_type))
    model = llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def steps(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, first: int, last: int) -> None:
    shard = accelerator.strategy.distributed_sampler_kwargs
    train(accelerator, model, optimizer, 1, shard["rank"], shard["num_replicas"], range(first, last),
          forward_backward=accelerator.strategy.parallelism.pp_size > 1)


def checkpoints(out: Path) -> None:
    """Save on dp_shard=2 x tp=2 at step 10 of 20 (whole and sharded state), go on to 20; resume on dp_shard=4."""
    for kind in ("FULL_STATE_DICT", "SHARDED_STATE_DICT"):
        accelerator, model, optimizer = prepared("dp_shard=2,tp=2", kind)
        steps(accelerator, model, optimizer, 0, 10)
        accelerator.save_state(out / f"ckpt_{kind}")
        steps(accelerator, model, optimizer, 10, 20)
        accelerator.save_model(model, out / f"straight_{kind}")
        accelerator, model, optimizer = prepared("dp_shard=4", kind)
        accelerator.load_state(out / f"ckpt_{kind}")
        steps(accelerator, model, optimizer, 10, 20)
        accelerator.save_model(model, out / f"resumed4_{kind}")


def pipeline_checkpoints(out: Path) -> None:
    """Save on pp=2 x dp_shard=2 at step 10 of 20, go on to 20, resume on dp_shard=4; and resume the
    dp_shard=2 x tp=2 checkpoint of ``checkpoints`` on pipeline stages."""
    pipelined = "pp=2,dp_shard=2"
    accelerator, model, optimizer = prepared(pipelined, "FULL_STATE_DICT")  # stages write sharded state anyway
    steps(accelerator, model, optimizer, 0, 10)
    accelerator.save_state(out / "ckpt_pp")
    steps(accelerator, model, optimizer, 10, 20)
    accelerator.save_model(model, out / "straight_pp")
    accelerator, model, optimizer = prepared("dp_shard=4", "SHARDED_STATE_DICT")
    accelerator.load_state(out / "ckpt_pp")
    steps(accelerator, model, optimizer, 10, 20)
    accelerator.save_model(model, out / "resumed4_pp")
    accelerator, model, optimizer = prepared(pipelined, "SHARDED_STATE_DICT")
    accelerator.load_state(out / "ckpt_SHARDED_STATE_DICT")  # read into the stages once the first step cuts them
    steps(accelerator, model, optimizer, 10, 20)
    accelerator.save_model(model, out / "pp_resumed_from_tp")


def dropout_evaluation(out: Path) -> None:
    """Stages traced in training mode from a model with dropout refuse to evaluate (the graph keeps the dropout)."""
    accelerator = Accelerator(parallelism_config=ParallelismConfig(pp_size=2, dp_shard_size=2))
    model = llama()
    for module in model.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    model = accelerator.prepare(model)
    shard = accelerator.strategy.distributed_sampler_kwargs
    tokens = global_batch(0)[shard["rank"] * BATCH // 2:(shard["rank"] + 1) * BATCH // 2]
    model.build(tokens)
    model.eval()
    try:
        with torch.no_grad():
            model(tokens)
    except RuntimeError as error:
        if accelerator.is_main_process:
            (out / "pp_dropout_error.txt").write_text(str(error))


def pipeline_precision(out: Path) -> None:
    """bf16 through pipeline stages (the stages run in the policy's autocast): five steps; fp16 is refused at prepare."""
    accelerator = Accelerator(mixed_precision="bf16", parallelism_config=ParallelismConfig(pp_size=2, dp_shard_size=2))
    model = llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    shard = accelerator.strategy.distributed_sampler_kwargs
    train(accelerator, model, optimizer, 1, shard["rank"], shard["num_replicas"], range(5), forward_backward=True)
    weights = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        (out / "pp_bf16").mkdir()
        save_file({name: value.contiguous() for name, value in weights.items()}, str(out / "pp_bf16" / "model.safetensors"))
    try:
        Accelerator(mixed_precision="fp16", parallelism_config=ParallelismConfig(pp_size=2, dp_shard_size=2)).prepare(llama())
    except ValueError as error:
        if accelerator.is_main_process:
            (out / "pp_fp16_error.txt").write_text(str(error))


def trainer_run(out: Path) -> None:
    """The Trainer with parallelism=dp_shard=2 x tp=2: each data-parallel pair reads half of each global batch."""
    trainer = llama_trainer(out / "trainer_run", BATCH // 2, parallelism=ParallelismConfig(dp_shard_size=2, tp_size=2))
    trainer.fit()
    trainer.accelerator.save_model(trainer.model, out / "trainer")
    trainer = llama_trainer(out / "trainer_pp_run", BATCH // 2, pipelined=True, eval_data=token_dataset(),
                            parallelism=ParallelismConfig(pp_size=2, dp_shard_size=2))
    metrics = trainer.fit()  # validation at the epoch's end runs through the stages too
    trainer.accelerator.save_model(trainer.model, out / "trainer_pp")
    if trainer.accelerator.is_main_process:
        (out / "trainer_pp_metrics.json").write_text(json.dumps(metrics))
    layout = ParallelismConfig(pp_size=2, dp_shard_size=2)  # ten steps, a checkpoint, then a new run resumes it
    first = llama_trainer(out / "trainer_pp_half", BATCH // 2, pipelined=True, max_steps=10, parallelism=layout)
    first.fit()
    first.save_checkpoint(out / "trainer_pp_half" / "step10")
    second = llama_trainer(out / "trainer_pp_rest", BATCH // 2, pipelined=True, parallelism=layout)
    second.fit(resume=out / "trainer_pp_half" / "step10")  # read into the stages at the first step
    second.accelerator.save_model(second.model, out / "trainer_pp_resumed")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    for layout, accumulation in (part.split(":") for part in sys.argv[2].split(";")):
        run(out, layout, int(accumulation))
    trainer_run(out)
    checkpoints(out)
    pipeline_checkpoints(out)
    dropout_evaluation(out)
    pipeline_precision(out)
    print(f"OK rank {os.environ['RANK']}", flush=True)
    leave()
