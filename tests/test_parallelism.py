"""N-D parallelism on 4 CPU processes (gloo): data-parallel replicate x shard, tensor and pipeline parallelism
equal one process.

A small Llama (built from a transformers config) takes 20 AdamW steps with gradient clipping on
fixed global batches, with accumulation 1 and 2, under each layout (pipeline stages with the GPipe
and the 1F1B schedule); its weights then equal those of the same steps on one process within 1e-5,
and each process holds about 1 / (dp_shard x tp x pp) of the parameter and optimizer bytes. One
launch runs every layout.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from distributed_helpers import WORKERS_DIR, run_distributed
from parallel_setup import BATCH, STEPS, llama, llama_trainer, local_bytes, train
from safetensors.torch import load_file

from trainer import Accelerator, ParallelismConfig, PartialState

LAYOUTS = {"dp_shard=2,tp=2": 4, "dp_replicate=2,dp_shard=2": 2, "tp=4": 4,  # layout -> dp_shard x tp x pp
           "pp=2,dp_shard=2,pp_schedule=GPipe": 4, "pp=2,dp_shard=2,pp_schedule=1F1B": 4}
ACCUMULATION = (1, 2)


def tag(layout: str, accumulation: int) -> str:
    return f"{layout.replace('=', '').replace(',', '_')}_k{accumulation}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    plan = ";".join(f"{layout}:{k}" for layout in LAYOUTS for k in ACCUMULATION)
    result = run_distributed(WORKERS_DIR / "parallel_worker.py", nproc=4, args=[str(out), plan], timeout=600)
    assert all(f"OK rank {rank}" in result.stdout for rank in range(4)), result.stdout
    return out


@pytest.fixture(scope="module")
def one_process():
    """The weights after the same steps on one process, and the whole model's bytes, per accumulation."""
    found = {}
    for k in ACCUMULATION:
        PartialState._reset_state()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=k)
        model = llama()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        train(accelerator, model, optimizer, k)
        found[k] = ({name: value.detach().clone() for name, value in model.state_dict().items()},
                    local_bytes(model, optimizer))
    PartialState._reset_state()
    return found


@pytest.mark.parametrize("accumulation", ACCUMULATION)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_layout_trains_the_weights_one_process_trains(runs, one_process, layout, accumulation):
    expected, _ = one_process[accumulation]
    weights = load_file(str(runs / tag(layout, accumulation) / "model.safetensors"))
    assert weights.keys() == expected.keys()
    diff = max((weights[name] - expected[name]).abs().max().item() for name in expected)
    print(f"{layout}, accumulation {accumulation}: max abs diff from one process {diff:.2e}")
    assert diff <= 1e-5
    assert max((expected[name] - llama().state_dict()[name]).abs().max().item() for name in expected) > 1e-2  # it trained


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_process_holds_its_share_of_the_parameters_and_optimizer_state(runs, one_process, layout):
    _, whole = one_process[1]
    share = LAYOUTS[layout]
    for rank in range(4):
        held = json.loads((runs / f"{tag(layout, 1)}_bytes_{rank}.json").read_text())
        for kind in ("params", "optimizer"):
            ratio = held[kind] * share / whole[kind]
            assert 0.95 <= ratio <= 1.05, (layout, rank, kind, ratio)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_process_reads_its_place_on_the_mesh_as_accelerate_names_it(runs, layout):
    """accelerator.*_parallel_rank, torch_device_mesh, parallelism_config: the mesh's dimensions, outermost first."""
    sizes = {name: int(value) for name, value in (part.split("=") for part in layout.split(",")) if value.isdigit()}
    dims = [name for name in ("pp", "dp_replicate", "dp_shard", "tp") if name in sizes]
    for rank in range(4):
        facts = json.loads((runs / f"{tag(layout, 1)}_layout_{rank}.json").read_text())
        expected, inner = {}, 1
        for name in reversed(dims):  # row-major: the last dimension varies fastest
            expected[name] = rank // inner % sizes[name]
            inner *= sizes[name]
        assert facts["mesh"] == dims, (layout, facts)
        assert {name: facts[name] for name in ("pp", "dp_replicate", "dp_shard", "tp")} == {
            name: expected.get(name, 0) for name in ("pp", "dp_replicate", "dp_shard", "tp")}, (layout, rank, facts)
        assert facts["cp"] == 0 and facts["config"] and facts["fsdp2"] and facts["composable"] and facts["save"]
        assert not facts["multi_device"]  # processes on the CPU


