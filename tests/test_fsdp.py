"""FSDP on two CPU processes (gloo) against one process: weights, memory, clipping, checkpoints, merge-weights.

One torchrun launch runs every two-process check (tests/workers/fsdp_worker.py) and leaves its
results in a folder; the tests below compare them with one-process runs of the same code here.
"""

from __future__ import annotations

import json

import pytest
import torch
from distributed_helpers import WORKERS_DIR, run_distributed
from safetensors.torch import load_file
from workers.fsdp_worker import (
    CLIP,
    STEPS,
    explicit_steps,
    full_weights,
    gpt2_config,
    gpt2_input,
    make_model,
    resumable,
    run,
)

from strategies import FSDP
from trainer import PartialState
from trainer.cli.main import main as trainer_cli

MATRIX = {1: ["ddp", "full_shard", "shard_grad_op", "no_shard", "hybrid_shard", "hybrid_local", "offload",
              "forward_prefetch", "size_wrap", "callable_wrap", "no_wrap"],
          2: ["ddp", "full_shard", "shard_grad_op", "hybrid_shard"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder of the two-process results (one launch for the whole module)."""
    out = tmp_path_factory.mktemp("fsdp")
    result = run_distributed(WORKERS_DIR / "fsdp_worker.py", nproc=2, args=[str(out)], timeout=240)
    assert "OK rank 0" in result.stdout and "OK rank 1" in result.stdout
    return out


@pytest.fixture(autouse=True)
def on_cpu(monkeypatch):
    monkeypatch.setenv("TRAINER_USE_CPU", "1")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def one_process(accumulation: int = 1, clip: float | None = None) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The same run on one process with the global batch (twice the per-process one)."""
    PartialState._reset_state()
    accelerator, model, facts = run("auto", accumulation=accumulation, batch=16, clip=clip)
    return full_weights(accelerator, model), facts["norms"]


def test_fsdp_and_ddp_equal_one_process_on_the_same_global_batch(runs):
    initial = make_model().state_dict()
    for k, names in MATRIX.items():
        single, _ = one_process(k)
        assert max_diff(single, initial) > 1e-2  # the runs did train
        diffs = {name: max_diff(load_file(str(runs / f"{name}_k{k}.safetensors")), single) for name in names}
        print(f"accumulation {k}: max abs diff to one process {diffs}")
        assert max(diffs.values()) <= 1e-5, (k, diffs)


def test_full_shard_keeps_about_half_of_the_training_state_per_process(runs):
    for rank in (0, 1):
        counts = json.loads((runs / f"bytes_rank{rank}.json").read_text())
        assert counts["dtensors"] == counts["parameters"]  # every parameter is sharded
        ratio = counts["local"] / counts["total"]
        print(f"rank {rank}: {counts['local']} of {counts['total']} bytes of parameters + AdamW state = {ratio:.3f}")
        assert ratio <= 0.55


def test_clipping_uses_the_norm_over_every_shard(runs):
    single, single_norms = one_process(clip=CLIP)
    norms = json.loads((runs / "clip_norms.json").read_text())
    assert len(norms) == STEPS and min(norms) > CLIP  # every step was clipped
    relative = max(abs(a - b) / b for a, b in zip(norms, single_norms, strict=True))
    diff = max_diff(load_file(str(runs / "clip.safetensors")), single)
    print(f"clipping: norm relative diff {relative:.2e}, weights max abs diff {diff:.2e}")
    assert relative <= 1e-5 and diff <= 1e-5


def test_activation_checkpointing_recomputes_and_changes_nothing(runs):
    calls = json.loads((runs / "ac_calls.json").read_text())
    assert calls == {"False": 3 * STEPS, "True": 2 * 3 * STEPS}  # each block's forward runs again in backward
    without, with_ac = (load_file(str(runs / f"ac_{flag}.safetensors")) for flag in (False, True))
    assert max_diff(without, with_ac) == 0.0  # dropout masks replayed exactly


def test_cpu_ram_efficient_loading_gives_the_weights_of_normal_loading(runs):
    facts = [json.loads((runs / f"ram_efficient_rank{r}.json").read_text()) for r in (0, 1)]
    assert [f["built_on_meta"] for f in facts] == [False, True]
    assert all(f["scale"] == [0.5] * 6 for f in facts)  # a non-persistent buffer reached the meta-built process
    diff = max_diff(load_file(str(runs / "ram_efficient.safetensors")), load_file(str(runs / "full_shard_k1.safetensors")))
    assert diff == 0.0


def test_mixed_precision_policy_follows_the_accelerator(runs):
    seen = json.loads((runs / "precision.json").read_text())
    assert seen["no"]["compute"] == "torch.float32"
    assert (seen["bf16"]["compute"], seen["bf16"]["shard"], seen["bf16"]["grad"]) == \
        ("torch.bfloat16", "torch.float32", "torch.float32")


def test_sharded_checkpoint_resumes_on_two_and_on_one_process(runs):
    checkpoint = runs / "ckpt"
    files = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file())
    assert all(name.endswith((".json", ".safetensors")) for name in files), files  # nothing to unpickle
    assert "model.safetensors" not in files and not any(name.startswith("optimizer") for name in files)
    assert len([n for n in files if n.startswith("sharded_state/shard-")]) == 2
    straight = load_file(str(runs / "straight.safetensors"))
    assert max_diff(load_file(str(runs / "resumed2.safetensors")), straight) == 0.0
    # The same moment saved asynchronously (DCP's async_save) while training went on: the same files, the same
    # bytes but in the shards, whose headers DCP writes in another key order (same entries, same tensor bytes).
    written = {folder: {p.relative_to(runs / folder).as_posix(): p.read_bytes() for p in (runs / folder).rglob("*")
                        if p.is_file()} for folder in ("ckpt", "ckpt_async")}
    assert written["ckpt_async"].keys() == written["ckpt"].keys()
    for name, data in written["ckpt"].items():
        if name.startswith("sharded_state/shard-"):
            ours, theirs = load_file(str(runs / "ckpt_async" / name)), load_file(str(runs / "ckpt" / name))
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name
        elif name != "manifest.json":  # its checksums are those of the shards
            assert written["ckpt_async"][name] == data, name

    accelerator, model, optimizer = resumable(FSDP(state_dict_type="SHARDED_STATE_DICT"))  # one process, no group
    accelerator.load_state(checkpoint)
    explicit_steps(accelerator, model, optimizer, STEPS // 2, STEPS)
    diff = max_diff(full_weights(accelerator, model), straight)
    print(f"saved on 2 processes, resumed on 1: max abs diff {diff:.2e}")
    assert diff <= 1e-6
    PartialState._reset_state()
    from_async, async_model, async_optimizer = resumable(FSDP(state_dict_type="SHARDED_STATE_DICT"))
    from_async.load_state(runs / "ckpt_async")
    explicit_steps(from_async, async_model, async_optimizer, STEPS // 2, STEPS)
    assert max_diff(full_weights(from_async, async_model), full_weights(accelerator, model)) == 0.0
    # One process writes the same format (one shard file), and reads it back.
    accelerator.save_state(runs / "ckpt_one")
    assert sorted(p.name for p in (runs / "ckpt_one" / "sharded_state").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "sharded_state.json"]
    PartialState._reset_state()
    again, model_again, _ = resumable(FSDP(state_dict_type="SHARDED_STATE_DICT"))
    again.load_state(runs / "ckpt_one")
    assert max_diff(full_weights(again, model_again), full_weights(accelerator, model)) == 0.0


def test_merge_weights_output_loads_everywhere_with_identical_outputs(runs, tmp_path, capsys):
    from transformers import GPT2LMHeadModel

    from trainer.inference import init_empty_weights, load_checkpoint_and_dispatch
    from trainer.inference.checkpoint_files import CheckpointFiles

    units = json.loads((runs / "gpt2_units.json").read_text())
    assert units == ["FSDPGPT2Block"]  # TRANSFORMER_BASED_WRAP found the layers through _no_split_modules
    reference = load_file(str(runs / "gpt2_reference.safetensors"))
    logits = reference.pop("__logits__")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert trainer_cli(["merge-weights", str(runs / "gpt2_ckpt"), str(single)]) == 0
    assert trainer_cli(["merge-weights", str(runs / "gpt2_ckpt"), str(sharded), "--max-shard-size", "40KB"]) == 0
    assert sorted(p.name for p in single.iterdir()) == ["model.safetensors"]
    shards = sorted(p.name for p in sharded.iterdir() if p.suffix == ".safetensors")
    assert len(shards) > 1 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert (sharded / "model.safetensors.index.json").is_file()
    assert all((sharded / name).stat().st_size <= 40_000 + 1_000 for name in shards)  # + the header
    merged = load_file(str(single / "model.safetensors"))
    assert set(reference) - set(merged) == {"lm_head.weight"}  # tied to transformer.wte.weight: stored once
    assert all(torch.equal(merged[name], reference[name]) for name in merged)
    for folder in (single, sharded):
        files = CheckpointFiles(folder)
        assert sorted(files.names()) == sorted(merged)
        with init_empty_weights():
            empty = GPT2LMHeadModel(gpt2_config())
        dispatched = load_checkpoint_and_dispatch(empty, folder, device_map={"": "cpu"}).eval()
        gpt2_config().save_pretrained(folder)
        pretrained = GPT2LMHeadModel.from_pretrained(folder).eval()
        with torch.no_grad():
            for model in (dispatched, pretrained):
                diff = (model(input_ids=gpt2_input()).logits - logits).abs().max().item()
                assert diff <= 1e-6, (folder.name, type(model).__name__, diff)
    # A smaller dtype, and the errors a user can meet.
    assert trainer_cli(["merge-weights", str(runs / "gpt2_ckpt"), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.bfloat16}
    capsys.readouterr()
    assert trainer_cli(["merge-weights", str(runs / "gpt2_ckpt"), str(single)]) == 2
    assert "already holds weights (model.safetensors)" in capsys.readouterr().err
    assert trainer_cli(["merge-weights", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "is not a sharded checkpoint" in capsys.readouterr().err


def test_settings_that_cannot_work_are_clear_errors():
    strategy = FSDP(sharding_strategy="HYBRID_SHARD", hybrid_shard_size=2)
    with pytest.raises(ValueError, match=r"3 processes cannot form a \(replicate x shard\) mesh with shard groups of 2"):
        strategy.setup_environment(torch.device("cpu"), 0, 3)
    with pytest.raises(ValueError, match="use one of"):
        FSDP(sharding_strategy="ZERO3")
    with pytest.raises(ValueError, match="Did you mean 'Block'"):
        FSDP(transformer_layer_cls_to_wrap="Blok")._units(make_model())
    strategy = FSDP(activation_checkpointing=True, auto_wrap_policy="NO_WRAP")
    strategy.setup_environment(torch.device("cpu"), 0, 1)
    with pytest.raises(ValueError, match="makes none in Net"):
        strategy.setup_module(make_model())
    with pytest.warns(UserWarning, match="fully_shard always gathers"):
        FSDP(backward_prefetch="NO_PREFETCH")


def test_every_key_of_the_talks_fsdp_config_maps_onto_the_strategy():
    strategy = FSDP.from_config({
        "fsdp_auto_wrap_policy": "SIZE_BASED_WRAP", "fsdp_min_num_params": 1000, "fsdp_backward_prefetch": "BACKWARD_PRE",
        "fsdp_cpu_ram_efficient_loading": True, "fsdp_forward_prefetch": True, "fsdp_offload_params": True,
        "fsdp_sharding_strategy": "HYBRID_SHARD_ZERO2", "fsdp_state_dict_type": "SHARDED_STATE_DICT",
        "fsdp_sync_module_states": False, "fsdp_use_orig_params": False, "fsdp_version": 2,
        "fsdp_transformer_layer_cls_to_wrap": "Block", "fsdp_activation_checkpointing": True,
        "fsdp_reshard_after_forward": "true"})
    assert (strategy.auto_wrap_policy, strategy.min_num_params, strategy.layer_classes) == ("SIZE_BASED_WRAP", 1000, ["Block"])
    assert (strategy.sharding_strategy, strategy.mesh_layout, strategy.reshard_after_forward) == \
        ("HYBRID_SHARD_ZERO2", "hybrid", True)
    assert strategy.cpu_ram_efficient_loading and strategy.forward_prefetch and strategy.offload_params
    assert strategy.state_dict_type == "SHARDED_STATE_DICT" and strategy.activation_checkpointing
    assert not strategy.sync_module_states
    with pytest.raises(ValueError, match="Did you mean 'fsdp_offload_params'"):
        FSDP.from_config({"fsdp_ofload_params": True})


def test_a_checkpoint_taken_before_the_first_step_counts_no_step(tmp_path):
    reference, model, optimizer = resumable(FSDP(state_dict_type="SHARDED_STATE_DICT"))  # one process
    reference.save_state(tmp_path / "ckpt")
    assert not optimizer.optimizer.state  # saving did not initialise the optimizer
    explicit_steps(reference, model, optimizer, 0, 2)
    PartialState._reset_state()
    accelerator, resumed, resumed_optimizer = resumable(FSDP(state_dict_type="SHARDED_STATE_DICT"))
    accelerator.load_state(tmp_path / "ckpt")
    assert not resumed_optimizer.optimizer.state
    explicit_steps(accelerator, resumed, resumed_optimizer, 0, 2)
    assert max_diff(full_weights(accelerator, resumed), full_weights(reference, model)) == 0.0
