"""EMA and StochasticWeightAveraging: their arithmetic, validation with the average, and exact resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from trainer_setup import ClassifierTrainer, datasets, make_trainer, model

from trainer import PartialState, Trainer
from trainer.callbacks import Callback, LearningRateMonitor
from trainer.callbacks.ema import EMA
from trainer.callbacks.swa import StochasticWeightAveraging


class Crash(Exception):
    pass


class SaveThenCrash(Callback):
    """Saves a checkpoint after batch ``batch`` of epoch ``epoch`` (or at that epoch's end), then fails."""

    def __init__(self, epoch, batch, path):
        self.epoch, self.batch, self.path = epoch, batch, path

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            self._crash(trainer)

    def on_train_epoch_end(self, trainer):
        if self.batch is None and trainer.current_epoch == self.epoch:
            self._crash(trainer)

    def _crash(self, trainer):
        trainer.save_checkpoint(self.path)
        raise Crash()


class WeightLog(Callback):
    """The model's weights after each optimizer step, and at the end of each epoch."""

    def __init__(self):
        self.steps, self.epochs, self.during_validation = {}, {}, []

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        if trainer.accelerator.sync_gradients:
            self.steps[trainer.global_step] = weights(trainer)

    def on_train_epoch_end(self, trainer):
        self.epochs[trainer.current_epoch] = weights(trainer)

    def on_validation_start(self, trainer):
        self.during_validation.append(weights(trainer))


def weights(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def assert_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def interrupted_then_resumed(tmp_path, make_callback, epoch, batch, **settings):
    """A run saved and stopped at (epoch, batch), resumed by a fresh Trainer; the resumed Trainer and its callback."""
    checkpoint = tmp_path / "ckpt"
    # The crashing callback comes first in the list: the averaging callbacks run first anyway.
    first = make_trainer(tmp_path / "first", callbacks=[SaveThenCrash(epoch, batch, checkpoint), make_callback()],
                         **settings)
    with pytest.raises(Crash):
        first.fit()
    PartialState._reset_state()
    callback = make_callback()
    resumed = make_trainer(tmp_path / "resumed", init_seed=99, callbacks=[callback], **settings)
    resumed.fit(resume=checkpoint)
    return resumed, callback


# -- EMA ---------------------------------------------------------------------------------------------
def new_ema():
    return EMA(decay=0.8, start_step=2, every_n_steps=2)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    ema, log = new_ema(), WeightLog()
    trainer = make_trainer(tmp_path_factory.mktemp("ema"), callbacks=[ema, log])
    trainer.fit()
    PartialState._reset_state()
    return trainer, ema, log


def test_ema_is_the_moving_average_of_the_due_steps(ema_run):
    trainer, ema, log = ema_run
    due = [step for step in sorted(log.steps) if step > 2 and step % 2 == 0]  # 4, 6, ..., 15 steps in all
    assert ema.num_updates == len(due) == 6
    expected = {name: value.clone() for name, value in log.steps[due[0]].items()}
    for step in due[1:]:
        for name in expected:
            expected[name] = 0.8 * expected[name] + 0.2 * log.steps[step][name]
    average = ema.averaged_state_dict()
    for name in expected:
        torch.testing.assert_close(average[name], expected[name], rtol=1e-6, atol=1e-7)
    assert_equal(weights(trainer), log.steps[trainer.global_step])  # the model keeps its own weights


def test_ema_validates_with_the_average_and_puts_the_weights_back(ema_run):
    trainer, ema, log = ema_run
    # Validations after steps 3, 6, 9, 12, 15 (and at epoch ends): from step 4 on the average is swapped in.
    assert len(log.during_validation) >= 5
    assert_equal(log.during_validation[0], log.steps[3])  # no average yet: the model as it is
    assert_equal(log.during_validation[-1], ema.averaged_state_dict())
    assert_equal(weights(trainer), log.steps[trainer.global_step])


@pytest.mark.parametrize(("epoch", "batch"), [(0, 7), (1, 4), (0, None)],
                         ids=["after-an-update", "inside-a-group", "at-an-epoch-end"])
def test_ema_resume_is_exact(tmp_path, ema_run, epoch, batch):
    straight, ema, _ = ema_run
    resumed, resumed_ema = interrupted_then_resumed(tmp_path, new_ema, epoch, batch)
    assert resumed_ema.num_updates == ema.num_updates
    assert_equal(resumed_ema.averaged_state_dict(), ema.averaged_state_dict())
    assert_equal(weights(resumed), weights(straight))
    assert resumed.metrics["val_loss"] == straight.metrics["val_loss"]  # validated with the same average


def test_ema_apply_at_end_and_copy_to(tmp_path):
    ema = EMA(decay=0.5, apply_at_end=True, use_for_validation=False)
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[ema])
    trainer.fit()
    assert_equal(weights(trainer), ema.averaged_state_dict())
    other = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 3))
    ema.copy_to(other)
    assert_equal(other.state_dict(), ema.averaged_state_dict())
    assert not ema.handles("on_validation_start")


def test_ema_before_its_first_update_says_so():
    with pytest.raises(RuntimeError, match="no average yet"):
        EMA().averaged_state_dict()


# -- StochasticWeightAveraging ----------------------------------------------------------------------
class SGDRegressor(Trainer):
    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)