def test_the_trainer_lays_out_the_model_and_shards_data_over_data_parallel_processes_only(runs, tmp_path):
    PartialState._reset_state()
    from parallel_setup import token_dataset

    single = llama_trainer(tmp_path, BATCH, eval_data=token_dataset())  # one process, the whole global batch a step
    metrics = single.fit()
    expected = single.model.state_dict()
    assert single.global_step == STEPS
    staged = json.loads((runs / "trainer_pp_metrics.json").read_text())  # evaluated through pipeline stages
    assert abs(staged["val_loss"] - metrics["val_loss"]) <= 1e-5, (staged, metrics)
    # dp_shard=2 x tp=2; pp=2 x dp_shard=2 with accelerator.forward_backward; the same, resumed from step 10
    for run in ("trainer", "trainer_pp", "trainer_pp_resumed"):
        weights = load_file(str(runs / run / "model.safetensors"))
        assert weights.keys() == expected.keys()
        assert max((weights[name] - expected[name]).abs().max().item() for name in expected) <= 1e-5, run
    PartialState._reset_state()


def test_stages_traced_with_dropout_refuse_to_evaluate(runs):
    assert (runs / "pp_dropout_error.txt").read_text().startswith(
        "This pipeline stage was traced in training mode with dropout (p > 0), which its graph keeps")


def test_pipeline_stages_train_in_bf16_and_refuse_fp16(runs):
    """bf16 runs the stages in autocast: five steps land where one process's bf16 steps do, to bf16's precision
    (AdamW at 1e-2 moves each weight about 1e-2 a step); fp16's loss scaling is refused at prepare."""
    assert (runs / "pp_fp16_error.txt").read_text().startswith(
        "mixed_precision='fp16' with pipeline stages (pp_size > 1): fp16 loss scaling would have to agree")
    staged = load_file(str(runs / "pp_bf16" / "model.safetensors"))
    PartialState._reset_state()
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    train(accelerator, model, optimizer, 1, steps=range(5))
    PartialState._reset_state()
    one = model.state_dict()
    assert staged.keys() == one.keys() and all(torch.isfinite(value).all() for value in staged.values())
    assert max((staged[name] - one[name]).abs().max().item() for name in one) <= 3e-2
    assert max((staged[name] - llama().state_dict()[name]).abs().max().item() for name in one) > 4e-2  # it trained


def test_the_layout_answers_to_accelerates_names():
    config = ParallelismConfig(dp_replicate_size=2, dp_shard_size=2, tp_size=2, tp_plan={"layers.*.mlp": "colwise"})
    assert (config.dp_replicate_enabled, config.dp_shard_enabled, config.tp_enabled, config.cp_enabled,
            config.pp_enabled, config.sp_enabled) == (True, True, True, False, False, False)
    assert (config.data_parallel_size, config.non_data_parallel_size, config.total_size) == (4, 2, 8)
    assert config.dp_dim_names == ["dp_replicate", "dp_shard"] and config.non_dp_dim_names == ["tp"]
    assert config.dp_shard_cp_dim_names == ["dp_shard"] and config.dp_cp_dim_names == ["dp_replicate", "dp_shard"]
    assert config.active_mesh_dims == ["dp_replicate", "dp_shard", "tp"]
    assert json.loads(json.dumps(config.to_json())) == {
        "dp_replicate_size": 2, "dp_shard_size": 2, "tp_size": 2, "cp_size": 1, "pp_size": 1, "pp_schedule": "1F1B",
        "pp_microbatches": None, "pp_split_points": "auto", "tp_plan": {"layers.*.mlp": "colwise"}}
    assert ParallelismConfig(pp_size=2).pp_enabled and ParallelismConfig().active_mesh_dims == []


def test_a_layout_must_span_the_process_count():
    config = ParallelismConfig(dp_shard_size=2, tp_size=2)
    with pytest.raises(ValueError, match=r"ParallelismConfig: dp_shard=2 x tp=2 spans 4 process\(es\), but this run has 1\. "
                                         r"Launch 4 processes, or choose sizes whose product is 1\."):
        Accelerator(cpu=True, parallelism_config=config)
    PartialState._reset_state()


