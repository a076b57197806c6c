"""``prepare_pippy``: pipeline-parallel inference on two CPU processes over gloo.

The pipelined model must give the unsplit model's output: the distributed checks live in
``tests/workers/pipeline_worker.py`` (one torchrun launch each, as in ``test_state_distributed``)
and compare with ``torch.equal``. What needs no second process (the refusal without a process
group, the automatic choice of split points) runs here, and the example runs under
``trainer launch`` as a user would start it.
"""

from __future__ import annotations

import re

import pytest
import torch
from distributed_helpers import REPO_ROOT, WORKERS_DIR, run_cli, run_distributed
from torch import nn
from transformers import GPT2Config, GPT2ForSequenceClassification

from trainer.inference.pipeline import auto_split_points, prepare_pippy

WORKER = WORKERS_DIR / "pipeline_worker.py"


def _assert_both_ranks_ok(stdout: str) -> None:
    for rank in (0, 1):
        lines = re.findall(rf"^OK rank {rank}$", stdout, flags=re.MULTILINE)
        assert lines == [f"OK rank {rank}"], f"rank {rank} did not report success:\n{stdout}"


def small_gpt2(n_layer: int = 4) -> GPT2ForSequenceClassification:
    config = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, n_positions=64, vocab_size=100, pad_token_id=0,
                        bos_token_id=1, eos_token_id=1)
    return GPT2ForSequenceClassification(config)


def test_pipelined_gpt2_equals_the_unsplit_model_on_two_processes():
    """Auto and explicit split points, kwargs, 2 and 4 micro-batches, gather_output, a plain nn.Module."""
    result = run_distributed(WORKER, nproc=2, args=["gpt2"], timeout=90)
    _assert_both_ranks_ok(result.stdout)
    for rank in (0, 1):
        assert f"rank {rank}: auto split at ['transformer.h.2'], logits (2, 2) equal" in result.stdout
        assert f"rank {rank}: explicit split, kwargs and gather_output equal" in result.stdout


def test_bad_split_points_batch_sizes_and_calls_are_refused_on_two_processes():
    result = run_distributed(WORKER, nproc=2, args=["errors"], timeout=90)
    _assert_both_ranks_ok(result.stdout)
    assert result.stdout.count("Did you mean 'transformer.h.2'?") == 2, result.stdout


def test_a_single_process_is_one_clear_error():
    model = small_gpt2()
    with pytest.raises(RuntimeError) as error:
        prepare_pippy(model, example_args=(torch.zeros(2, 8, dtype=torch.long),))
    assert str(error.value) == (
        "prepare_pippy splits the model into one stage per process, but this is a single process without a "
        "torch.distributed process group; run the script with `trainer launch --num_processes 2 script.py` "
        "(one process per stage).")


def test_auto_split_points_cut_the_repeated_blocks_evenly():
    model = small_gpt2(n_layer=5)
    assert set(model._no_split_modules) == {"GPT2Block"}
    assert auto_split_points(model, 2) == ["transformer.h.3"]  # 3 + 2 blocks
    assert auto_split_points(model, 3) == ["transformer.h.2", "transformer.h.4"]  # 2 + 2 + 1
    assert auto_split_points(model, 5) == [f"transformer.h.{i}" for i in range(1, 5)]
    assert auto_split_points(model, 2, no_split_module_classes=["GPT2MLP"]) == ["transformer.h.3.mlp"]
    with pytest.raises(ValueError, match=r"found 5 blocks \(modules of the classes \['GPT2Block'\]\), too few for 6"):
        auto_split_points(model, 6)


def test_auto_split_points_without_no_split_modules_use_the_largest_module_list():
    def linears(count: int) -> nn.ModuleList:
        return nn.ModuleList(nn.Linear(2, 2) for _ in range(count))

    model = nn.Sequential(nn.Linear(2, 2), linears(2), linears(4))
    assert auto_split_points(model, 2) == ["2.2"]
    with pytest.raises(ValueError, match="found no repeated blocks"):
        auto_split_points(nn.Linear(2, 2), 2)


def test_the_example_under_trainer_launch():
    source = (REPO_ROOT / "examples" / "pipeline_inference.py").read_text()
    assert "from trainer import PartialState, prepare_pippy" in source
    assert 'model = prepare_pippy(model, split_points="auto", example_args=(input,))' in source
    code, out, err = run_cli("launch", "--num_processes", "2", "--cpu", "examples/pipeline_inference.py")
    assert code == 0, err
    # Printed by the last process only: the sequence-classification logits, batch 2 by 2 labels.
    assert re.findall(r"^output shape: .*$", out, flags=re.MULTILINE) == ["output shape: (2, 2)"], out
