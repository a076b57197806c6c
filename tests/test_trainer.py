"""The Trainer: event order, callbacks' state and retention, metrics, defaults and errors."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from trainer_setup import ClassifierTrainer, make_trainer

from callbacks import EVENTS, Callback, EarlyStopping, LearningRateMonitor, ModelCheckpoint
from strategies import SingleDevice
from trainer import PartialState, Trainer


class Recorder(Callback):
    """Records every event in the order the bus calls it."""

    def __init__(self) -> None:
        self.events = []

    def __getattribute__(self, name):
        if name in EVENTS:
            return lambda *args: object.__getattribute__(self, "events").append(name)
        return object.__getattribute__(self, name)


for _event in EVENTS:  # the bus dispatches only events a class overrides
    setattr(Recorder, _event, lambda self, *args: None)


def epoch_events(batches: int, accumulate: int, validate: bool) -> list[str]:
    events = ["on_train_epoch_start"]
    for index in range(batches):
        events += ["on_train_batch_start", "on_before_backward", "on_after_backward"]
        if (index + 1) % accumulate == 0 or index == batches - 1:
            events.append("on_before_optimizer_step")
        events.append("on_train_batch_end")
    if validate:
        events += ["on_validation_start", "on_validation_batch_end", "on_validation_batch_end", "on_log",
                   "on_validation_end"]
    return events + ["on_train_epoch_end", "on_save_checkpoint"]


def test_event_order_contract(tmp_path):
    """Two epochs of 5 batches, accumulation 2, validation each epoch, a checkpoint each epoch, then predict."""
    recorder = Recorder()
    trainer = make_trainer(tmp_path, callbacks=[recorder], max_epochs=2, eval_every_n_steps=None,
                           train_data=TensorDataset(torch.randn(20, 6), torch.randint(0, 3, (20,))),
                           eval_data=TensorDataset(torch.randn(6, 6), torch.randint(0, 3, (6,))))
    trainer.fit()
    trainer.predict(TensorDataset(torch.randn(8, 6)))
    expected = (["on_fit_start"] + epoch_events(5, 2, True) * 2 + ["on_fit_end"]
                + ["on_predict_start"] + ["on_predict_batch_end"] * 2 + ["on_predict_end"])
    assert recorder.events == expected


def test_on_log_gives_each_logged_value_once_at_its_step(tmp_path):
    seen = []

    class Logged(Callback):
        def on_log(self, trainer, values):
            seen.append((trainer.global_step, dict(values)))

    trainer = make_trainer(tmp_path, callbacks=[Logged()], max_epochs=1, log_every_n_steps=2, trackers=[],
                           eval_data=None, train_data=TensorDataset(torch.randn(20, 6), torch.randint(0, 3, (20,))))
    trainer.fit()
    trainer.log_dict({"a": 1.0, "b": torch.tensor(2.0)})
    assert [step for step, _ in seen] == [2, 3]  # 3 optimizer steps (accumulation 2 of 5 batches), then log_dict
    assert list(seen[0][1]) == ["train_loss"] and seen[0][1]["train_loss"] == trainer.logged_since(0)[1][2]["train_loss"]
    assert seen[1][1] == {"a": 1.0, "b": 2.0}


def test_events_on_resume_and_on_exception(tmp_path):
    first = make_trainer(tmp_path, max_epochs=1)
    first.fit()
    PartialState._reset_state()
    recorder = Recorder()

    class Boom(Callback):
        def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
            if batch_idx == 1:
                raise RuntimeError("boom")

    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[recorder, Boom()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(resume="latest")
    assert recorder.events[:2] == ["on_load_checkpoint", "on_fit_start"]
    assert recorder.events[2] == "on_train_epoch_start"
    assert recorder.events[-1] == "on_exception"


def test_checkpointing_callbacks_run_last_whatever_the_list_order(tmp_path):
    seen = []

    class First(Callback):
        def on_train_epoch_end(self, trainer):
            seen.append("first")

    class Saver(ModelCheckpoint):
        def on_train_epoch_end(self, trainer):
            seen.append("checkpoint")

    class Last(Callback):
        def on_train_epoch_end(self, trainer):
            seen.append("last")

    make_trainer(tmp_path, max_epochs=1, callbacks=[First(), Saver(), Last()]).fit()
    assert seen == ["first", "last", "checkpoint"]


def test_a_misspelt_event_is_refused():
    class Typo(Callback):
        def on_train_epoch_ends(self, trainer):
            pass

    with pytest.raises(ValueError, match=r"on_train_epoch_ends is not a Trainer event.*Did you mean 'on_train_epoch_end'\?"):
        make_trainer("unused", callbacks=[Typo()])


class Scripted(ClassifierTrainer):
    """Validation reports a scripted metric per epoch, to drive EarlyStopping and ModelCheckpoint."""

    script = [5.0, 3.0, 4.0, 1.0, 2.0, 6.0, 7.0]

    def validation_step(self, batch):
        return {"score": torch.tensor(self.script[self.current_epoch])}


def scripted(tmp_path, callbacks, max_epochs=7, init_seed=0, script=None):
    trainer = make_trainer(tmp_path, callbacks=callbacks, max_epochs=max_epochs, eval_every_n_steps=None,
                           init_seed=init_seed, checkpoint=False)
    trainer.__class__ = Scripted
    if script is not None:
        trainer.script = script
    return trainer


def test_top_k_and_last_retention(tmp_path):
    checkpoint = ModelCheckpoint(monitor="score", mode="min", save_top_k=2, save_last=True)
    scripted(tmp_path, [checkpoint], max_epochs=5, script=[5.0, 3.0, 4.0, 1.0, 6.0]).fit()
    root = tmp_path / "checkpoints"
    # Scores by epoch 5,3,4,1,6 (5 steps per epoch): best two are epochs 3 and 1; the last is epoch 4.
    kept = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert kept == ["epoch=1-step=10", "epoch=3-step=20", "epoch=4-step=25"]
    assert (root / "latest").read_text().strip() == "epoch=4-step=25"
    assert checkpoint.best == {"name": "epoch=3-step=20", "step": 20, "score": 1.0}


def test_most_recent_retention_without_a_monitor(tmp_path):
    scripted(tmp_path, [ModelCheckpoint(every_n_steps=3, save_top_k=2, save_last=False)], max_epochs=2).fit()
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["epoch=1-step=6", "epoch=1-step=9"]


def test_early_stopping_stops_and_survives_resume(tmp_path):
    # Scores 5,3,4,1,2,6,7: best 1.0 at epoch 3; patience 3 stops after epoch 6.
    straight = scripted(tmp_path / "a", [EarlyStopping("score", patience=3)])
    straight.fit()
    assert straight.should_stop and straight.current_epoch == 7  # seven epochs done
    assert straight.callbacks.state_dict()["EarlyStopping[score]"] == {"best": 1.0, "wait": 3, "stopped_at_step": 35}

    PartialState._reset_state()
    interrupted = scripted(tmp_path / "b", [EarlyStopping("score", patience=3), ModelCheckpoint()], max_epochs=5)
    interrupted.fit()  # ends after epoch 4 with wait == 1
    assert interrupted.callbacks.state_dict()["EarlyStopping[score]"]["wait"] == 1
    PartialState._reset_state()
    resumed = scripted(tmp_path / "b", [EarlyStopping("score", patience=3)], init_seed=3)
    resumed.fit(resume="latest")
    assert resumed.should_stop and resumed.current_epoch == 7 and resumed.global_step == 35
    assert resumed.callbacks.state_dict()["EarlyStopping[score]"] == {"best": 1.0, "wait": 3, "stopped_at_step": 35}


def test_monitoring_a_metric_that_does_not_exist(tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[EarlyStopping("val_los")], max_epochs=1)
    with pytest.raises(KeyError, match=r"EarlyStopping monitors 'val_los'.*Did you mean 'val_loss'\?"):
        trainer.fit()


class CountingStrategy(SingleDevice):
    def __init__(self):
        super().__init__()
        self.reductions = 0

    def all_reduce(self, tensor, op="sum"):
        self.reductions += 1
        return super().all_reduce(tensor, op)


def test_validation_metrics_are_sample_weighted_and_reduced_once(tmp_path):
    class MeanOfX(ClassifierTrainer):
        def validation_step(self, batch):
            x, _ = batch
            return {"mean_x": x.mean(), "max_x": x.max()}

    strategy = CountingStrategy()
    values = torch.arange(5.0).view(5, 1).repeat(1, 6)  # batches of 2, 2, 1: uneven
    trainer = MeanOfX(make_trainer_model(), train_data=TensorDataset(values, torch.zeros(5, dtype=torch.long)),
                      eval_data=TensorDataset(values, torch.zeros(5, dtype=torch.long)), batch_size=2,
                      strategy=strategy, output_dir=tmp_path, progress_bar=False, checkpoint=False)
    metrics = trainer.validate()
    assert metrics["mean_x"] == 2.0  # (0+1)/2*2 + (2+3)/2*2 + 4*1, over 5 samples
    assert metrics["max_x"] == (1 * 2 + 3 * 2 + 4 * 1) / 5
    assert strategy.reductions == 1


def make_trainer_model():
    return torch.nn.Sequential(torch.nn.Linear(6, 3))


@dataclass
class Output:
    loss: torch.Tensor
    logits: torch.Tensor


class WithLoss(torch.nn.Module):
    """Shaped like a transformers model: keyword inputs, an output with .loss."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(6, 3)

    def forward(self, features, labels):
        logits = self.linear(features)
        return Output(F.cross_entropy(logits, labels), logits)


