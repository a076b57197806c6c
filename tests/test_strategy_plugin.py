"""A strategy from outside the project (tests/plugins/toy_strategy.py), made known by an installed package's entry point.

Nothing under trainer/, callbacks/ or strategies/ names it; its one declaration (``Toy.spec``) is
all the launch configuration, ``trainer launch``, ``trainer config`` and the docs know of it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_setup import dataset, make_model, train_steps
from distributed_helpers import REPO_ROOT, WORKERS_DIR, run_cli
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from trainer import Accelerator, PartialState, set_seed

PLUGINS = Path(__file__).resolve().parent / "plugins"
TOY_YAML = """\
compute_environment: LOCAL_MACHINE
distributed_type: TOY
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: true
toy_config:
  toy_reduce: mean
  toy_broadcast_from: 1
"""


@pytest.fixture
def installed_toy(tmp_path, monkeypatch) -> Path:
    """A package that ships Toy, installed as pip would: its module on the path and a dist-info with the entry point."""
    site = tmp_path / "site"
    info = site / "toy_strategy-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-strategy\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[trainer.strategies]\ntoy = toy_strategy:Toy\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(PLUGINS)]))
    (tmp_path / "toy.yaml").write_text(TOY_YAML)
    return tmp_path


def test_a_yaml_naming_the_strategy_validates_and_a_misspelt_key_gets_a_suggestion(installed_toy):
    code, out, err = run_cli("config", "validate", str(installed_toy / "toy.yaml"))
    assert code == 0, err
    assert "valid (TOY, 2 process(es))" in out
    (installed_toy / "typo.yaml").write_text(TOY_YAML.replace("toy_reduce:", "toy_reduse:"))
    code, _, err = run_cli("config", "validate", str(installed_toy / "typo.yaml"))
    assert code == 2
    assert "Unknown key 'toy_config.toy_reduse'. Did you mean 'toy_reduce'?" in err
    (installed_toy / "bad.yaml").write_text(TOY_YAML.replace("toy_reduce: mean", "toy_reduce: max"))
    code, _, err = run_cli("config", "validate", str(installed_toy / "bad.yaml"))
    assert code == 2 and "toy_config.toy_reduce: 'max' is not allowed. Allowed: mean, sum." in err


def test_the_strategy_appears_in_launch_help_config_questions_and_the_configuration_page(installed_toy):
    code, out, err = run_cli("launch", "--help")
    assert code == 0, err
    assert "--use_toy" in out and "--toy_reduce {mean,sum}" in out and "--toy_broadcast_from N" in out
    answers = "TOY\n1\n2\nyes\nno\nsum\n"
    code, out, err = run_cli("config", "--config_file", str(installed_toy / "asked.yaml"), stdin=answers)
    assert code == 0, err
    assert "Combine gradients by? (mean/sum) [mean]" in out
    assert "toy_reduce: sum" in (installed_toy / "asked.yaml").read_text()
    page = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, 'tools'); import docs_hooks; "
                           "print(docs_hooks.config_table())"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.environ["PYTHONPATH"] + os.pathsep + str(REPO_ROOT)})
    assert page.returncode == 0, page.stderr
    row = next(line for line in page.stdout.splitlines() if "`toy_config.toy_reduce`" in line)
    assert "`mean`, `sum`" in row and "| `mean` |" in row and "How gradients are combined over processes." in row
    assert "| `TOY` | `toy` | data parallel with gradients all-reduced by hand after each backward |" in page.stdout


def test_trainer_launch_runs_two_processes_with_it_and_they_equal_one(installed_toy):
    code, out, err = run_cli("launch", "--config_file", str(installed_toy / "toy.yaml"), str(WORKERS_DIR / "toy_worker.py"),
                             str(installed_toy))
    assert code == 0, err
    assert "TOY rank 0 OK" in out and "TOY rank 1 OK" in out
    toy = load_file(str(installed_toy / "toy.safetensors"))
    PartialState._reset_state()
    set_seed(0)
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, DataLoader(dataset(), batch_size=16, shuffle=True))
    train_steps(accelerator, model, optimizer, loader)
    single = model.state_dict()
    assert max((toy[name] - single[name]).abs().max().item() for name in single) <= 1e-5
    assert max((single[name] - make_model().state_dict()[name]).abs().max().item() for name in single) > 1e-2


def test_a_strategy_registered_in_the_program_resolves_by_name(monkeypatch):
    """register_strategy in a script: Accelerator(strategy="toy") finds it, with no entry point."""
    script = ("import sys; sys.path.insert(0, sys.argv[1]); from toy_strategy import Toy; "
              "from trainer.strategies import register_strategy; register_strategy(Toy); register_strategy(Toy); "
              "from trainer import Accelerator; a = Accelerator(strategy='toy', cpu=True); print(type(a.strategy).__name__); "
              "from trainer.strategies import Strategy, StrategySpec\n"
              "class Twin(Strategy):\n    spec = StrategySpec(name='twin', summary='x', distributed_types=('TOY',))\n"
              "try:\n    register_strategy(Twin)\nexcept ValueError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", script, str(PLUGINS)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["Toy", "Strategy name 'toy' of Twin already means 'toy'."]
