"""How long a run trains and on how much data: max_steps/max_epochs/max_time, batch limits, fast_dev_run, overfit;
compile=; Lightning's configure_optimizers forms; Lightning's and HF's argument names."""

from __future__ import annotations

import warnings

import pytest
import torch
from trainer_setup import ClassifierTrainer, datasets, make_trainer, model

from trainer.callbacks import Callback, ModelCheckpoint


class Counter(Callback):
    def __init__(self):
        self.train_batches, self.eval_batches, self.epochs = 0, 0, 0

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        self.train_batches += 1

    def on_validation_batch_end(self, trainer, outputs, batch, batch_idx):
        self.eval_batches += 1

    def on_train_epoch_end(self, trainer):
        self.epochs += 1


def test_max_steps_wins_over_the_default_epochs(tmp_path):
    trainer = make_trainer(tmp_path, max_epochs=None, max_steps=12, accumulate=1, checkpoint=False)
    trainer.fit()
    assert trainer.global_step == 12 and trainer.current_epoch == 1  # 9 batches an epoch: into the second
    assert trainer.estimated_stepping_batches == 12


def test_without_max_steps_one_epoch_by_default(tmp_path):
    trainer = make_trainer(tmp_path, max_epochs=None, accumulate=1, checkpoint=False)
    trainer.fit()
    assert trainer.global_step == 9 and trainer.current_epoch == 1


def test_the_first_limit_reached_ends_the_run(tmp_path):
    trainer = make_trainer(tmp_path, max_epochs=1, max_steps=100, accumulate=1, checkpoint=False)
    trainer.fit()
    assert trainer.global_step == 9 and trainer.estimated_stepping_batches == 9


def test_fast_dev_run_two_batches_no_checkpoint_no_records(tmp_path):
    counter = Counter()
    trainer = make_trainer(tmp_path, fast_dev_run=2, accumulate=1, trackers=["csv"], max_epochs=5,
                           callbacks=[counter, ModelCheckpoint(every_n_steps=1)])
    trainer.fit()
    assert trainer.global_step == 2 and counter.train_batches == 2 and counter.eval_batches == 2
    assert not list(tmp_path.rglob("*.csv")) and not (tmp_path / "checkpoints").exists()


def test_limit_train_batches_counts_batches_per_epoch(tmp_path):
    counter = Counter()
    trainer = make_trainer(tmp_path, limit_train_batches=3, accumulate=1, max_epochs=2, callbacks=[counter],
                           checkpoint=False)
    trainer.fit()
    assert trainer.global_step == 6 and counter.epochs == 2 and len(trainer.train_loader) == 3


def test_a_fraction_of_the_batches_and_a_short_last_group(tmp_path):
    trainer = make_trainer(tmp_path, limit_train_batches=0.5, accumulate=3, max_epochs=1, checkpoint=False)
    trainer.fit()  # 4 of 9 batches: one group of 3, and the limit closes a group of 1
    assert len(trainer.train_loader) == 4 and trainer.global_step == 2


def test_limit_eval_batches(tmp_path):
    counter = Counter()
    trainer = make_trainer(tmp_path, limit_eval_batches=1, eval_every_n_steps=None, max_epochs=1, callbacks=[counter],
                           checkpoint=False)
    trainer.fit()
    assert counter.eval_batches == 1


def test_overfit_batches_train_and_validate_on_the_same_first_batches(tmp_path):
    seen = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, batch, batch_idx):
            seen.append(batch[0].clone())

    trainer = make_trainer(tmp_path, overfit_batches=2, accumulate=1, max_epochs=3, callbacks=[Record()],
                           eval_every_n_steps=None, checkpoint=False)
    trainer.fit()
    assert trainer.global_step == 6
    assert all(torch.equal(seen[i], seen[i % 2]) for i in range(6))
    x = datasets()[0].tensors[0]
    assert torch.equal(seen[0], x[:4]) and torch.equal(seen[1], x[4:8])  # in order, unshuffled
    assert len(trainer.eval_loader) == 2


def test_max_time_stops_after_the_step_that_spends_it(tmp_path):
    trainer = make_trainer(tmp_path, max_time={"microseconds": 1}, accumulate=1, max_epochs=5, checkpoint=False)
    trainer.fit()
    assert trainer.global_step == 1


