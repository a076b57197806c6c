"""`trainer launch`, `trainer config` and the YAML files, on two CPU processes."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch
import yaml
from distributed_helpers import WORKERS_DIR, run_cli
from safetensors.torch import load_file
from tracker_helpers import csv_history

from trainer import config as launch_config

PROBE = WORKERS_DIR / "launch_probe.py"
REPO = Path(__file__).resolve().parent.parent

TALK_DDP = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
main_training_function: main
mixed_precision: bf16
num_machines: 1
num_processes: 8
"""

TALK_FSDP = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_backward_prefetch: BACKWARD_PRE
  fsdp_cpu_ram_efficient_loading: true
  fsdp_forward_prefetch: false
  fsdp_offload_params: false
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_sync_module_states: true
  fsdp_use_orig_params: false
main_training_function: main
mixed_precision: bf16
num_machines: 1
num_processes: 8
"""


def on_two_cpu_processes(talk_yaml: str, path: Path) -> Path:
    """The talk's config file with only the machine changed (2 processes on the CPU), written to ``path``."""
    path.write_text(yaml.safe_dump(yaml.safe_load(talk_yaml) | {"num_processes": 2, "use_cpu": True}))
    return path


def probes(out: str) -> list[str]:
    return sorted(line for line in out.splitlines() if line.startswith("PROBE"))


def test_the_talks_yaml_files_load_unchanged():
    for text in (TALK_DDP, TALK_FSDP):
        config = launch_config.validate(yaml.safe_load(text))
        assert config["num_processes"] == 8


def test_launch_two_cpu_processes_hands_settings_to_the_script():
    code, out, err = run_cli("launch", "--num_processes", "2", "--cpu", "--mixed_precision", "bf16",
                            "--gradient_accumulation_steps", "3", str(PROBE))
    assert code == 0, err
    assert probes(out) == [f"PROBE rank={r} world=2 strategy=ddp precision=bf16 device=cpu accumulate=3" for r in (0, 1)]


def test_one_process_runs_without_torchrun():
    code, out, err = run_cli("launch", "--cpu", str(PROBE))
    assert code == 0, err
    assert probes(out) == ["PROBE rank=0 world=1 strategy=single_device precision=no device=cpu accumulate=1"]


def test_launch_with_the_talks_ddp_config_adjusted_to_cpu(tmp_path):
    path = on_two_cpu_processes(TALK_DDP, tmp_path / "ddp_config.yaml")
    code, out, err = run_cli("launch", "--config_file", str(path), str(PROBE))
    assert code == 0, err
    assert probes(out) == [f"PROBE rank={r} world=2 strategy=ddp precision=bf16 device=cpu accumulate=1" for r in (0, 1)]


