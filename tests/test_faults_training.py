"""Fault catalogue: training that cannot succeed or learns nothing fails loud, and keeps what was saved.

Each case first saves a run's checkpoint in the output folder (a copy of one shared run), then
meets the fault: the error names the step, value, setting or data and the fix, and the saved
checkpoint still loads (``latest`` still names it).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fault_helpers import assert_resumable
from models import classification_data, mlp
from trainer_setup import ClassifierTrainer, make_trainer

from trainer import Accelerator
from trainer.callbacks import EarlyStopping, ModelCheckpoint
from trainer.nonfinite import NonFiniteLossError
from trainer.wrappers import NoGradientError


def latest_of(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


class PoisonedTrainer(ClassifierTrainer):
    """The loss turns to ``value`` from optimizer step ``at`` on."""

    value = math.nan
    at = 3

    def training_step(self, batch):
        loss = super().training_step(batch)
        return loss * self.value if self.global_step + 1 >= self.at else loss


def poisoned(out, value=math.nan, **overrides):
    from trainer_setup import datasets, model

    train, evaluation = datasets()
    trainer_class = type("Poisoned", (PoisonedTrainer,), {"value": value})
    settings = dict(train_data=train, eval_data=evaluation, batch_size=4, max_epochs=3, accumulate=2, output_dir=out,
                    seed=7, progress_bar=False, callbacks=[ModelCheckpoint(every_n_steps=2, save_top_k=1)])
    settings.update(overrides)
    return trainer_class(model(), **settings)


# -- non-finite losses ------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_loss_stops_the_run(run_dir, value):
    trainer = poisoned(run_dir, value)
    with pytest.raises(NonFiniteLossError, match=rf"At step 3 the training loss is {value}.*weights are still finite.*"
                                                 r"newest checkpoint with finite weights is .*epoch=0-step=2.*"
                                                 r"on_nonfinite='skip'"):
        trainer.fit()
    assert trainer.weights_are_finite() and trainer.global_step == 2
    assert_resumable(run_dir, "epoch=0-step=2")


def test_nonfinite_gradient_norm_stops_the_run(run_dir):
    class InfiniteGradient(ClassifierTrainer):
        def training_step(self, batch):  # a finite loss whose gradient is not: d/dx sqrt(x) at 0
            loss = super().training_step(batch)
            if self.global_step >= 1:
                loss = loss + torch.sqrt((self.model(batch[0]) * 0).sum())
            return loss

    from trainer_setup import datasets, model

    trainer = InfiniteGradient(model(), train_data=datasets()[0], batch_size=4, grad_clip=1.0, output_dir=run_dir,
                               progress_bar=False, checkpoint=False)
    with pytest.raises(NonFiniteLossError, match=r"At step 2 the gradient norm is nan.*on_nonfinite"):
        trainer.fit()
    assert trainer.weights_are_finite()
    assert_resumable(run_dir, "epoch=0-step=5")


def test_nonfinite_loss_skipped_on_request(run_dir):
    trainer = poisoned(run_dir, on_nonfinite="skip", max_epochs=1)
    with pytest.warns(RuntimeWarning, match=r"At step 3 the training loss is nan; this step is skipped"):
        trainer.fit()
    assert trainer.weights_are_finite() and trainer._nonfinite.skipped_steps == 3  # steps 3, 4 and 5
    assert trainer.global_step == 5 and math.isfinite(trainer.metrics["val_loss"])


def test_nonfinite_weights_never_become_latest(run_dir):
    trainer = poisoned(run_dir, on_nonfinite="warn", max_epochs=1)
    with pytest.warns(RuntimeWarning, match=r"At step 3 the training loss is nan; stepping anyway"):
        trainer.fit()
    assert not trainer.weights_are_finite()
    root = run_dir / "checkpoints"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    # save_top_k=1 would keep only step 4; the newest finite checkpoint (step 2) is kept too, and stays latest
    assert "epoch=0-step=2" in names and "epoch=0-step=4" in names
    assert latest_of(run_dir) == "epoch=0-step=2"
    assert_resumable(run_dir, "epoch=0-step=2")


def test_unknown_on_nonfinite_setting(run_dir):
    with pytest.raises(ValueError, match=r"on_nonfinite='raise' is not one of \['error', 'skip', 'warn'\]"):
        make_trainer(run_dir, on_nonfinite="raise")
    assert_resumable(run_dir, "epoch=0-step=5")


# -- runs that learn nothing ------------------------------------------------------------------------
def test_loss_not_connected_to_the_model(run_dir):
    class Detached(ClassifierTrainer):
        def training_step(self, batch):
            x, y = batch
            return F.cross_entropy(self.model(x).detach(), y)

    from trainer_setup import datasets, model

    trainer = Detached(model(), train_data=datasets()[0], batch_size=4, output_dir=run_dir, progress_bar=False)
    with pytest.raises(NoGradientError, match=r"does not depend on any parameter.*without \.detach\(\)"):
        trainer.fit()
    assert trainer.global_step == 0
    assert_resumable(run_dir, "epoch=0-step=5")


def test_loss_from_a_parameter_outside_the_model(run_dir):
    stray = torch.nn.Parameter(torch.ones(()))

    class Stray(ClassifierTrainer):
        def training_step(self, batch):
            return stray * 2.0

    from trainer_setup import datasets, model

    trainer = Stray(model(), train_data=datasets()[0], batch_size=4, output_dir=run_dir, progress_bar=False)
    with pytest.raises(NoGradientError, match=r"none of the optimizer's 4 parameters has a gradient.*backward\(\)"):
        trainer.fit()
    assert_resumable(run_dir, "epoch=0-step=5")


def test_optimizer_over_another_model(run_dir):
    from trainer_setup import datasets, model

    other = model(1)
    with pytest.raises(ValueError, match=r"AdamW being prepared holds 4 parameters and none of them belongs to the "
                                         r"prepared model.*0\.weight.*AdamW\(model\.parameters\(\)\)"):
        ClassifierTrainer(model(), optimizer=torch.optim.AdamW(other.parameters()), train_data=datasets()[0],
                          output_dir=run_dir, progress_bar=False)
    assert_resumable(run_dir, "epoch=0-step=5")


def test_accelerator_optimizer_over_a_stale_copy():
    accelerator = Accelerator(cpu=True)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model = mlp(1)  # rebuilt after the optimizer
    with pytest.raises(ValueError, match=r"SGD being prepared holds 4 parameters and none.*after creating that model"):
        accelerator.prepare(model, optimizer)


def test_accelerator_step_without_gradients():
    accelerator = Accelerator(cpu=True)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    x, _ = classification_data(4)
    with torch.no_grad():
        model(x).sum()
    with pytest.raises(NoGradientError, match=r"optimizer.step\(\): none of the optimizer's 4 parameters has a gradient"):
        optimizer.step()


# -- callbacks that can never act -------------------------------------------------------------------
@pytest.mark.parametrize("callback", [EarlyStopping(monitor="val_loss"), ModelCheckpoint(monitor="val_loss")],
                         ids=["early_stopping", "monitored_checkpoint"])
def test_callback_watching_validation_without_eval_data(run_dir, callback):
    trainer = make_trainer(run_dir, eval_data=None, callbacks=[callback])
    with pytest.raises(ValueError, match=r"monitor='val_loss'\) can never .*does not validate.*Pass eval_data"):
        trainer.fit()
    assert trainer.global_step == 0
    assert_resumable(run_dir, "epoch=0-step=5")


def test_early_stopping_without_a_validation_schedule(run_dir):
    trainer = make_trainer(run_dir, eval_every_n_steps=None, eval_every_n_epochs=None,
                           callbacks=[EarlyStopping(monitor="val_loss")])
    with pytest.raises(ValueError, match=r"eval_every_n_steps and eval_every_n_epochs are both None"):
        trainer.fit()
    assert trainer.global_step == 0
    assert_resumable(run_dir, "epoch=0-step=5")


def test_monitor_that_validation_never_logs(run_dir):
    trainer = make_trainer(run_dir, callbacks=[EarlyStopping(monitor="val_accuracy")])
    with pytest.raises(KeyError, match=r"monitors 'val_accuracy', which validation did not produce\. Did you mean "
                                       r"'val_acc'\?"):
        trainer.fit()
    assert trainer.global_step == 3  # the first validation
    assert_resumable(run_dir, "epoch=0-step=5")


# -- what the user's steps return ----------------------------------------------------------------
STEP_RESULTS = {
    "none": (lambda loss: None, TypeError, r"got NoneType \(did it forget to return the loss\?\)"),
    "float": (lambda loss: float(loss), TypeError, r"must return the loss tensor.*got float"),
    "vector": (lambda loss: loss.repeat(4), ValueError, r"loss of shape \(4,\).*loss\.mean\(\)"),
    "dict_without_loss": (lambda loss: {"total": loss}, ValueError, r"dict without 'loss' \(keys: \['total'\]\)"),
}


@pytest.mark.parametrize("case", list(STEP_RESULTS))
def test_training_step_result(run_dir, case):
    transform, error, message = STEP_RESULTS[case]

    class Returning(ClassifierTrainer):
        def training_step(self, batch):
            return transform(super().training_step(batch))

    from trainer_setup import datasets, model

    trainer = Returning(model(), train_data=datasets()[0], batch_size=4, output_dir=run_dir, progress_bar=False)
    with pytest.raises(error, match=r"training_step.*" + message if case != "vector" else message):
        trainer.fit()
    assert_resumable(run_dir, "epoch=0-step=5")


def test_default_step_with_a_model_that_does_not_take_the_batch(run_dir):
    from trainer_setup import datasets

    from trainer import Trainer

    trainer = Trainer(mlp(), train_data=datasets()[0], batch_size=4, output_dir=run_dir, progress_bar=False)
    with pytest.raises(TypeError, match=r"default training_step called Sequential\.forward with the batch's 2 "
                                        r"positional value\(s\).*define training_step\(self, batch\)"):
        trainer.fit()
    assert_resumable(run_dir, "epoch=0-step=5")


def test_empty_train_data(run_dir):
    from torch.utils.data import TensorDataset

    empty = TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"train_data is empty \(a TensorDataset of 0 samples\).*Pass a dataset"):
        make_trainer(run_dir, train_data=empty)
    assert_resumable(run_dir, "epoch=0-step=5")


def test_train_data_smaller_than_a_batch_with_drop_last(run_dir):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = classification_data(3)
    trainer = make_trainer(run_dir, train_data=DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True))
    with pytest.raises(ValueError, match=r"no batches \(3 samples, batch size 4, drop_last\).*drop_last=False"):
        trainer.fit()
    assert_resumable(run_dir, "epoch=0-step=5")


# -- Trainer arguments ----------------------------------------------------------------------------
BAD_ARGUMENTS = {
    "batch_size": ({"batch_size": 0}, ValueError, r"batch_size must be a whole number >= 1, got 0"),
    "max_epochs": ({"max_epochs": -1}, ValueError, r"max_epochs must be a whole number >= 0, or None; got -1"),
    "grad_clip": ({"grad_clip": -1.0}, ValueError, r"grad_clip must be a positive number, or None; got -1\.0"),
    "eval_every_n_steps": ({"eval_every_n_steps": 0}, ValueError, r"eval_every_n_steps must be a whole number >= 1"),
    "precision": ({"precision": "bf32"}, ValueError, r"Unknown precision 'bf32'; valid values: .*'bf16'"),
    "strategy": ({"strategy": "dpp"}, ValueError, r"dpp.*Did you mean 'ddp'"),
    "tracker": ({"trackers": ["mlfow"]}, ValueError, r"mlfow.*Did you mean 'mlflow'"),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_trainer_argument(run_dir, name):
    overrides, error, message = BAD_ARGUMENTS[name]
    with pytest.raises(error, match=message):
        make_trainer(run_dir, **overrides)
    assert_resumable(run_dir, "epoch=0-step=5")


def test_callback_event_misspelt(run_dir):
    from trainer.callbacks import Callback

    class Late(Callback):
        def on_train_epoch_ends(self, trainer):
            pass

    with pytest.raises(ValueError, match=r"on_train_epoch_ends is not a Trainer event.*Did you mean 'on_train_epoch_end'"):
        make_trainer(run_dir, callbacks=[Late()])
    assert_resumable(run_dir, "epoch=0-step=5")


def test_configure_optimizers_returning_the_wrong_thing(run_dir):
    class Wrong(ClassifierTrainer):
        def configure_optimizers(self):
            return "adamw"

    from trainer_setup import datasets, model

    with pytest.raises(TypeError, match=r"configure_optimizers must return an optimizer or \(optimizer, scheduler\), "
                                        r"got str"):
        Wrong(model(), train_data=datasets()[0], output_dir=run_dir, progress_bar=False)
    assert_resumable(run_dir, "epoch=0-step=5")


def test_resume_from_a_path_that_does_not_exist(run_dir):
    trainer = make_trainer(run_dir)
    with pytest.raises(FileNotFoundError, match=r"epoch=9-step=99.*accelerator\.json"):
        trainer.fit(resume=run_dir / "checkpoints" / "epoch=9-step=99")
    assert trainer.global_step == 0
    assert_resumable(run_dir, "epoch=0-step=5")


def test_fit_without_train_data(run_dir):
    trainer = make_trainer(run_dir, train_data=None)
    with pytest.raises(ValueError, match=r"fit\(\) needs train_data: pass it to the Trainer"):
        trainer.fit()
    assert_resumable(run_dir, "epoch=0-step=5")