@pytest.mark.parametrize("arguments, message", [
    ({"limit_train_batches": 1.5}, r"limit_train_batches=1\.5: a fraction of the batches must lie in \(0, 1\]"),
    ({"limit_eval_batches": 0}, r"limit_eval_batches=0: use a whole number >= 1"),
    ({"fast_dev_run": -1}, r"fast_dev_run=-1: use True"),
    ({"max_time": "12 hours"}, r"max_time='12 hours': use 'DD:HH:MM:SS'"),
    ({"compile": {"mdoe": "max-autotune"}}, r"unknown keys \['mdoe'\]"),
], ids=["fraction", "zero", "fast_dev_run", "max_time", "compile"])
def test_bad_limits(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path, **arguments)


@pytest.mark.parametrize("name, ours", [("gradient_clip_val", "grad_clip"), ("val_check_interval", "eval_every_n_steps"),
                                        ("per_device_train_batch_size", "batch_size"),
                                        ("accumulate_grad_batches", "accumulate")])
def test_lightning_and_hf_names_point_to_ours(tmp_path, name, ours):
    with pytest.raises(TypeError, match=rf"unexpected argument '{name}'\. That is Lightning's or the HF Trainer's "
                                        rf"name: here use {ours}=\.\.\."):
        make_trainer(tmp_path, **{name: 1})


def test_a_misspelt_argument_gets_a_did_you_mean(tmp_path):
    with pytest.raises(TypeError, match=r"unexpected argument 'max_epoch'\. Did you mean 'max_epochs'\?"):
        make_trainer(tmp_path, max_epoch=2)


def test_compile_keeps_the_checkpoint_keys(tmp_path):
    trainer = make_trainer(tmp_path, compile=True, max_epochs=1, limit_train_batches=2, accumulate=1,
                           eval_data=None, callbacks=[ModelCheckpoint(every_n_steps=2)])
    trainer.fit()
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "checkpoints" / "epoch=0-step=2" / "model.safetensors"))
    assert sorted(saved) == sorted(model().state_dict())
    assert sorted(trainer.accelerator.unwrap_model(trainer.model).state_dict()) == sorted(model().state_dict())


class Scheduled(ClassifierTrainer):
    config: dict = {}

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.model.parameters(), lr=1.0)
        return {"optimizer": optimizer, "lr_scheduler": {**self.config,
                                                         "scheduler": self.config["scheduler"](optimizer)}}


def scheduled(tmp_path, **config):
    train, evaluation = datasets()
    trainer_class = type("S", (Scheduled,), {"config": config})
    return trainer_class(model(), train_data=train, eval_data=evaluation, batch_size=4, max_epochs=2, output_dir=tmp_path,
                         progress_bar=False, checkpoint=False)


def test_lightning_scheduler_dict_steps_each_epoch_by_default(tmp_path):
    trainer = scheduled(tmp_path, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5))
    trainer.fit()
    assert trainer.optimizer.param_groups[0]["lr"] == 0.25  # two epochs, two steps


def test_lightning_scheduler_dict_every_second_optimizer_step(tmp_path):
    trainer = scheduled(tmp_path, scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1, gamma=0.5),
                        interval="step", frequency=2)
    trainer.fit()
    assert trainer.global_step == 18 and trainer.optimizer.param_groups[0]["lr"] == 0.5 ** 9


def test_reduce_on_plateau_steps_on_the_monitored_metric(tmp_path):
    trainer = scheduled(tmp_path, scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0,
                                                                                                  threshold=10.0),
                        monitor="val_loss")
    trainer.fit()  # a threshold no improvement meets: each of the 2 epoch-end steps reduces by 10
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_reduce_on_plateau_without_a_monitor(tmp_path):
    with pytest.raises(ValueError, match=r"ReduceLROnPlateau steps on a metric.*'monitor': 'val_loss'"):
        scheduled(tmp_path, scheduler=lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o))


def test_logging_a_tensor_that_requires_grad_does_not_warn(tmp_path):
    trainer = make_trainer(tmp_path)
    value = torch.tensor(2.0, requires_grad=True) * 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer.log("x", value)
    assert trainer.metrics["x"] == 3.0