def test_a_model_with_loss_trains_without_a_subclass_on_a_datasets_dataset(tmp_path):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(64, 6, generator=generator)
    labels = (features[:, 0] > 0).long() + (features[:, 1] > 0).long()
    data = Dataset.from_dict({"features": features.tolist(), "labels": labels.tolist()}).with_format("torch")
    model = WithLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    trainer = Trainer(model, optimizer, train_data=data, eval_data=data, batch_size=16, max_epochs=30, output_dir=tmp_path,
                      progress_bar=False, checkpoint=False, callbacks=[LearningRateMonitor()])
    before = trainer.validate()["val_loss"]
    metrics = trainer.fit()
    assert metrics["val_loss"] < 0.5 * before
    assert metrics["lr-AdamW"] == 0.05
    predictions = trainer.predict(data)
    assert len(predictions) == 4 and predictions[0].logits.shape == (16, 3)
    streamed = trainer.predict(data, stream=True)
    assert not isinstance(streamed, list) and sum(p.logits.shape[0] for p in streamed) == 64


def test_a_model_without_a_loss_explains_what_to_do(tmp_path):
    trainer = Trainer(torch.nn.Linear(6, 3), train_data=TensorDataset(torch.randn(8, 6)), output_dir=tmp_path,
                      progress_bar=False, checkpoint=False)
    with pytest.raises(TypeError, match="subclass Trainer and define training_step"):
        trainer.fit()


