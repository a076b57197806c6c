"""Two-process FSDP runs whose results test_fsdp.py compares with one process, all in one launch.

Every run trains the same model on the same global batches; each writes the full weights it
ended with (and whatever else its check needs) under the output folder. The model, the data
and the loops are importable, so the test's one-process references run exactly the same code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from strategies import DDP, FSDP  # noqa: E402
from trainer import Accelerator, set_seed  # noqa: E402

STEPS, BATCH, LR, CLIP = 20, 8, 1e-2, 0.05  # BATCH per process; one process takes 2 * BATCH
FORWARDS = {"blocks": 0}  # Block.forward calls (activation checkpointing runs each twice)


class Block(nn.Module):
    """A residual layer: the class TRANSFORMER_BASED_WRAP makes a shard unit of."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        FORWARDS["blocks"] += 1
        return x + self.dropout(torch.tanh(self.linear(self.norm(x))))


class Net(nn.Module):
    _no_split_modules = ["Block"]

    def __init__(self, dropout: float = 0.0, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(6, width)
        self.blocks = nn.ModuleList(Block(width, dropout) for _ in range(depth))
        self.head = nn.Linear(width, 3)
        # Not in the state dict: cpu_ram_efficient_loading must still give it to processes built on meta.
        self.register_buffer("scale", torch.full((6,), 0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x * self.scale)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def make_model(dropout: float = 0.0) -> Net:
    torch.manual_seed(3)
    return Net(dropout)


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    samples = 2 * BATCH * 2 * STEPS  # 20 steps of 2 processes x BATCH x accumulation 2
    return TensorDataset(torch.randn(samples, 6, generator=generator), torch.randint(0, 3, (samples,), generator=generator))


def train_loop(accelerator: Accelerator, model: nn.Module, optimizer, loader, clip: float | None = None) -> list[float]:
    """Micro-batches under accumulate() until STEPS optimizer steps; returns the gradient norms when clipping."""
    done, norms = 0, []
    while True:
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(x), y))
                if clip is not None and accelerator.sync_gradients:
                    norms.append(float(accelerator.clip_grad_norm_(model.parameters(), clip)))
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                done += 1
                if done == STEPS:
                    return norms


