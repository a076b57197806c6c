"""Worker of tests/test_pipeline_inference.py: ``prepare_pippy`` on 2 CPU processes over gloo.

Run by torchrun (``--nproc_per_node 2``); ``sys.argv[1]`` picks the checks: ``gpt2`` (the pipelined
output equals the unsplit model's, for automatic and explicit split points) or ``errors`` (the
refusals). Both ranks build the same model from the same seed; the reference output comes from
the whole model before it is split. Every check raises on a wrong value; the last line printed
is ``OK rank <rank>``.
"""

from __future__ import annotations

import gc
import os
import sys
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import GPT2Config, GPT2ForSequenceClassification

from trainer import PartialState
from trainer.inference.pipeline import PipelinedModel, prepare_pippy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checks import RANK, expect, fail, leave, say  # noqa: E402

VOCAB = 1000


def gpt2() -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=64, n_head=4, n_positions=128, vocab_size=VOCAB, pad_token_id=0,
                        bos_token_id=1, eos_token_id=1)
    return GPT2ForSequenceClassification(config).eval()


def batch(size: int = 2, length: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(1, VOCAB, (size, length), generator=generator)


def expect_tensor(actual: Any, expected: torch.Tensor, what: str) -> None:
    """Bitwise equal: the stages run the model's own operations on slices of the batch."""
    if not (torch.is_tensor(actual) and actual.dtype == expected.dtype and torch.equal(actual, expected)):
        fail(what, expected, actual)


def stage_numel(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def check_auto_split() -> None:
    model = gpt2()
    config, total = model.config, stage_numel(model)
    inputs = batch()
    with torch.no_grad():
        reference = model(inputs).logits
    pipelined = prepare_pippy(model, split_points="auto", example_args=(inputs,))
    expect(isinstance(pipelined, PipelinedModel), True, "prepare_pippy returns a PipelinedModel")
    expect(pipelined.split_points, ["transformer.h.2"], "auto split of 4 GPT2Blocks over 2 stages")
    expect(pipelined.hf_split_points, ["transformer.h.2"], "hf_split_points")
    expect(pipelined.config is config, True, "config is the original model's")
    expect(pipelined.num_chunks, 2, "num_chunks defaults to the number of processes")
    # Each process holds only its stage; together the stages hold the whole model once.
    mine = stage_numel(pipelined)
    expect(0 < mine < total, True, f"stage {RANK} holds part of the model ({mine} of {total} parameters)")
    together = torch.tensor([mine])
    dist.all_reduce(together)
    expect(int(together), total, "the stages' parameters add up to the model's")
    # Once the caller drops the original model, the other stage's weights are freed.
    other_stage_weight = weakref.ref(model.score.weight if RANK == 0 else model.transformer.wte.weight)
    del model
    gc.collect()
    expect(other_stage_weight() is None, True, "the other stage's weight is freed")
    for call in range(2):  # a second call reuses the schedule
        with torch.no_grad():
            output = pipelined(inputs)
        if RANK == 1:
            # The model's only output tensor (no cache, no loss) comes back as the tensor itself.
            expect_tensor(output, reference, f"auto split: logits of call {call}")
        else:
            expect(output, None, "output on the first process")
    say(f"rank {RANK}: auto split at {pipelined.split_points}, logits {tuple(reference.shape)} equal")


def check_explicit_split_with_kwargs_and_gather() -> None:
    model = gpt2()
    inputs = batch(size=4, length=48)
    mask = torch.ones_like(inputs)
    mask[:, -5:] = 0  # right padding, as a tokenizer would give
    with torch.no_grad():
        reference = model(inputs, attention_mask=mask).logits
    pipelined = prepare_pippy(model, split_points=["transformer.h.1"], example_args=(inputs,),
                              example_kwargs={"attention_mask": mask}, num_chunks=4, gather_output=True)
    expect(pipelined.split_points, ["transformer.h.1"], "explicit split points")
    with torch.no_grad():
        output = pipelined(inputs, attention_mask=mask)
    expect_tensor(output, reference, "explicit split, 4 micro-batches, gathered: logits on every process")
    say(f"rank {RANK}: explicit split, kwargs and gather_output equal")


class Blocks(nn.Module):
    """No _no_split_modules: 'auto' falls back to the largest ModuleList (6 layers, 3 per stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.heads = nn.ModuleList([nn.Linear(16, 16), nn.Linear(16, 16)])
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(6)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.heads[0](x) + self.heads[1](x)


def check_plain_module() -> None:
    torch.manual_seed(0)
    model = Blocks()
    inputs = torch.randn(6, 8)
    with torch.no_grad():
        reference = model(inputs)
        by_microbatch = torch.cat([model(chunk) for chunk in inputs.chunk(3)])
    pipelined = prepare_pippy(model, example_args=(inputs,), num_chunks=3, gather_output=True)
    expect(pipelined.split_points, ["layers.3"], "auto split of a plain module's largest ModuleList")
    with torch.no_grad():
        output = pipelined(inputs)
    # A matrix product over 2 rows may sum in another order than over 6, so the whole-batch output can
    # differ in the last bit; run on the same micro-batches, the unsplit model gives exactly the output.
    expect_tensor(output, by_microbatch, "plain module output on every process, against the same micro-batches")
    if not torch.allclose(output, reference, rtol=1e-5, atol=1e-5):
        fail("plain module output against the whole batch (1e-5)", reference, output)
    expect_tensor(pipelined(inputs).detach(), by_microbatch, "plain module called with gradients enabled")
    say(f"rank {RANK}: plain module equal")


def expect_error(kind: type[Exception], run: Callable[[], Any], *parts: str) -> None:
    try:
        run()
    except kind as error:
        for part in parts:
            if part not in str(error):
                fail(f"{kind.__name__} message", part, str(error))
        say(f"rank {RANK}: refused: {error}")
        return
    fail(f"{kind.__name__} raised", kind.__name__, "nothing")


def check_errors() -> None:
    inputs = batch()
    expect_error(ValueError, lambda: prepare_pippy(gpt2(), split_points=["transformer.h.22"], example_args=(inputs,)),
                 "Split point 'transformer.h.22' is not a module of GPT2ForSequenceClassification.",
                 "Did you mean 'transformer.h.2'?")
    expect_error(ValueError, lambda: prepare_pippy(gpt2(), split_points=["transformer.h.1", "transformer.h.2"],
                                                   example_args=(inputs,)),
                 "2 split points make 3 stages, but there are 2 processes")
    expect_error(ValueError, lambda: prepare_pippy(gpt2(), example_args=(batch(size=3),)),
                 "The batch size of example_args (3) is not divisible by num_chunks (2)")
    expect_error(ValueError, lambda: prepare_pippy(gpt2(), example_args=(inputs,), num_chunks=4),
                 "The batch size of example_args (2) is not divisible by num_chunks (4)")
    pipelined = prepare_pippy(gpt2(), example_args=(inputs,))
    # Every process sees the wrong shape and refuses before any stage sends: nothing hangs.
    expect_error(ValueError, lambda: pipelined(batch(size=4)), "inputs of shapes [(2, 64) int64]",
                 "called with [(4, 64) int64]")
    expect_error(ValueError, lambda: pipelined(inputs, attention_mask=torch.ones_like(inputs)),
                 "traced the model with keyword arguments []")
    with torch.no_grad():  # still usable after a refused call
        output = pipelined(inputs)
    expect(output is None, RANK == 0, "output after the refusals")


def main() -> None:
    state = PartialState()
    expect(state.num_processes, 2, "num_processes")
    if sys.argv[1] == "gpt2":
        check_auto_split()
        check_explicit_split_with_kwargs_and_gather()
        check_plain_module()
    else:
        check_errors()
    state.wait_for_everyone()
    say(f"OK rank {RANK}")


if __name__ == "__main__":
    main()
    leave()