def test_bad_arguments_are_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="Unknown tracker 'mlfow'. Did you mean 'mlflow'"):
        make_trainer(tmp_path, trackers=["mlfow"])
    PartialState._reset_state()
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
        make_trainer(tmp_path, batch_size=0)
    PartialState._reset_state()
    with pytest.raises(ValueError, match="Unknown precision 'bf61'"):
        make_trainer(tmp_path, precision="bf61")
    with pytest.raises(ValueError, match=r"ModelCheckpoint\(mode='best'\)"):
        ModelCheckpoint(mode="best")


def test_max_steps_and_token_normalised_training_step(tmp_path):
    class Tokens(ClassifierTrainer):
        def training_step(self, batch):
            x, y = batch
            return {"loss": F.cross_entropy(self.model(x), y, reduction="sum"), "num_tokens": len(y)}

    trainer = make_trainer(tmp_path, max_epochs=10, max_steps=7, accumulation_normalize="tokens")
    trainer.__class__ = Tokens
    trainer.fit()
    assert trainer.global_step == 7 and trainer.current_epoch == 1


def test_log_and_log_dict(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.log("a", torch.tensor(2.5))
    trainer.log_dict({"b": 1, "c": torch.tensor(4.0)}, sync=True)
    assert {k: trainer.metrics[k] for k in "abc"} == {"a": 2.5, "b": 1.0, "c": 4.0}


def test_reaching_max_steps_on_an_epochs_last_batch_still_ends_the_epoch(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, max_epochs=5, max_steps=5, callbacks=[recorder])  # 5 steps per epoch
    trainer.fit()
    assert trainer.global_step == 5
    assert recorder.events.count("on_train_epoch_end") == 1 and recorder.events.count("on_save_checkpoint") == 1
    assert (tmp_path / "checkpoints" / "epoch=0-step=5").is_dir()


def test_validation_does_not_change_training(tmp_path):
    """Validating (with a DataLoader the user built, and randomness in validation_step) leaves training bit-identical."""
    from torch.utils.data import DataLoader

    class NoisyValidation(ClassifierTrainer):
        def validation_step(self, batch):
            torch.rand(3)  # draws from the global RNG
            return super().validation_step(batch)

    eval_set = TensorDataset(torch.randn(12, 6), torch.randint(0, 3, (12,)))
    with_validation = make_trainer(tmp_path / "a", eval_every_n_steps=2, checkpoint=False,
                                   eval_data=DataLoader(eval_set, batch_size=4, shuffle=True))
    with_validation.__class__ = NoisyValidation
    with_validation.fit()
    PartialState._reset_state()
    without = make_trainer(tmp_path / "b", eval_data=None, checkpoint=False)
    without.fit()
    a, b = with_validation.model.state_dict(), without.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_off_loaders_do_not_enter_checkpoints(tmp_path):
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit()
    trainer.predict(TensorDataset(torch.randn(8, 6)))
    trainer.validate(TensorDataset(torch.randn(8, 6), torch.randint(0, 3, (8,))))
    trainer.save_checkpoint(tmp_path / "after-predict")
    PartialState._reset_state()
    resumed = make_trainer(tmp_path, max_epochs=2)
    resumed.fit(resume=tmp_path / "after-predict")
    assert resumed.global_step == 10


def test_streamed_prediction_leaves_the_callers_grad_mode_and_model_mode_alone(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.model.train()
    stream = trainer.predict(TensorDataset(torch.randn(16, 6)), stream=True)
    first = next(stream)
    assert not first.requires_grad
    assert torch.is_grad_enabled()
    assert not trainer.model.training  # predicting
    stream.close()  # abandoned half way
    assert trainer.model.training


def test_accumulation_steps_can_change_between_groups():
    from trainer import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=2)
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(model.weight)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=1.0))
    for steps in (2, 2, 1):
        accelerator.gradient_accumulation_steps = steps
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.ones(1, 1)).sum())
            optimizer.step()
            optimizer.zero_grad()
    assert model.weight.item() == -1.0  # two steps of -1: one after the group of two, one alone