@pytest.mark.parametrize(("arguments", "message"), [
    ({"tp_size": 0}, r"ParallelismConfig\(tp_size=0\): use a whole number >= 1\."),
    ({"dp_shard_size": 1.5}, r"ParallelismConfig\(dp_shard_size=1\.5\): use a whole number >= 1\."),
    ({"cp_size": 2}, r"ParallelismConfig\(cp_size=2\): context parallelism is not available here"),
    ({"pp_size": 2, "pp_schedule": "1f1"}, r"ParallelismConfig\(pp_schedule='1f1'\) is not a pipeline schedule\. "
                                           r"Did you mean '1F1B'\? Choose one of GPipe, 1F1B\."),
    ({"pp_size": 2, "pp_microbatches": 0}, r"ParallelismConfig\(pp_microbatches=0\): use a whole number >= 1\."),
    ({"pp_size": 2, "tp_size": 2}, r"ParallelismConfig\(pp_size=2, tp_size=2\): pipeline stages are traced graphs"),
])
def test_sizes_that_cannot_work_are_one_clear_error(arguments, message):
    with pytest.raises(ValueError, match=message):
        ParallelismConfig(**arguments)


def test_parallelism_runs_on_fsdp_and_refuses_another_strategy():
    with pytest.raises(ValueError, match=r"parallelism_config= lays out FSDP's data-parallel and tensor-parallel "
                                         r"dimensions, and the strategy is 'ddp'"):
        Accelerator(cpu=True, strategy="ddp", parallelism_config=ParallelismConfig())
    with pytest.raises(TypeError, match=r"parallelism_config= takes a ParallelismConfig"):
        Accelerator(cpu=True, parallelism_config={"tp_size": 2})
    PartialState._reset_state()


def test_a_layout_given_twice_is_one_clear_error():
    from trainer.utils import FullyShardedDataParallelPlugin

    with pytest.raises(ValueError, match=r"FSDP\(sharding_strategy='HYBRID_SHARD'\) lays out replicas itself, and a "
                                         r"ParallelismConfig was given too"):
        Accelerator(cpu=True, parallelism_config=ParallelismConfig(),
                    fsdp_plugin=FullyShardedDataParallelPlugin(sharding_strategy="HYBRID_SHARD"))
    PartialState._reset_state()


def test_a_model_without_a_plan_names_the_missing_tensor_parallel_plan():
    from trainer.strategies.tensor_parallel import resolve_plan

    with pytest.raises(ValueError, match=r"tp_size=2 needs a tensor-parallel plan, and Sequential names none"):
        resolve_plan(torch.nn.Sequential(torch.nn.Linear(4, 4)), None, 2)
    with pytest.raises(ValueError, match=r"lm_head \(colwise_gather_output\) has 64 output features, which do "
                                         r"not split evenly over tp_size=3"):
        resolve_plan(llama(), None, 3)
    with pytest.raises(ValueError, match=r"'nothing\.\*' names no submodule of LlamaForCausalLM"):
        resolve_plan(llama(), {"nothing.*": "colwise"}, 2)
    with pytest.raises(ValueError, match=r"'lm_head' -> 'diagonal' is not a style this strategy applies"):
        resolve_plan(llama(), {"lm_head": "diagonal"}, 2)


def test_a_launch_configuration_section_and_flags_lay_out_the_processes(tmp_path):
    from distributed_helpers import run_cli

    script = tmp_path / "script.py"
    script.write_text(
        "import torch\nfrom trainer import Accelerator\naccelerator = Accelerator()\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))\n"
        "model._tp_plan = {'0': 'colwise', '2': 'rowwise'}  # the model's own plan, as transformers models carry\n"
        "model = accelerator.prepare(model)\nlayout = accelerator.strategy.parallelism\n"
        "shard = accelerator.strategy.distributed_sampler_kwargs\n"
        "print(f'rank {accelerator.process_index} {accelerator.strategy.name} {layout.mesh_dims} '\n"
        "      f'data {shard[\"rank\"]} of {shard[\"num_replicas\"]}', flush=True)\n")
    config = tmp_path / "nd.yaml"
    config.write_text("distributed_type: MULTI_CPU\nnum_processes: 4\nuse_cpu: true\n"
                      "parallelism_config:\n  parallelism_config_dp_shard_size: 4\n")
    code, out, err = run_cli("launch", "--config_file", str(config), "--parallelism_config_dp_shard_size", "2",
                             "--parallelism_config_tp_size", "2", "--quiet", str(script))
    assert code == 0, err
    # The four processes share the launcher's output: one line may hold the ends of two prints.
    assert sorted(re.findall(r"rank \d fsdp \('dp_shard', 'tp'\) data \d of \d", out)) == [
        f"rank {rank} fsdp ('dp_shard', 'tp') data {rank // 2} of 2" for rank in range(4)]
    config.write_text("distributed_type: MULTI_CPU\nnum_processes: 4\nuse_cpu: true\n"
                      "parallelism_config:\n  parallelism_config_dp_shard_size: 3\n")
    code, _, err = run_cli("launch", "--config_file", str(config), str(script))
    assert code == 2 and err.strip() == ("trainer launch: parallelism_config: the sizes span 3 processes but "
                                         "num_processes is 4: make their product equal num_processes."), err


