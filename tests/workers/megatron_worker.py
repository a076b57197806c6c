"""Two-process tensor-parallel (TP=2) runs whose results test_megatron.py compares with one dense process.

The model is a transformer block: self-attention with a column-parallel QKV projection (each rank
holds whole heads) and a row-parallel output projection, then a column-parallel/row-parallel
MLP, with layer norms and a classification head that every rank holds whole. The dense model
has the same parameter names and the TP model starts from slices of its weights, so the two
must train alike. Importing this file runs nothing (the test imports the dense model from it).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

HIDDEN, HEADS, SEQ, CLASSES = 16, 4, 5, 3
STEPS, BATCH, LR = 20, 8, 1e-2


def _out(result: Any) -> torch.Tensor:
    """megatron-core's parallel linears return (output, bias); a dense Linear returns the output."""
    return result[0] if isinstance(result, tuple) else result


class Block(nn.Module):
    """Pre-norm attention + MLP block; ``heads`` is the number of heads this process computes."""

    def __init__(self, linear: Callable[..., nn.Module], heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        # QKV rows are head-major ([head0: q, k, v], [head1: q, k, v]...): a row slice holds whole heads.
        # No QKV bias: the key bias's gradient is zero in exact arithmetic (softmax ignores it), so AdamW
        # would turn rounding noise into full-size steps and no two summation orders would agree.
        self.qkv = linear("column", HIDDEN, 3 * HIDDEN, bias=False)
        self.proj = linear("row", HIDDEN, HIDDEN)
        self.fc1 = linear("column", HIDDEN, 4 * HIDDEN)
        self.fc2 = linear("row", 4 * HIDDEN, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = _out(self.qkv(self.norm1(x))).view(b, s, self.heads, 3, HIDDEN // HEADS)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1)
        x = x + _out(self.proj(attended))
        x = x + _out(self.fc2(F.gelu(_out(self.fc1(self.norm2(x))))))
        return self.head(x.mean(dim=1))


def dense_model() -> Block:
    torch.manual_seed(3)
    return Block(lambda kind, n_in, n_out, bias=True: nn.Linear(n_in, n_out, bias=bias), HEADS)


def dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    samples = BATCH * STEPS
    return TensorDataset(torch.randn(samples, SEQ, HIDDEN, generator=generator),
                         torch.randint(0, CLASSES, (samples,), generator=generator))


def dense_run(steps: int = STEPS) -> dict[str, torch.Tensor]:
    """The reference: the dense model, one process, the same batches and AdamW."""
    model = dense_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    for _, (x, y) in zip(range(steps), DataLoader(dataset(), batch_size=BATCH, shuffle=False)):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tp_model(strategy: Any) -> Block:
    """The tensor-parallel block, its slices cut from the dense model's initial weights."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    config = strategy.model_parallel_config()

    def linear(kind: str, n_in: int, n_out: int, bias: bool = True) -> nn.Module:
        if kind == "column":
            return ColumnParallelLinear(n_in, n_out, config=config, init_method=nn.init.zeros_, bias=bias,
                                        gather_output=False)
        return RowParallelLinear(n_in, n_out, config=config, init_method=nn.init.zeros_, bias=bias,
                                 input_is_parallel=True, skip_bias_add=False)

    model = Block(linear, HEADS // strategy.tp_degree)
    dense = dense_model().state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            full = dense[name]
            if getattr(p, "tensor_model_parallel", False):
                full = full.chunk(strategy.tp_degree, dim=p.partition_dim)[strategy.tp_rank]
            p.copy_(full)
    return model


def setup() -> tuple:
    from strategies import Megatron
    from trainer import Accelerator

    accelerator = Accelerator(strategy=Megatron(tp_degree=2))
    model = tp_model(accelerator.strategy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    loader = DataLoader(dataset(), batch_size=BATCH, shuffle=False)
    return accelerator, *accelerator.prepare(model, optimizer, loader)


def steps(accelerator, model, optimizer, loader, count: int, skip: int = 0) -> None:
    batches = accelerator.skip_first_batches(loader, skip) if skip else loader
    for done, (x, y) in enumerate(batches, start=1):
        accelerator.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
        if done == count:
            return


if __name__ == "__main__":
    out = Path(sys.argv[1])
    timings: dict[str, float] = {}
    start = time.perf_counter()
    accelerator, model, optimizer, loader = setup()
    rank = accelerator.process_index
    steps(accelerator, model, optimizer, loader, STEPS // 2)
    accelerator.save_state(out / "checkpoint_10")
    steps(accelerator, model, optimizer, loader, STEPS // 2, skip=STEPS // 2)
    accelerator.save_model(model, out / "straight")
    norm = accelerator.strategy.grad_norm(list(model.parameters()))  # no gradients left: 0
    sizes = {name: list(p.shape) for name, p in accelerator.unwrap_model(model).named_parameters()}
    (out / f"shapes_rank{rank}.json").write_text(json.dumps(sizes))
    timings["straight"] = time.perf_counter() - start
    accelerator.strategy.teardown()

    start = time.perf_counter()
    accelerator, model, optimizer, loader = setup()
    with torch.no_grad():  # the second run starts from other weights: only the checkpoint can make them equal
        for p in accelerator.unwrap_model(model).parameters():
            p.add_(1.0)
    accelerator.load_state(out / "checkpoint_10")
    steps(accelerator, model, optimizer, loader, STEPS // 2, skip=loader.position)
    accelerator.save_model(model, out / "resumed")
    timings["resumed"] = time.perf_counter() - start

    # Gradient clipping: the norm over the TP slices equals the dense model's norm for the same batch.
    x, y = dataset()[:BATCH]
    model.zero_grad()
    accelerator.backward(F.cross_entropy(model(x), y))
    tp_norm = float(accelerator.strategy.grad_norm(list(model.parameters())))
    tp_inf = float(accelerator.strategy.grad_norm(list(model.parameters()), float("inf")))
    if rank == 0:
        (out / "norms.json").write_text(json.dumps({"tp": tp_norm, "tp_inf": tp_inf, "zero": float(norm)}))
        (out / "timings.json").write_text(json.dumps(timings))
    print(f"OK rank {os.environ['RANK']}", flush=True)
    accelerator.end_training()
