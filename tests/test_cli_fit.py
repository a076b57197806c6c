"""``trainer fit``: a YAML config plus overrides trains exactly the Trainer the same settings make in Python.

Most tests run the command in this process (``trainer.cli.fit.main``); one launches it on two
processes through the ``trainer`` console script.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from distributed_helpers import run_cli
from fit_fixtures.tiny import RandomData, TinyNet, TinyTrainer, tiny_net
from safetensors.torch import load_file

from trainer import set_seed
from trainer.checkpoint_errors import CheckpointError
from trainer.checkpoint_state import find_latest
from trainer.cli import fit
from trainer.cli import main as cli_main
from trainer.cli.fit_config import FILE_NAME

TESTS = Path(__file__).resolve().parent
SEED, HIDDEN, LR, BATCH = 3, 8, 0.05, 4


def write_config(folder: Path, **trainer) -> Path:
    """fit.yaml: TinyTrainer on TinyNet with random data, one epoch (tests override max_epochs)."""
    config = {
        "trainer_class": "fit_fixtures.tiny:TinyTrainer",
        "model": {"class_path": "fit_fixtures.tiny.TinyNet", "init_args": {"hidden": HIDDEN}},
        "data": {"train_data": {"class_path": "fit_fixtures.tiny.RandomData", "init_args": {"samples": 24}},
                 "eval_data": {"class_path": "fit_fixtures.tiny.RandomData", "init_args": {"samples": 8}}},
        "trainer": {"max_epochs": 1, "batch_size": BATCH, "seed": SEED, "lr": LR, "output_dir": str(folder / "cli"),
                    "progress_bar": False, **trainer},
    }
    path = folder / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def python_run(folder: Path, max_epochs: int, make_model=lambda: TinyNet(hidden=HIDDEN), optimizers=lambda model: {},
               **settings) -> TinyTrainer:
    """The same run written in Python: seed, model, data, Trainer (the order trainer fit follows)."""
    set_seed(SEED)
    model = make_model()
    train, evaluation = RandomData(samples=24), RandomData(samples=8)
    trainer = TinyTrainer(model, train_data=train, eval_data=evaluation, max_epochs=max_epochs, batch_size=BATCH,
                          seed=SEED, lr=LR, output_dir=folder / "python", progress_bar=False, **optimizers(model),
                          **settings)
    trainer.fit()
    return trainer


def weights(trainer) -> dict[str, torch.Tensor]:
    return trainer.accelerator.unwrap_model(trainer.model).state_dict()


def assert_same(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("trainer fit: "), err
    return err.strip()


def test_yaml_and_an_override_train_the_weights_of_the_same_python_run(tmp_path, capsys):
    config = write_config(tmp_path)
    assert fit.main([f"--config={config}", "--trainer.max_epochs", "2"]) == 0
    checkpoint = find_latest(tmp_path / "cli" / "checkpoints")
    assert checkpoint is not None and checkpoint.name.startswith("epoch=1-")  # two epochs: the override won
    expected = weights(python_run(tmp_path, max_epochs=2))
    assert_same(load_file(str(checkpoint / "model.safetensors")), expected)

    # The checkpoint stores the resolved config, listed in its manifest; it still loads (checked) and resumes.
    stored = json.loads((checkpoint / FILE_NAME).read_text())
    assert stored["trainer"]["max_epochs"] == 2 and stored["model"]["init_args"]["hidden"] == HIDDEN
    assert stored["trainer_class"] == "fit_fixtures.tiny:TinyTrainer"
    assert FILE_NAME in json.loads((checkpoint / "manifest.json").read_text())["files"]
    resumed = fit.build([f"--config={config}", "--trainer.max_epochs", "2", "--resume", str(checkpoint)])
    assert resumed is not None and resumed.resume == str(checkpoint)
    resumed.trainer.fit(resume=resumed.resume)  # verifies the manifest, restores everything; no epoch is left
    assert_same(weights(resumed.trainer), expected)

    # The stored config is a config: it trains the same run again.
    assert fit.main(["--config", str(checkpoint / FILE_NAME), "--trainer.output_dir", str(tmp_path / "again")]) == 0
    again = find_latest(tmp_path / "again" / "checkpoints")
    assert again is not None
    assert_same(load_file(str(again / "model.safetensors")), expected)

    # A changed config file is caught like any other changed file of the checkpoint.
    (checkpoint / FILE_NAME).write_text((checkpoint / FILE_NAME).read_text().replace('"max_epochs": 2', '"max_epochs": 3'))
    damaged = fit.build([f"--config={config}", "--trainer.max_epochs", "2"])
    assert damaged is not None
    with pytest.raises(CheckpointError, match=f"{FILE_NAME} is damaged"):
        damaged.trainer.fit(resume=checkpoint)
    assert capsys.readouterr().err == ""


def test_optimizer_section_function_model_and_file_path_form(tmp_path):
    config = write_config(tmp_path)
    argv = [f"{TESTS / 'fit_fixtures' / 'tiny.py'}:TinyTrainer", "--config", str(config),
            "--model", "fit_fixtures.tiny.tiny_net", "--model.hidden", str(HIDDEN),
            "--optimizer", "SGD", "--optimizer.lr", "0.1", "--optimizer.momentum", "0.9",
            "--lr_scheduler", "StepLR", "--lr_scheduler.step_size", "2"]
    try:
        run = fit.build(argv)
        assert run is not None
        built = type(run.trainer)
        assert built.__name__ == "TinyTrainer" and built.__module__ == "tiny"  # the file, imported under its name
        run.trainer.fit()
    finally:
        sys.modules.pop("tiny", None)
        sys.path.remove(str(TESTS / "fit_fixtures"))

    def sgd(model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return {"optimizer": optimizer, "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)}

    expected = python_run(tmp_path, 1, make_model=lambda: tiny_net(hidden=HIDDEN), optimizers=sgd)
    assert run.trainer.scheduler.scheduler.last_epoch == expected.global_step == 6
    assert_same(weights(run.trainer), weights(expected))


def test_print_config_prints_the_merged_config_and_builds_nothing(tmp_path, capsys):
    config = write_config(tmp_path)
    assert fit.main([str(config), "--trainer.max_epochs", "2", "--data.eval_data", "fit_fixtures.tiny.hf_rows",
                     "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["eval_data"] == {"class_path": "fit_fixtures.tiny.hf_rows", "init_args": {"samples": 8}}
    assert printed["trainer"]["max_epochs"] == 2 and printed["trainer"]["lr"] == LR  # the override, the file
    assert printed["trainer"]["precision"] == "auto"  # and the signature's defaults
    assert printed["model"] == {"class_path": "fit_fixtures.tiny.TinyNet",
                                "init_args": {"features": 6, "hidden": HIDDEN, "classes": 3}}
    assert printed["trainer_class"] == "fit_fixtures.tiny:TinyTrainer" and printed["optimizer"] is None
    assert not (tmp_path / "cli").exists()


@pytest.mark.parametrize(("args", "yaml_trainer", "expected"), [
    (["--trainer.max_epoch", "2"], {}, "trainer fit: unknown option --trainer.max_epoch; did you mean "
                                       "--trainer.max_epochs? See `trainer fit --help`."),
    ([], {"max_epoch": 2}, "trainer fit: trainer.max_epoch is not a key of the trainer section; did you mean "
                           "trainer.max_epochs? See `trainer fit --help`."),
    (["--model.init_args.hiden", "4"], {}, "trainer fit: model: fit_fixtures.tiny.TinyNet takes no argument 'hiden'; "
                                          "did you mean 'hidden'?"),
    (["--modle.hidden", "4"], {}, "trainer fit: unknown option --modle.hidden; did you mean --model.hidden? See "
                                  "`trainer fit --help`."),
    (["--trainer.lr", "fast"], {}, "trainer fit: trainer.lr: expected float, got 'fast'."),
], ids=["flag", "yaml-key", "init-arg", "section", "type"])
def test_a_mistake_is_one_line_with_the_closest_name(tmp_path, capsys, args, yaml_trainer, expected):
    config = write_config(tmp_path, **yaml_trainer)
    assert fit.main(["--config", str(config), *args]) == 2
    assert one_error_line(capsys) == expected
    assert not (tmp_path / "cli").exists()


@pytest.mark.parametrize(("text", "expected"), [
    (None, "trainer fit: config file {path} does not exist; check the path."),
    ("trainer: [1,\n", "trainer fit: config file {path}, line 2, column 1: expected the node content, but found "
                       "'<stream end>'; fix the YAML there."),
    ("trainer:\n  max_epochs: 1\n  max_epochs: 2\n", "trainer fit: config file {path}, line 3: max_epochs is set twice "
     "(first at line 2) and YAML would keep the last value silently; keep one."),
    ("- 1\n", "trainer fit: config file {path} holds a list, not sections (trainer_class:, model:, data:, trainer: ...)."),
    ("modle:\n  class_path: x.Y\n", "trainer fit: modle.class_path is not a key of the config; did you mean "
     "model.class_path? See `trainer fit --help`."),
    ("trainer:\n  optimizer: 1\n", "trainer fit: trainer.optimizer: set optimizer instead (a section of its own, built "
     "before the Trainer). See `trainer fit --help`."),
], ids=["missing", "syntax", "twice", "list", "top-level-key", "built-elsewhere"])
def test_a_config_file_mistake_names_the_file(tmp_path, capsys, text, expected):
    second = tmp_path / "second.yaml"
    if text is not None:
        second.write_text(text)
    assert fit.main([str(write_config(tmp_path)), str(second), "--trainer.max_epochs", "2"]) == 2
    assert one_error_line(capsys) == expected.format(path=second)


@pytest.mark.parametrize(("args", "expected"), [
    (["--model", "fit_fixtures.tiny.TinyNett"], "trainer fit: model: cannot import class_path "
     "'fit_fixtures.tiny.TinyNett': module 'fit_fixtures.tiny' has no attribute 'TinyNett'; did you mean "
     "fit_fixtures.tiny.TinyNet?"),
    (["--data.train_data", "no_such_module.Data"], "trainer fit: data.train_data: cannot import class_path "
     "'no_such_module.Data': No module named 'no_such_module'; check the spelling, and run from the folder that holds "
     "the module (it is importable from there)."),
    (["fit_fixtures.tiny:TinyTrainr"], "trainer fit: trainer class 'fit_fixtures.tiny:TinyTrainr': fit_fixtures.tiny "
     "has no 'TinyTrainr'. Did you mean fit_fixtures.tiny:TinyTrainer?"),
    (["fit_fixtures.tiny:TinyNet"], "trainer fit: trainer class 'fit_fixtures.tiny:TinyNet' is type <class "
     "'fit_fixtures.tiny.TinyNet'>, not a subclass of trainer.Trainer; name the class that subclasses Trainer (and "
     "overrides training_step)."),
    (["--optimizer", "Adamw"], "trainer fit: optimizer: no class named 'Adamw'; did you mean AdamW "
     f"({torch.optim.AdamW.__module__}.AdamW)?"),
    (["--model", "fit_fixtures.tiny.unannotated_net"], "trainer fit: model: fit_fixtures.tiny.unannotated_net is "
     "neither a Module class nor a function annotated to return one (def make(...) -> Module)."),
], ids=["model", "data-module", "trainer-class", "not-a-trainer", "class-name", "unannotated"])
def test_a_bad_class_path_is_one_line(tmp_path, capsys, args, expected):
    config = write_config(tmp_path)
    argv = [*args, "--config", str(config)] if args[0].startswith("fit_") else ["--config", str(config), *args]
    assert fit.main(argv) == 2
    assert one_error_line(capsys) == expected


def test_without_jsonargparse_the_command_names_the_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "jsonargparse", None)  # as if not installed: find_spec gives None
    assert fit.main(["--config", "fit.yaml"]) == 2
    assert capsys.readouterr().err == "trainer fit: needs jsonargparse: pip install 'trainer-kit[cli]'\n"


def test_trainer_fit_is_a_command_of_the_trainer_console_script(tmp_path, capsys):
    parser = cli_main.build_parser()
    if "fit" not in next(a for a in parser._actions if a.dest == "command").choices:
        pytest.skip("trainer/cli/main.py does not register fit yet (fit.register(commands))")
    config = write_config(tmp_path)
    assert cli_main.main(["fit", "--config", str(config), "--trainer.max_epochs", "2", "--print_config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["max_epochs"] == 2
    assert cli_main.main(["fit", "fit_fixtures.tiny:TinyTrainer", "--help"]) == 0
    assert "--trainer.lr LR" in capsys.readouterr().out
    assert cli_main.main(["fit", "--config", str(config), "--trainer.max_epoch", "2"]) == 2
    assert "did you mean --trainer.max_epochs?" in one_error_line(capsys)


def test_trainer_launch_runs_it_on_two_processes(tmp_path):
    """The command line end to end: trainer launch --num_processes 2 --cpu -m trainer.cli.fit ..."""
    config = write_config(tmp_path, batch_size=2)  # 2 processes x 2 samples: the global batch of one process's 4
    code, _, err = run_cli("launch", "--num_processes", "2", "--cpu", "-m", "trainer.cli.fit", str(config), cwd=TESTS)
    assert code == 0, err
    checkpoint = find_latest(tmp_path / "cli" / "checkpoints")
    assert checkpoint is not None
    stored = json.loads((checkpoint / FILE_NAME).read_text())
    assert stored["trainer"]["batch_size"] == 2
    assert json.loads((checkpoint / "accelerator.json").read_text())["num_processes"] == 2