def run(strategy, accumulation: int = 1, batch: int = BATCH, clip: float | None = None, dropout: float = 0.0,
        build_in_context: bool = False, precision: str = "no") -> tuple[Accelerator, nn.Module, dict]:
    """One seeded run: AdamW, shuffled loader, STEPS optimizer steps."""
    set_seed(0)
    accelerator = Accelerator(strategy=strategy, gradient_accumulation_steps=accumulation, mixed_precision=precision)
    facts: dict = {}
    if build_in_context:
        with accelerator.strategy.module_sharded_context():
            model = make_model(dropout)
        facts["built_on_meta"] = all(p.is_meta for p in model.parameters())
    else:
        model = make_model(dropout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loader = DataLoader(dataset(), batch_size=batch, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    facts["norms"] = train_loop(accelerator, model, optimizer, loader, clip)
    return accelerator, model, facts


def full_weights(accelerator: Accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights on every process (gathered from the shards under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if isinstance(accelerator.strategy, FSDP):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                     broadcast_from_rank0=False))
    return {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}


def shard_bytes(model: nn.Module, optimizer) -> dict[str, int]:
    """This process's bytes of parameters and optimizer state, and what the whole (unsharded) ones take."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    tensors = list(model.parameters()) + [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return {"local": sum(local(t).numel() * t.element_size() for t in tensors),
            "total": sum(t.numel() * t.element_size() for t in tensors),
            "dtensors": sum(hasattr(p, "to_local") for p in model.parameters()),
            "parameters": len(list(model.parameters()))}


def save_main(accelerator: Accelerator, tensors: dict[str, torch.Tensor], path: Path) -> None:
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def matrix(out: Path) -> None:
    """Single process (in the test) vs DDP vs the FSDP sharding strategies, with accumulation 1 and 2."""
    variants = {
        "ddp": lambda: DDP(), "full_shard": lambda: FSDP(sharding_strategy="FULL_SHARD"),
        "shard_grad_op": lambda: FSDP(sharding_strategy="SHARD_GRAD_OP"),
        "no_shard": lambda: FSDP(sharding_strategy="NO_SHARD"),
        "hybrid_shard": lambda: FSDP(sharding_strategy="HYBRID_SHARD", hybrid_shard_size=1),
        "hybrid_local": lambda: FSDP(sharding_strategy="HYBRID_SHARD"),  # LOCAL_WORLD_SIZE=2: a (1 x 2) mesh
        "offload": lambda: FSDP(offload_params=True), "forward_prefetch": lambda: FSDP(forward_prefetch=True),
        "size_wrap": lambda: FSDP(auto_wrap_policy="SIZE_BASED_WRAP", min_num_params=200),
        "callable_wrap": lambda: FSDP(auto_wrap_policy=lambda m: isinstance(m, nn.Linear)),
        "no_wrap": lambda: FSDP(auto_wrap_policy="NO_WRAP"),
    }
    for k in (1, 2):
        for name, make in variants.items():
            if k == 2 and name not in ("ddp", "full_shard", "shard_grad_op", "hybrid_shard"):
                continue
            accelerator, model, _ = run(make(), accumulation=k)
            save_main(accelerator, full_weights(accelerator, model), out / f"{name}_k{k}.safetensors")
            if name == "full_shard" and k == 1:
                optimizer = accelerator._optimizers[0].optimizer
                counts = shard_bytes(model, optimizer)
                (out / f"bytes_rank{accelerator.process_index}.json").write_text(json.dumps(counts))


def clipping(out: Path) -> None:
    accelerator, model, facts = run(FSDP(), clip=CLIP)
    save_main(accelerator, full_weights(accelerator, model), out / "clip.safetensors")
    if accelerator.is_main_process:
        (out / "clip_norms.json").write_text(json.dumps(facts["norms"]))


def activation_checkpointing(out: Path) -> None:
    """With dropout: the recomputed forward must draw the same masks, or the weights would differ."""
    calls = {}
    for flag in (False, True):
        FORWARDS["blocks"] = 0
        accelerator, model, _ = run(FSDP(activation_checkpointing=flag), dropout=0.1)
        calls[str(flag)] = FORWARDS["blocks"]
        save_main(accelerator, full_weights(accelerator, model), out / f"ac_{flag}.safetensors")
    if accelerator.is_main_process:
        (out / "ac_calls.json").write_text(json.dumps(calls))


def cpu_ram_efficient_loading(out: Path) -> None:
    accelerator, model, facts = run(FSDP(cpu_ram_efficient_loading=True), build_in_context=True)
    save_main(accelerator, full_weights(accelerator, model), out / "ram_efficient.safetensors")
    (out / f"ram_efficient_rank{accelerator.process_index}.json").write_text(json.dumps(
        {"built_on_meta": facts["built_on_meta"], "scale": model.scale.tolist()}))


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 2 * BATCH samples of optimizer step ``step`` (fixed, so a run resumed at any step sees the same)."""
    x, y = dataset().tensors
    return x[step * 2 * BATCH:(step + 1) * 2 * BATCH], y[step * 2 * BATCH:(step + 1) * 2 * BATCH]


def explicit_steps(accelerator: Accelerator, model: nn.Module, optimizer, first: int, last: int) -> None:
    """Steps first..last-1 on fixed global batches, each process on its part of them."""
    n, r = accelerator.num_processes, accelerator.process_index
    for step in range(first, last):
        x, y = global_batch(step)
        part = slice(r * len(x) // n, (r + 1) * len(x) // n)
        accelerator.backward(F.cross_entropy(model(x[part]), y[part]))
        optimizer.step()
        optimizer.zero_grad()


def resumable(strategy) -> tuple[Accelerator, nn.Module, torch.optim.Optimizer]:
    set_seed(0)
    accelerator = Accelerator(strategy=strategy)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def checkpoint_resume(out: Path) -> None:
    """Save a sharded checkpoint at step 10 of 20, then resume it on two processes (the test resumes on one)."""
    accelerator, model, optimizer = resumable(FSDP(state_dict_type="SHARDED_STATE_DICT"))
    explicit_steps(accelerator, model, optimizer, 0, STEPS // 2)
    iteration = accelerator.save_iteration
    accelerator.save_state(out / "ckpt")
    accelerator.save_iteration = iteration  # the same moment again, written in the background (DCP's async_save)
    accelerator.save_state(out / "ckpt_async", blocking=False)
    explicit_steps(accelerator, model, optimizer, STEPS // 2, STEPS)
    accelerator.wait_for_checkpoint()
    save_main(accelerator, full_weights(accelerator, model), out / "straight.safetensors")

    accelerator, model, optimizer = resumable(FSDP(state_dict_type="SHARDED_STATE_DICT"))
    accelerator.load_state(out / "ckpt")
    explicit_steps(accelerator, model, optimizer, STEPS // 2, STEPS)
    save_main(accelerator, full_weights(accelerator, model), out / "resumed2.safetensors")


def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)


def gpt2_input() -> torch.Tensor:
    return torch.arange(2 * 16).view(2, 16) % 128


def gpt2(out: Path) -> None:
    """A transformers GPT2 (from a config) trained a few steps, its layers the shard units, saved sharded."""
    from transformers import GPT2LMHeadModel

    set_seed(0)
    accelerator = Accelerator(strategy=FSDP(state_dict_type="SHARDED_STATE_DICT"))
    model = GPT2LMHeadModel(gpt2_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    units = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "reshard") and m is not model})
    generator = torch.Generator().manual_seed(accelerator.process_index)
    for _ in range(3):
        tokens = torch.randint(0, 128, (2, 16), generator=generator)
        accelerator.backward(model(input_ids=tokens, labels=tokens).loss)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.save_state(out / "gpt2_ckpt")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=gpt2_input()).logits
    weights = full_weights(accelerator, model)
    save_main(accelerator, {**weights, "__logits__": logits}, out / "gpt2_reference.safetensors")
    if accelerator.is_main_process:
        (out / "gpt2_units.json").write_text(json.dumps(units))


def mixed_precision(out: Path) -> None:
    """bf16: the units compute with bf16 parameters (the MixedPrecisionPolicy), the shards stay fp32."""
    seen = {}
    for precision in ("no", "bf16"):
        dtypes: list[str] = []
        set_seed(0)
        accelerator = Accelerator(strategy=FSDP(), mixed_precision=precision)
        model = make_model()
        handle = model.blocks[0].linear.register_forward_pre_hook(
            lambda m, args, seen=dtypes: seen.append(str(m.weight.dtype)))
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        model, optimizer = accelerator.prepare(model, optimizer)
        x, y = global_batch(0)
        loss = F.cross_entropy(model(x[:BATCH]), y[:BATCH])
        accelerator.backward(loss)
        optimizer.step()
        handle.remove()
        seen[precision] = {"compute": dtypes[0], "shard": str(model.blocks[0].linear.weight.dtype),
                           "grad": str(model.blocks[0].linear.weight.grad.dtype), "loss": float(loss.detach())}
    if accelerator.is_main_process:
        (out / "precision.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    from checks import leave

    out = Path(sys.argv[1])
    checks = sys.argv[2:] or ["matrix", "clipping", "activation_checkpointing", "cpu_ram_efficient_loading",
                              "checkpoint_resume", "gpt2", "mixed_precision"]
    for check in checks:
        globals()[check](out)
        print(f"done {check} rank {os.environ['RANK']}", flush=True)
    print(f"OK rank {os.environ['RANK']}", flush=True)
    leave()