@pytest.mark.parametrize("name", ["eval_every_n_steps", "eval_every_n_epochs", "max_steps"])
def test_zero_intervals_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match=f"{name} must be a whole number >= 1, or None; got 0"):
        make_trainer(tmp_path, **{name: 0})


def test_resume_latest_finds_checkpoints_in_a_custom_folder(tmp_path):
    custom = tmp_path / "elsewhere"
    make_trainer(tmp_path, max_epochs=1, checkpoint=False, callbacks=[ModelCheckpoint(dirpath=custom)]).fit()
    PartialState._reset_state()
    resumed = make_trainer(tmp_path, max_epochs=2, checkpoint=False, callbacks=[ModelCheckpoint(dirpath=custom)])
    resumed.fit(resume="latest")
    assert (custom / "latest").read_text().strip() == "epoch=1-step=10"
    assert resumed.global_step == 10


def test_two_checkpoint_callbacks_keep_separate_records(tmp_path):
    every = ModelCheckpoint(every_n_steps=2, save_top_k=-1, dirpath=tmp_path / "steps")
    best = ModelCheckpoint(monitor="val_loss", save_top_k=1, save_last=False, dirpath=tmp_path / "best")
    make_trainer(tmp_path, max_epochs=1, checkpoint=False, callbacks=[every, best]).fit()
    assert [r["name"] for r in every.saved] == ["epoch=0-step=2", "epoch=0-step=4"]
    assert len(best.saved) == 1 and best.saved[0]["score"] is not None


@pytest.mark.parametrize("value", [True, "1", 0, -1.0])
def test_grad_clip_must_be_a_positive_number(tmp_path, value):
    with pytest.raises(ValueError, match="grad_clip must be a positive number, or None"):
        make_trainer(tmp_path, grad_clip=value)


def test_validating_other_data_does_not_replace_the_runs_own_validation(tmp_path):
    class ExtraValidation(Callback):
        def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
            if batch_idx == 8:  # the epoch's last batch: its own validation comes right after
                trainer.validate(TensorDataset(torch.randn(4, 6), torch.randint(0, 3, (4,))))

    recorder = Recorder()
    make_trainer(tmp_path, max_epochs=2, eval_every_n_steps=None, checkpoint=False,
                 callbacks=[ExtraValidation(), recorder]).fit()
    assert recorder.events.count("on_validation_end") == 4  # two extra, two of the run's own


def test_no_warning_on_a_healthy_run(tmp_path):
    """A normal run passes the fault checks (non-finite values, folders, lock) without a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_trainer(tmp_path, max_epochs=1).fit()