@pytest.mark.parametrize("kind", ["FULL_STATE_DICT", "SHARDED_STATE_DICT"])
def test_a_checkpoint_of_one_layout_resumes_on_another_and_on_one_process(runs, kind, tmp_path):
    from distributed_helpers import run_cli

    from trainer.utils import FullyShardedDataParallelPlugin

    straight = load_file(str(runs / f"straight_{kind}" / "model.safetensors"))  # dp_shard=2 x tp=2, steps 0-20
    resumed4 = load_file(str(runs / f"resumed4_{kind}" / "model.safetensors"))  # saved at step 10, resumed on dp_shard=4
    assert max((resumed4[name] - straight[name]).abs().max().item() for name in straight) <= 1e-5
    PartialState._reset_state()
    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(state_dict_type=kind))
    model = llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.load_state(runs / f"ckpt_{kind}")
    at_save = {name: value.clone() for name, value in model.state_dict().items()}
    train(accelerator, model, optimizer, 1, steps=range(10, STEPS))
    one = model.state_dict()
    assert max((one[name] - straight[name]).abs().max().item() for name in straight) <= 1e-5
    PartialState._reset_state()
    if kind == "SHARDED_STATE_DICT":  # the shards of four processes merge into the whole weights of step 10
        code, _, err = run_cli("merge-weights", str(runs / f"ckpt_{kind}"), str(tmp_path / "merged"))
        assert code == 0, err
        merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
        assert merged.keys() == at_save.keys() and all(torch.equal(merged[name], at_save[name]) for name in at_save)


def test_forward_backward_on_one_process_is_the_loss_and_backward_it_stands_for():
    """The step a pipelined layout needs gives, on a whole model, the weights of model(...) + backward."""
    from parallel_setup import causal_lm_loss

    found = []
    for fused in (False, True):
        PartialState._reset_state()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
        model = llama()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, optimizer = accelerator.prepare(model, optimizer)
        train(accelerator, model, optimizer, 2, steps=range(5), forward_backward=fused)
        found.append(model.state_dict())
    PartialState._reset_state()
    assert max((found[0][name] - found[1][name]).abs().max().item() for name in found[0]) <= 1e-6
    tokens = torch.randint(0, 64, (2, 16))
    PartialState._reset_state()
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(llama())
    loss = accelerator.forward_backward(model, causal_lm_loss, tokens, target=tokens)
    assert not loss.requires_grad and torch.allclose(loss, model(input_ids=tokens, labels=tokens).loss)
    accelerator.backward(loss)  # the loss forward_backward returned has had its backward: nothing happens
    PartialState._reset_state()


def test_pipeline_stage_checkpoints_resume_on_other_layouts_and_merge(runs, tmp_path):
    """pp=2 x dp_shard=2 saved at step 10 resumes on dp_shard=4 and on one process; stages resume a
    dp_shard=2 x tp=2 checkpoint; merge-weights gives the whole weights of step 10."""
    from distributed_helpers import run_cli

    from trainer.utils import FullyShardedDataParallelPlugin

    straight = load_file(str(runs / "straight_pp" / "model.safetensors"))
    resumed4 = load_file(str(runs / "resumed4_pp" / "model.safetensors"))
    assert straight.keys() == resumed4.keys() == llama().state_dict().keys()
    assert max((resumed4[name] - straight[name]).abs().max().item() for name in straight) <= 1e-5
    from_tp = load_file(str(runs / "pp_resumed_from_tp" / "model.safetensors"))
    tp_straight = load_file(str(runs / "straight_SHARDED_STATE_DICT" / "model.safetensors"))
    assert max((from_tp[name] - tp_straight[name]).abs().max().item() for name in tp_straight) <= 1e-5
    PartialState._reset_state()
    accelerator = Accelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin())  # any state_dict_type reads it
    model = llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.load_state(runs / "ckpt_pp")
    at_save = {name: value.clone() for name, value in model.state_dict().items()}
    train(accelerator, model, optimizer, 1, steps=range(10, STEPS))
    one = model.state_dict()
    assert max((one[name] - straight[name]).abs().max().item() for name in straight) <= 1e-5
    PartialState._reset_state()
    code, _, err = run_cli("merge-weights", str(runs / "ckpt_pp"), str(tmp_path / "merged"))
    assert code == 0, err
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert merged.keys() == at_save.keys() and all(torch.equal(merged[name], at_save[name]) for name in at_save)
