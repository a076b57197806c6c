"""The examples run: the talk's low-code loop (only its import changed) and the demo."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# The lines of the talk's loop that a user adds or keeps, as they appear in the example.
TALK_LINES = [
    "accelerator = Accelerator()",
    "device = accelerator.device",
    "model, optimizer, dataloader = accelerator.prepare(model, optimizer, dataloader)",
    "model.train()",
    "for source, targets in dataloader:",
    "optimizer.zero_grad()",
    "output = model(source)",
    "loss = F.cross_entropy(output, targets)",
    "accelerator.backward(loss)",
    "optimizer.step()",
]


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_talks_loop_is_in_the_example_with_only_the_import_changed():
    source = (EXAMPLES / "low_code_loop.py").read_text()
    lines = [line.strip() for line in source.splitlines()]
    for line in TALK_LINES:
        assert line in lines, line
    assert "from trainer import Accelerator  # the only line that differs from the talk" in lines
    assert "loss.backward()" not in lines
    assert not any(line.startswith(("from accelerate", "import accelerate")) for line in lines)


def test_the_talks_loop_trains(tmp_path):
    example = load_example("low_code_loop")
    data = example.write_my_dataset(tmp_path / "my_dataset", samples=256)
    torch.manual_seed(0)
    accelerator, model, losses = example.train(data, epochs=6)
    assert accelerator.device.type in ("cpu", "cuda", "xpu", "mps")
    assert len(losses) == 6
    assert losses[-1] < 0.15 < losses[0]


def test_demo_trains_stops_resumes_and_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.delenv("TRAINER_TRACKERS")  # the demo records with the default trackers
    result = subprocess.run([sys.executable, str(EXAMPLES / "demo.py"), "--output-dir", str(tmp_path), "--epochs", "6",
                             "--stop-after", "3"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "stopped after epoch 2 (step 69), as an interrupted job would" in out
    assert "resumed and finished at step 138" in out
    assert "weights bit-identical to an uninterrupted run of the same length: True" in out
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert f"checkpoints: {tmp_path / 'checkpoints'} (latest: {latest})" in out
    assert (tmp_path / "checkpoints" / latest / "model.safetensors").is_file()
    assert f"metrics (CSV): {tmp_path / 'csv' / 'metrics.csv'}" in out
    if importlib.util.find_spec("mlflow"):
        # one run across the interruption: 6 epochs of validation, FINISHED
        assert f"MLflow: sqlite:///{tmp_path / 'mlflow.db'} (run " in out
        assert "FINISHED): 6 validations" in out
    assert "offloaded prediction (layers 0 and 3 on disk): held-out accuracy" in out
    assert "equal to in memory: True" in out
    assert "large-model inference: " in out and "equal to the model fully in memory: True" in out
    assert "on disk)" in out


def test_trainer_example_reaches_its_stated_accuracy(tmp_path):
    example = load_example("trainer_digits")
    trainer = example.train(tmp_path, epochs=20, resume=None, quiet=True)
    assert example.accuracy(trainer) >= example.TARGET_ACCURACY
    assert trainer.global_step == 460
