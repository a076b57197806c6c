"""Accelerate's examples/by_feature scripts, written against trainer (tests/compat/), on one process and on two.

Each script makes its upstream's calls with ``trainer`` in place of ``accelerate`` on local data
(tests/compat/offline.py), checks its own results and prints ``<MARKER> OK rank <i>`` on every
process as its last line. Also here: LocalSGD's averaging step by step, and its refusals.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from distributed_helpers import run_cli

from trainer import Accelerator, DistributedType
from trainer.local_sgd import LocalSGD

COMPAT = Path(__file__).resolve().parent / "compat"
# Learnable MRPC-like data: enough pairs that the tiny BERT's loss falls within 3 epochs.
MRPC_TRAIN = "2048"


def launch(script: str, marker: str, processes: int, *script_args: str, launch_args: tuple[str, ...] = (),
           timeout: float = 240) -> str:
    """``trainer launch`` the script; it must exit 0 and print its marker once on every process."""
    code, out, err = run_cli("launch", "--num_processes", str(processes), "--cpu", *launch_args, str(COMPAT / script),
                             *script_args, timeout=timeout)
    assert code == 0, f"{script} on {processes} process(es) failed:\n{err[-6000:]}"
    markers = sorted(line for line in out.splitlines() if line.startswith(f"{marker} OK"))
    assert markers == [f"{marker} OK rank {rank}" for rank in range(processes)], out[-3000:]
    return out


# -- LocalSGD -------------------------------------------------------------------------------------------

def test_local_sgd_averages_every_k_steps_and_on_exit_on_two_processes():
    launch("local_sgd_sync_script.py", "LOCAL_SGD_SYNC", 2)


@pytest.mark.parametrize("kind", [DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM,
                                  DistributedType.XLA, "MY_STRATEGY"])
def test_local_sgd_refuses_strategies_that_shard_or_own_the_parameters(kind):
    accelerator = SimpleNamespace(distributed_type=kind)
    with pytest.raises(ValueError, match=rf"LocalSGD .* distributed_type={kind!s}.*Use plain data parallel") as error:
        LocalSGD(accelerator, torch.nn.Linear(2, 2), local_sgd_steps=2)
    assert isinstance(error.value, NotImplementedError)  # what Accelerate raises there
    with pytest.raises(ValueError):
        LocalSGD(accelerator, torch.nn.Linear(2, 2), local_sgd_steps=2, enabled=False)  # as Accelerate: refused anyway


def test_local_sgd_on_one_process_counts_steps_and_changes_nothing():
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(3, 2))
    before = [p.detach().clone() for p in model.parameters()]
    with LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=1) as local_sgd:
        assert not local_sgd.enabled
        for _ in range(3):
            local_sgd.step()
    assert local_sgd.num_steps == 3
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match=r"local_sgd_steps=0"):
        LocalSGD(accelerator=accelerator, model=model, local_sgd_steps=0)


@pytest.mark.parametrize("processes", [1, 2])
def test_local_sgd_script(processes, monkeypatch):
    monkeypatch.setenv("COMPAT_TRAIN_SIZE", MRPC_TRAIN)
    launch("local_sgd.py", "LOCAL_SGD", processes, "--cpu", "--local_sgd_steps", "4")


# -- the other by_feature scripts ------------------------------------------------------------------------

@pytest.mark.parametrize("processes", [1, 2])
def test_profiler_script(processes, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPAT_TRAIN_SIZE", "48")  # profiles of a few steps: parsing them takes seconds per step
    traces = tmp_path / "traces"
    launch("profiler.py", "PROFILER", processes, "--cpu", "--record_shapes", "--profile_memory", "--with_flops",
           "--output_trace_dir", str(traces))
    assert sorted(path.name for path in traces.iterdir()) == [f"profile_{rank}.json" for rank in range(processes)]


@pytest.mark.parametrize("processes", [1, 2])
def test_schedule_free_script(processes, monkeypatch):
    monkeypatch.setenv("COMPAT_TRAIN_SIZE", MRPC_TRAIN)
    launch("schedule_free.py", "SCHEDULE_FREE", processes, "--cpu")


@pytest.mark.parametrize("processes", [1, 2])
def test_tracking_script(processes, tmp_path, monkeypatch):
    """One process without trackers; two with ``log_with="all"`` (every installed tracker, offline)."""
    monkeypatch.setenv("COMPAT_TRAIN_SIZE", MRPC_TRAIN)
    args = ["--cpu"]
    if processes == 2:
        home = tmp_path / "home"
        monkeypatch.setenv("HOME", str(home))  # trackers' caches and settings stay in tmp_path
        monkeypatch.setenv("CLEARML_CACHE_DIR", str(tmp_path / "clearml-cache"))
        monkeypatch.setenv("CLEARML_CONFIG_FILE", str(home / "clearml.conf"))  # absent: ClearML runs offline
        monkeypatch.setenv("DVC_STUDIO_OFFLINE", "true")
        for name in ("CLEARML_API_HOST", "CLEARML_OFFLINE_MODE", "COMET_API_KEY", "COMET_MODE", "AIM_REPO"):
            monkeypatch.delenv(name, raising=False)
        args += ["--with_tracking", "--project_dir", str(tmp_path / "logs")]
    launch("tracking.py", "TRACKING", processes, *args)


@pytest.mark.parametrize(("processes", "hook"), [(1, ["--ddp_comm_hook", "fp16"]),
                                                 (2, ["--ddp_comm_hook", "power_sgd", "--ddp_comm_wrapper", "fp16"])])
def test_ddp_comm_hook_script(processes, hook, monkeypatch):
    monkeypatch.setenv("COMPAT_TRAIN_SIZE", MRPC_TRAIN)
    launch("ddp_comm_hook.py", "DDP_COMM_HOOK", processes, "--cpu", *hook)


@pytest.mark.parametrize("processes", [1, 2])
def test_gradient_accumulation_for_autoregressive_models_script(processes, monkeypatch):
    monkeypatch.setenv("COMPAT_TRAIN_SIZE", "500")  # the script selects the first 500 training lines
    launch("gradient_accumulation_for_autoregressive_models.py", "GA_AUTOREGRESSIVE", processes, "--cpu",
           "--gradient_accumulation_steps", "4", "--per_device_batch_size", "8")


# A DeepSpeed config whose optimizer and scheduler sections the script meets with DummyOptim and
# DummyScheduler; torch's AdamW (``torch_adam``) as DeepSpeed's CPU accelerator has no fused Adam.
DEEPSPEED_CONFIG = {
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
    "gradient_clipping": "auto",
}
# offline's causal LM, as a config folder for --config_name (AutoConfig reads it; the model is offline's)
LLAMA_CONFIG = {"model_type": "llama", "vocab_size": 125, "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 64,
                "max_position_embeddings": 128, "pad_token_id": 0}


@pytest.mark.parametrize(("processes", "zero_stage"), [(1, 2), (2, 3)])
def test_deepspeed_with_config_support_script(processes, zero_stage, tmp_path, monkeypatch):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("COMPAT_TRAIN_SIZE", "500")
    config_file = tmp_path / "ds_config.json"
    config_file.write_text(json.dumps({**DEEPSPEED_CONFIG, "zero_optimization": {"stage": zero_stage}}))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    out = tmp_path / "out"
    launch("deepspeed_with_config_support.py", "DEEPSPEED_CONFIG", processes,
           "--dataset_name", "Salesforce/wikitext", "--dataset_config_name", "wikitext-2-v1",
           "--model_name_or_path", "HuggingFaceTB/SmolLM-360M", "--config_name", str(tmp_path / "llama"),
           "--block_size", "16", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
           "--learning_rate", "3e-3", "--num_warmup_steps", "2", "--seed", "42",
           "--output_dir", str(out), "--load_best_model",
           launch_args=("--use_deepspeed", "--deepspeed_config_file", str(config_file)), timeout=300)
    assert (out / "all_results.json").is_file() and (out / "best_checkpoint").is_dir()


@pytest.mark.parametrize("processes", [1, 2])
def test_fsdp_with_peak_mem_tracking_script(processes, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPAT_TRAIN_SIZE", MRPC_TRAIN)
    launch("fsdp_with_peak_mem_tracking.py", "FSDP_PEAK_MEM", processes, "--model_name_or_path", "bert-base-cased",
           "--checkpointing_steps", "epoch", "--output_dir", str(tmp_path / "checkpoints"),
           launch_args=("--use_fsdp",), timeout=300)
