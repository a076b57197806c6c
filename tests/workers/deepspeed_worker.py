"""Two-process DeepSpeed (ZeRO 1-3) runs whose results test_deepspeed.py compares with one process.

Every run uses the shared model, data and loop of ddp_setup.py with AdamW. Rank 0 writes what
the test reads; the process exits normally after ``end_training`` (no hard exit), so an abort
at interpreter shutdown would fail the test.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from ddp_setup import STEPS, dataset, make_model, train_steps  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from strategies import DeepSpeed  # noqa: E402
from trainer import Accelerator, set_seed  # noqa: E402

LR = 1e-2
PROBE = torch.linspace(-2, 2, 5 * 6).view(5, 6)  # a fixed input for the export check


def strategy(stage: int, **kwargs) -> DeepSpeed:
    # Small parameters stay whole on every process under ZeRO-3 by default; this model has only small ones.
    config = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else None
    return DeepSpeed(config=config, zero_stage=stage, **kwargs)


def setup(stage: int, accumulation: int, batch_size: int = 8, **kwargs):
    set_seed(0)
    accelerator = Accelerator(strategy=strategy(stage, **kwargs), gradient_accumulation_steps=accumulation)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loader = DataLoader(dataset(), batch_size=batch_size, shuffle=True)
    return accelerator, *accelerator.prepare(model, optimizer, loader)


def shard_bytes(accelerator, model) -> dict[str, int]:
    """This process's bytes of parameters and optimizer state (ZeRO-3), and what they would be unsharded."""
    engine = accelerator.strategy.engine
    zero = engine.optimizer
    params = list(accelerator.unwrap_model(model).parameters())
    numel = sum(p.ds_numel for p in params)
    local_params = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() + p.data.numel() * p.data.element_size()
                       for p in params)
    master = sum(t.numel() * t.element_size() for t in zero.fp32_partitioned_groups_flat)
    moments = sum(v.numel() * v.element_size() for state in zero.optimizer.state.values() for v in state.values()
                  if torch.is_tensor(v))
    return {"numel": numel, "local_params": local_params, "local_optimizer": master + moments,
            # the same state on one process: weights, fp32 master weights, two AdamW moments
            "full_params": 4 * numel, "full_optimizer": 4 * numel + 8 * numel,
            "plain_adamw": 12 * numel}


def train(out: Path, stage: int, accumulation: int, timings: dict[str, float]) -> None:
    start = time.perf_counter()
    accelerator, model, optimizer, loader = setup(stage, accumulation)
    train_steps(accelerator, model, optimizer, loader)
    name = f"z{stage}_k{accumulation}"
    accelerator.save_model(model, out / name)
    if stage == 3 and accumulation == 1:
        sizes = shard_bytes(accelerator, model)
        (out / f"memory_rank{accelerator.process_index}.json").write_text(json.dumps(sizes))
        with torch.no_grad():
            model.eval()
            outputs = model(PROBE)
        if accelerator.is_main_process:
            save_file({"outputs": outputs.contiguous()}, str(out / f"{name}_outputs.safetensors"))
        # The same weights gathered in the training dtype (fp32 here) rather than from the fp32 master copy.
        accelerator.strategy.config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
        accelerator.save_model(model, out / f"{name}_16bit")
    accelerator.wait_for_everyone()
    accelerator.strategy.teardown()
    timings[name] = time.perf_counter() - start


def steps(accelerator, model, optimizer, loader, count: int, skip: int = 0) -> None:
    """``count`` optimizer steps (accumulation 1), starting ``skip`` batches into the loader's pass."""
    batches = accelerator.skip_first_batches(loader, skip) if skip else loader
    for done, (x, y) in enumerate(batches, start=1):
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
        if done == count:
            return


def resume(out: Path, stage: int, timings: dict[str, float], checkpoint_format: str = "safetensors") -> Accelerator:
    """Ten steps, save_state, a fresh run that load_state()s and does the other ten; returns the second run's."""
    start = time.perf_counter()
    half = STEPS // 2
    accelerator, model, optimizer, loader = setup(stage, 1, checkpoint_format=checkpoint_format)
    steps(accelerator, model, optimizer, loader, half)
    checkpoint = out / f"checkpoint_z{stage}_{checkpoint_format}"
    accelerator.save_state(checkpoint)
    accelerator.strategy.teardown()

    torch.manual_seed(123)  # the second run starts from other weights: only the checkpoint can make them equal
    trust = checkpoint_format == "deepspeed"
    accelerator, model, optimizer, loader = setup(stage, 1, checkpoint_format=checkpoint_format)
    with torch.no_grad():
        for p in accelerator.unwrap_model(model).parameters():
            p.add_(1.0)
    if trust:
        try:
            accelerator.load_state(checkpoint)
        except ValueError as error:
            if accelerator.is_main_process:
                (out / "untrusted_error.txt").write_text(str(error))
        else:
            raise AssertionError("DeepSpeed's pickled checkpoint loaded without trust_deepspeed_checkpoints=True")
        accelerator.strategy.trust_deepspeed_checkpoints = True
    accelerator.load_state(checkpoint)
    steps(accelerator, model, optimizer, loader, half, skip=loader.position)
    accelerator.save_model(model, out / f"resumed_z{stage}_{checkpoint_format}")
    timings[f"resume_z{stage}_{checkpoint_format}"] = time.perf_counter() - start
    return accelerator


def save_on_four(out: Path) -> None:
    """ZeRO-3 on four processes (4 x 4 samples a step): ten steps, save_state, ten more."""
    half = STEPS // 2
    accelerator, model, optimizer, loader = setup(3, 1, batch_size=4)
    steps(accelerator, model, optimizer, loader, half)
    accelerator.save_state(out / "checkpoint_z3_four")
    accelerator.save_model(model, out / "z3_four_at_save")
    steps(accelerator, model, optimizer, loader, half, skip=loader.position)
    accelerator.save_model(model, out / "z3_four_straight")
    print(f"OK rank {os.environ['RANK']}", flush=True)
    accelerator.end_training()


def resume_from_four(out: Path) -> None:
    """The four processes' ZeRO-3 checkpoint resumed here on two (2 x 8 samples a step: the same global batches)."""
    accelerator, model, optimizer, loader = setup(3, 1)
    accelerator.load_state(out / "checkpoint_z3_four")
    steps(accelerator, model, optimizer, loader, STEPS // 2, skip=loader.position)
    accelerator.save_model(model, out / "z3_from_four")
    accelerator.strategy.teardown()


if __name__ == "__main__":
    out = Path(sys.argv[1])
    if sys.argv[2:] == ["four"]:
        save_on_four(out)
        sys.exit(0)
    timings: dict[str, float] = {}
    for stage in (1, 2, 3):
        for accumulation in (1, 2):
            train(out, stage, accumulation, timings)
    for stage, checkpoint_format in ((1, "safetensors"), (2, "safetensors"), (2, "deepspeed")):
        resume(out, stage, timings, checkpoint_format).strategy.teardown()
    resume_from_four(out)
    # The last run ends as a script does: end_training() with a live ZeRO-3 engine, then a normal exit.
    accelerator = resume(out, 3, timings)
    if accelerator.is_main_process:
        (out / "timings.json").write_text(json.dumps(timings))
    print(f"OK rank {os.environ['RANK']}", flush=True)
    accelerator.end_training()
