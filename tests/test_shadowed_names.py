"""A project of the user's own with callbacks.py and strategies.py beside its script: the framework still works.

The user's modules keep their names for the user's imports; the framework imports its own packages
as trainer.callbacks and trainer.strategies, which are also the names documented for users.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from distributed_helpers import REPO_ROOT, run_cli

OWN_CALLBACKS = '''\
"""The user's own callbacks, in a module called callbacks (common in Lightning projects)."""
from trainer.callbacks import Callback


class CountEpochs(Callback):
    def __init__(self):
        self.epochs = 0

    def on_train_epoch_end(self, trainer):
        self.epochs += 1
'''

OWN_STRATEGIES = '''\
"""The user's own module called strategies: learning-rate choices, nothing of the framework's."""
LEARNING_RATE = 0.5
'''

SCRIPT = '''\
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import callbacks as own_callbacks
import strategies as own_strategies
from callbacks import CountEpochs
from trainer import Accelerator, Trainer
import trainer.callbacks
import trainer.strategies
from trainer.callbacks import Callback, ModelCheckpoint
from trainer.strategies import DDP, SingleDevice

here = Path(__file__).resolve().parent
assert Path(own_callbacks.__file__).resolve() == here / "callbacks.py", own_callbacks.__file__
assert Path(own_strategies.__file__).resolve() == here / "strategies.py", own_strategies.__file__
assert "ModelCheckpoint" not in vars(own_callbacks) and "DDP" not in vars(own_strategies)

torch.manual_seed(0)
x = torch.randn(64, 4)
y = (x.sum(dim=1) > 0).long()


class Classifier(Trainer):
    def training_step(self, batch):
        inputs, labels = batch
        return torch.nn.functional.cross_entropy(self.model(inputs), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=own_strategies.LEARNING_RATE)


counter = CountEpochs()
fit = Classifier(torch.nn.Linear(4, 2), train_data=TensorDataset(x, y), batch_size=8, max_epochs=2, trackers=[],
                 progress_bar=False, callbacks=[counter, ModelCheckpoint(every_n_epochs=1)], output_dir=sys.argv[1])
fit.fit()
strategy = fit.accelerator.strategy
assert isinstance(strategy, (SingleDevice, DDP)) and isinstance(counter, trainer.callbacks.Callback)
assert isinstance(counter, Callback)
sys.stdout.write(f"FIT rank {fit.accelerator.process_index}: {counter.epochs} epochs, {fit.global_step} steps, "
                 f"{type(strategy).__name__}\\n")  # one write: the ranks share the pipe
sys.stdout.flush()

accelerator = Accelerator()
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(TensorDataset(x, y), batch_size=8))
for inputs, labels in loader:
    accelerator.backward(torch.nn.functional.cross_entropy(model(inputs), labels))
    optimizer.step()
    optimizer.zero_grad()
sys.stdout.write(f"ACCELERATOR rank {accelerator.process_index}: {accelerator.distributed_type}\\n")
sys.stdout.flush()
accelerator.end_training()
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "callbacks.py").write_text(OWN_CALLBACKS)
    (folder / "strategies.py").write_text(OWN_STRATEGIES)
    (folder / "train.py").write_text(SCRIPT)
    return folder


def test_the_script_runs_beside_its_own_callbacks_and_strategies(project, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TRAINER_USE_CPU": "1"}
    result = subprocess.run([sys.executable, "train.py", str(tmp_path / "out")], cwd=project, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "FIT rank 0: 2 epochs, 16 steps, SingleDevice" in result.stdout
    assert "ACCELERATOR rank 0: NO" in result.stdout
    assert (tmp_path / "out" / "checkpoints" / "latest").is_file()


def test_trainer_launch_runs_it_on_two_processes(project, tmp_path):
    """The command runs from the project folder too, where the user's modules are on the path first."""
    code, out, err = run_cli("launch", "--num_processes", "2", "--cpu", "train.py", str(tmp_path / "out"), cwd=project)
    assert code == 0, err
    for rank in (0, 1):
        assert f"FIT rank {rank}: 2 epochs, 8 steps, DDP" in out, out
        assert f"ACCELERATOR rank {rank}: MULTI_CPU" in out, out


def test_both_names_are_the_same_modules():
    script = textwrap.dedent("""
        import callbacks, strategies, callbacks.trackers.csv_tracker as by_short_name
        import trainer.callbacks, trainer.strategies
        import trainer.callbacks.trackers.csv_tracker as by_long_name
        print(callbacks is trainer.callbacks, strategies is trainer.strategies, by_short_name is by_long_name,
              callbacks.ModelCheckpoint is trainer.callbacks.ModelCheckpoint)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"] * 4