def test_launch_with_the_talks_fsdp_config_adjusted_to_cpu(tmp_path):
    path = on_two_cpu_processes(TALK_FSDP, tmp_path / "fsdp_config.yaml")
    code, out, err = run_cli("launch", "--config_file", str(path), str(PROBE))
    assert code == 0, err
    assert probes(out) == [f"PROBE rank={r} world=2 strategy=fsdp precision=bf16 device=cpu accumulate=1" for r in (0, 1)]
    code, out, err = run_cli("launch", "--config_file", str(path), "examples/low_code_loop.py", "--epochs", "3")
    assert code == 0, err
    first, last = (float(out.split(f"{which}-epoch loss=")[1].split()[0]) for which in ("first", "last"))
    assert last < first
    # The Trainer example under the same file: sharded checkpoints (SHARDED_STATE_DICT), resumed by a second run,
    # then merged into one safetensors file that the plain model loads.
    digits = tmp_path / "digits"
    for epochs in ("2", "3"):
        code, out, err = run_cli("launch", "--config_file", str(path), "examples/trainer_digits.py",
                                 "--output-dir", str(digits), "--epochs", epochs)
        assert code == 0, err
    assert "epoch 2:" in out and "epoch 0:" not in out  # the second run resumed after epoch 1
    assert float(out.split("test accuracy ")[1].split()[0]) > 0.85
    latest = digits / "checkpoints" / (digits / "checkpoints" / "latest").read_text().strip()
    assert len(list((latest / "sharded_state").glob("shard-*.safetensors"))) == 2
    code, _, err = run_cli("merge-weights", str(latest), str(tmp_path / "merged"))
    assert code == 0, err
    spec = importlib.util.spec_from_file_location("trainer_digits", REPO / "examples" / "trainer_digits.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.make_model().eval()
    model.load_state_dict(load_file(str(tmp_path / "merged" / "model.safetensors")))
    x, y = example.digits()[1].tensors
    with torch.no_grad():
        assert (model(x).argmax(-1) == y).float().mean().item() > 0.85


def test_a_misspelt_nested_key_is_refused_with_a_suggestion(tmp_path):
    path = tmp_path / "fsdp_config.yaml"
    path.write_text(TALK_FSDP.replace("fsdp_sharding_strategy", "fsdp_sharding_stratgy"))
    code, out, err = run_cli("launch", "--config_file", str(path), str(PROBE))
    assert code == 2
    assert "Unknown key 'fsdp_config.fsdp_sharding_stratgy'. Did you mean 'fsdp_sharding_strategy'?" in err
    assert "PROBE" not in out


def test_a_bad_value_names_the_key_and_the_allowed_values(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(TALK_DDP.replace("mixed_precision: bf16", "mixed_precision: bf61"))
    code, _, err = run_cli("config", "validate", str(path))
    assert code == 2
    assert "mixed_precision: 'bf61' is not allowed. Did you mean 'bf16'? Allowed: no, fp16, bf16, fp8." in err


def test_the_talks_loop_and_the_trainer_example_under_launch(tmp_path):
    code, out, err = run_cli("launch", "--num_processes", "2", "--cpu", "examples/low_code_loop.py", "--epochs", "2")
    assert code == 0, err
    assert out.count("first-epoch loss=") == 1  # printed by the main process only
    code, out, err = run_cli("launch", "--num_processes", "2", "--cpu", "examples/trainer_digits.py",
                            "--output-dir", str(tmp_path / "digits"), "--epochs", "4")
    assert code == 0, err
    accuracy = float(out.split("test accuracy ")[1].split()[0])
    assert accuracy > 0.85
    assert (tmp_path / "digits" / "checkpoints" / "latest").is_file()
    # Only the main process records: one row per validation, not one per process.
    validations = [step for step, _ in csv_history(tmp_path / "digits")["val_acc"]]
    assert len(validations) == len(set(validations)) == 4


def test_a_failing_rank_ends_the_job_quickly_with_its_traceback():
    started = time.monotonic()
    code, _, err = run_cli("launch", "--num_processes", "2", "--cpu", str(PROBE), "--fail-rank", "1", timeout=120)
    assert code != 0
    assert time.monotonic() - started < 60
    assert "RuntimeError: rank 1 fails on purpose" in err
    assert "trainer launch: rank 1 failed and the other process on this machine was stopped:" in err
    assert "exit code 1, RuntimeError: rank 1 fails on purpose; traceback above and in " in err
    assert "ChildFailedError" not in err and "torch/distributed/run.py" not in err  # no launcher traceback


def test_a_killed_rank_is_restarted_and_training_resumes_exactly(tmp_path):
    code, _, err = run_cli("launch", "--num_processes", "2", "--cpu", str(PROBE), "--trainer", str(tmp_path / "straight"))
    assert code == 0, err
    code, _, err = run_cli("launch", "--num_processes", "2", "--cpu", "--max_restarts", "1", str(PROBE),
                          "--trainer", str(tmp_path / "killed"), "--kill-rank", "1", "--kill-at", "4")
    assert code == 0, err
    a = load_file(str(tmp_path / "straight" / "result.safetensors"))
    b = load_file(str(tmp_path / "killed" / "result.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_config_questions_answered_on_stdin_write_a_file_launch_accepts(tmp_path):
    answers = "MULTI_CPU\n1\nthree\n2\nyes\nbf16\n"  # "three" is not a number: asked again
    code, out, err = run_cli("config", "--config_file", str(tmp_path / "mine.yaml"), stdin=answers)
    assert code == 0, err
    assert "Please answer with a whole number >= 1." in out
    assert yaml.safe_load((tmp_path / "mine.yaml").read_text()) == {
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_CPU", "main_training_function": "main",
        "mixed_precision": "bf16", "num_machines": 1, "num_processes": 2, "use_cpu": True}
    code, out, err = run_cli("launch", "--config_file", str(tmp_path / "mine.yaml"), str(PROBE))
    assert code == 0, err
    assert len(probes(out)) == 2 and "strategy=ddp precision=bf16" in out


def test_config_default_and_the_saved_default_is_used(tmp_path):
    code, out, _ = run_cli("config", "default", "--cpu", home=tmp_path)
    assert code == 0 and f"saved at {tmp_path / 'default_config.yaml'}" in out
    code, out, err = run_cli("launch", str(PROBE), home=tmp_path)
    assert code == 0, err
    assert probes(out) == ["PROBE rank=0 world=1 strategy=single_device precision=no device=cpu accumulate=1"]


def test_config_questions_cut_short_write_nothing(tmp_path):
    code, _, err = run_cli("config", "--config_file", str(tmp_path / "x.yaml"), stdin="MULTI_CPU\n")
    assert code == 2 and "nothing was written" in err
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize("flags", [["--multi_gpu", "--use_fsdp"]])
def test_conflicting_launch_flags(flags):
    code, _, err = run_cli("launch", *flags, str(PROBE))
    assert code == 2 and "Choose one of --multi_gpu, --use_fsdp, --use_deepspeed" in err


def test_trainer_test_runs_the_self_check_on_the_configured_processes(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("distributed_type: MULTI_CPU\nnum_processes: 2\nuse_cpu: true\n")
    code, out, err = run_cli("test", "--config_file", str(path))
    assert code == 0, err
    assert "self-check passed on 2 process(es): device cpu, strategy ddp, precision no" in out


def test_several_machines_without_an_address_is_one_clear_error():
    code, out, err = run_cli("launch", "--num_machines", "2", "--num_processes", "4", "--cpu", str(PROBE))
    assert code == 2 and "Several machines need --main_process_ip" in err and "Traceback" not in err