def test_swa_anneals_the_rate_averages_epoch_ends_and_updates_batchnorm(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    x = torch.randn(32, 4)
    swa, log = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=3, annealing_epochs=2,
                                         annealing_strategy="linear"), WeightLog()
    trainer = SGDRegressor(model, train_data=TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8, shuffle=False,
                           max_epochs=6, output_dir=tmp_path, callbacks=[LearningRateMonitor(), swa, log],
                           progress_bar=False, checkpoint=False, trackers=[])
    trainer.fit()
    _, by_step = trainer.logged_since(0)
    lrs = [by_step[step]["lr-SGD"] for step in sorted(by_step)]  # the rate each step used, 4 steps an epoch
    assert lrs[11] == pytest.approx(0.1 * 0.9**11)  # before SWA: the Trainer's StepLR
    assert lrs[12:16] == pytest.approx([0.1 * 0.9**12] * 4)  # the first SWA epoch keeps the rate it started from
    assert lrs[16:20] == pytest.approx([(0.1 * 0.9**12 + 0.01) / 2] * 4)  # half way (linear, 2 epochs)
    assert lrs[20:24] == pytest.approx([0.01] * 4)
    assert int(swa.averaged_model.n_averaged) == 3
    model_weights = weights(trainer)
    for name, parameter in swa.averaged_model.module.named_parameters():
        mean = sum(log.epochs[epoch][name] for epoch in (3, 4, 5)) / 3
        torch.testing.assert_close(parameter, mean)
        assert torch.equal(model_weights[name], parameter.detach())  # the model ends with the average
    # update_bn: the statistics of the averaged model over the training data, in one pass.
    reference = swa.averaged_model.module
    torch.optim.swa_utils.update_bn([x[i:i + 8] for i in range(0, 32, 8)], reference)
    torch.testing.assert_close(model_weights["1.running_mean"], reference[1].running_mean)
    torch.testing.assert_close(model_weights["1.running_var"], reference[1].running_var)


def new_swa():
    return StochasticWeightAveraging(swa_lrs=0.005, swa_epoch_start=1, annealing_epochs=1)


@pytest.fixture(scope="module")
def swa_run(tmp_path_factory):
    swa = new_swa()
    trainer = make_trainer(tmp_path_factory.mktemp("swa"), callbacks=[swa])
    trainer.fit()
    PartialState._reset_state()
    return trainer, swa


@pytest.mark.parametrize(("epoch", "batch"), [(2, 4), (1, None)], ids=["inside-an-swa-epoch", "at-an-swa-epoch-end"])
def test_swa_resume_gives_the_same_average(tmp_path, swa_run, epoch, batch):
    straight, swa = swa_run
    resumed, resumed_swa = interrupted_then_resumed(tmp_path, new_swa, epoch, batch)
    assert_equal(resumed_swa.averaged_model.state_dict(), swa.averaged_model.state_dict())
    assert_equal(weights(resumed), weights(straight))
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


def test_swa_refuses_runs_that_never_average(tmp_path):
    with pytest.raises(ValueError, match="would never average"):
        make_trainer(tmp_path / "a", callbacks=[StochasticWeightAveraging(0.01, swa_epoch_start=3)]).fit()
    PartialState._reset_state()
    with pytest.raises(ValueError, match="give swa_epoch_start as an epoch number"):
        make_trainer(tmp_path / "b", max_steps=4, callbacks=[StochasticWeightAveraging(0.01)]).fit()
    PartialState._reset_state()
    with pytest.raises(ValueError, match="2 swa_lrs for an optimizer with 1 parameter groups"):
        make_trainer(tmp_path / "c", callbacks=[StochasticWeightAveraging([0.01, 0.02])]).fit()


@pytest.mark.parametrize(("build", "message"), [
    (lambda: EMA(decay=1.0), "decay=1.0"),
    (lambda: EMA(every_n_steps=0), "every_n_steps=0"),
    (lambda: EMA(start_step=-1), "start_step=-1"),
    (lambda: EMA(use_for_validation="yes"), "use_for_validation='yes'"),
    (lambda: StochasticWeightAveraging(swa_lrs=0), "swa_lrs=0"),
    (lambda: StochasticWeightAveraging(0.01, swa_epoch_start=1.5), "swa_epoch_start=1.5"),
    (lambda: StochasticWeightAveraging(0.01, annealing_epochs=-1), "annealing_epochs=-1"),
    (lambda: StochasticWeightAveraging(0.01, annealing_strategy="step"), "annealing_strategy='step'"),
])
def test_bad_arguments_are_one_clear_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_ema_leaves_out_a_skipped_non_finite_step(tmp_path):
    class NaNAtStep3(ClassifierTrainer):
        def training_step(self, batch):
            loss = super().training_step(batch)
            return loss * float("nan") if self.global_step == 2 else loss

    ema, log = EMA(decay=0.5), WeightLog()
    trainer = NaNAtStep3(model(), train_data=datasets()[0], batch_size=4, max_epochs=1, output_dir=tmp_path,
                         on_nonfinite="skip", callbacks=[ema, log], progress_bar=False, trackers=[], checkpoint=False)
    with pytest.warns(RuntimeWarning, match="At step 3 the training loss is nan; this step is skipped"):
        trainer.fit()
    assert trainer.global_step == 9 and ema.num_updates == 8
    expected = None
    for step, current in sorted(log.steps.items()):
        if step != 3:  # the skipped step changed no weight and is not folded in
            expected = current if expected is None else {k: torch.lerp(v, current[k], 0.5) for k, v in expected.items()}
    average = ema.averaged_state_dict()
    for name, value in expected.items():
        assert torch.equal(average[name], value), name
