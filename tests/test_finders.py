"""BatchSizeFinder, LearningRateFinder, their function forms, and the batch-size search they share with
find_executable_batch_size.

On the CPU nothing runs out of memory by itself: the models here raise torch.OutOfMemoryError (the
error a device raises, of its real type) on batches larger than they "fit", inside their forward.
"""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainer import Trainer
from trainer.callbacks.batch_size_finder import BatchSizeFinder
from trainer.callbacks.lr_finder import LearningRateFinder
from trainer.tuning import lr_find, scale_batch_size
from trainer.utils import find_executable_batch_size, should_reduce_batch_size
from trainer.utils.memory import BatchSizeSearch, search_batch_size

SAMPLES = 64


class MemoryBound(nn.Module):
    """A small classifier that runs out of memory, as a device does, on batches of more than ``fits`` samples."""

    def __init__(self, fits: int = 10**6) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3))
        self.fits = fits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.fits:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0] * 2} MiB")
        return self.net(x)


class Classifier(Trainer):
    def __init__(self, model: nn.Module, lr: float = 1e-2, **settings) -> None:
        self.lr = lr
        super().__init__(model, **settings)

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + 0.1 * step))


def classification_data(samples: int = SAMPLES) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(samples, 6, generator=generator), torch.randint(0, 3, (samples,), generator=generator))


def classifier(tmp_path, fits: int = 10**6, callbacks=(), samples: int = SAMPLES, **overrides) -> Classifier:
    settings = dict(train_data=classification_data(samples), batch_size=8, max_epochs=2, accumulate=2, grad_clip=1.0,
                    output_dir=tmp_path, seed=7, callbacks=list(callbacks), progress_bar=False, checkpoint=False,
                    trackers=[])
    settings.update(overrides)
    return Classifier(MemoryBound(fits), **settings)


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in trainer.model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a), "the weights differ"


# -- the search shared with find_executable_batch_size --------------------------------------------------------------
def run_search(mode: str, fits: int, start: int = 2, **options) -> BatchSizeSearch:
    """The sizes the search proposes when every size up to ``fits`` fits (its decisions alone: no training)."""
    search = BatchSizeSearch(start, mode, **options)
    while not search.done:
        search.record(search.value <= fits)
    return search


def test_the_search_grows_then_stops_or_bisects_at_the_first_out_of_memory():
    power = run_search("power", fits=40)
    assert [size for size, _ in power.tried] == [2, 4, 8, 16, 32, 64] and power.best == 32
    bisect = run_search("binsearch", fits=40)
    assert [size for size, _ in bisect.tried] == [2, 4, 8, 16, 32, 64, 48, 40, 44, 42, 41] and bisect.best == 40
    capped = run_search("power", fits=10**6, max_value=50)
    assert [size for size, _ in capped.tried] == [2, 4, 8, 16, 32, 50] and capped.best == 50
    halved = run_search("power", fits=5, start=32)  # even the first size fails: halve until one fits
    assert [size for size, _ in halved.tried] == [32, 16, 8, 4] and halved.best == 4
    short = run_search("binsearch", fits=40, max_trials=7)  # tries run out: the largest that fit
    assert len(short.tried) == 7 and short.best == 32
    shrink = run_search("shrink", fits=40, start=128)  # find_executable_batch_size's 0.9 steps
    assert [size for size, _ in shrink.tried] == [128, 115, 103, 92, 82, 73, 65, 58, 52, 46, 41, 36]


def test_search_batch_size_tries_until_one_fits_and_only_out_of_memory_counts_as_too_large():
    def attempt(size: int) -> int:
        if size > 1:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return size

    assert search_batch_size(BatchSizeSearch(4, "power"), attempt) == 1  # 4, 2 out of memory
    with pytest.raises(RuntimeError, match=r"reached zero\. Sizes tried: 2 out of memory, 1 out of memory\."):
        search_batch_size(BatchSizeSearch(2, "power"), lambda size: attempt(size + 1))

    def broken(size: int) -> int:
        raise ValueError("not about memory")

    with pytest.raises(ValueError, match="not about memory"):
        search_batch_size(BatchSizeSearch(2, "power"), broken)


def test_find_executable_batch_size_recognises_the_device_out_of_memory_error_the_finder_recognises():
    assert should_reduce_batch_size(torch.OutOfMemoryError("CUDA out of memory."))
    assert not should_reduce_batch_size(ValueError("out of range"))
    tried = []

    @find_executable_batch_size(starting_batch_size=64)
    def train(batch_size):
        tried.append(batch_size)
        if batch_size > 51:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        return batch_size

    assert train() == 51 and tried == [64, 57, 51]
    assert train() == 51 and tried[-1] == 51  # the next call starts from the size that worked


# -- BatchSizeFinder -----------------------------------------------------------------------------------------------------
def test_batch_size_finder_trains_with_the_size_found_and_leaves_no_trace(tmp_path, capsys):
    finder = BatchSizeFinder(mode="binsearch")
    found = classifier(tmp_path / "a", fits=24, callbacks=[finder])
    found.fit()
    assert finder.batch_size == 24 and found.train_loader.batch_size == 24
    assert [size for size, _ in finder.search.tried] == [2, 4, 8, 16, 32, 24, 28, 26, 25]
    assert found.metrics["batch_size_finder/batch_size"] == 24 and found.run_config()["batch_size"] == 24
    assert ("BatchSizeFinder: training with batch size 24 (tried 2 ok, 4 ok, 8 ok, 16 ok, 32 out of memory, 24 ok, "
            "28 out of memory, 26 out of memory, 25 out of memory).") in capsys.readouterr().out
    # The same run, told the size: the search changed nothing (weights, optimizer, scheduler, dropout, shuffle).
    told = classifier(tmp_path / "b", fits=24, batch_size=24)
    told.fit()
    assert_same(weights(found), weights(told))
    assert found.global_step == told.global_step == 4  # 3 batches an epoch, in groups of 2 and 1


def test_power_mode_max_val_and_the_dataset_length_bound_the_growth(tmp_path):
    trainer = classifier(tmp_path / "a", fits=24)
    assert scale_batch_size(trainer) == 16  # power: 32 ran out of memory
    capped = BatchSizeFinder(max_val=12)
    assert capped.scale_batch_size(classifier(tmp_path / "b")) == 12
    assert [size for size, _ in capped.search.tried] == [2, 4, 8, 12]
    short = BatchSizeFinder(init_val=4)
    assert short.scale_batch_size(classifier(tmp_path / "c", samples=20)) == 20  # 4, 8, 16, then the 20 samples


def test_when_no_batch_size_fits_the_run_stops_with_everything_as_it_was(tmp_path):
    trainer = classifier(tmp_path, fits=0, callbacks=[BatchSizeFinder()])
    before = weights(trainer)
    with pytest.raises(RuntimeError, match="No executable batch size found, reached zero. Sizes tried: 2 out of "
                                           "memory, 1 out of memory."):
        trainer.fit()
    assert trainer.train_loader.batch_size == 8 and trainer.global_step == 0
    assert_same(weights(trainer), before)


def test_a_resumed_run_trains_with_the_size_its_checkpoint_holds(tmp_path):
    from trainer.callbacks import ModelCheckpoint

    first = classifier(tmp_path, fits=24, max_epochs=1, checkpoint=True,
                       callbacks=[BatchSizeFinder(mode="binsearch"), ModelCheckpoint(every_n_epochs=1)])
    first.fit()
    again = BatchSizeFinder(mode="binsearch")
    resumed = classifier(tmp_path, fits=24, max_epochs=2, checkpoint=True,
                         callbacks=[again, ModelCheckpoint(every_n_epochs=1)])
    resumed.fit(resume="latest")
    assert again.search is None and again.batch_size == 24 and resumed.train_loader.batch_size == 24


@pytest.mark.parametrize(("arguments", "message"), [
    ({"mode": "linear"}, r"mode='linear'\): use one of \['power', 'binsearch'\]"),
    ({"init_val": 0}, r"init_val=0\): use a whole number >= 1"),
    ({"steps_per_trial": 1.5}, r"steps_per_trial=1.5\): use a whole number >= 1"),
    ({"init_val": 8, "max_val": 4}, r"max_val=4\): use a whole number >= init_val \(8\), or None"),
])
def test_batch_size_finder_refuses_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        BatchSizeFinder(**arguments)


def test_batch_size_finder_refuses_what_it_cannot_search(tmp_path):
    data = classification_data()
    given_loader = classifier(tmp_path, train_data=DataLoader(data, batch_size=8), callbacks=[BatchSizeFinder()])
    before = weights(given_loader)
    with pytest.raises(ValueError, match="train_data is a DataLoader"):
        given_loader.fit()
    assert_same(weights(given_loader), before)

    class TwoProcesses:
        class accelerator:  # noqa: N801 - what check_fit reads of a trainer with two processes
            num_processes = 2

    with pytest.raises(ValueError, match="searches in one process and this run has 2"):
        BatchSizeFinder().check_fit(TwoProcesses())


# -- LearningRateFinder --------------------------------------------------------------------------------------------------
class Regression(Trainer):
    """Least squares on features whose loss has the identity as Hessian: a step of SGD with learning rate
    lr multiplies the loss by (1 - lr)**2, so where the loss falls fastest is known in closed form."""

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.model(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1)


def regression(tmp_path, **overrides) -> Regression:
    hadamard = torch.tensor([[1.0, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    x = torch.cat([hadamard, hadamard]) / 2**0.5  # x.T @ x / 8 = I / 2: the mean squared error's Hessian is I
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    torch.manual_seed(0)
    settings = dict(train_data=TensorDataset(x, y), batch_size=8, output_dir=tmp_path, progress_bar=False,
                    checkpoint=False, trackers=[])
    settings.update(overrides)
    return Regression(nn.Linear(4, 1, bias=False), **settings)


def test_the_suggestion_lies_where_the_loss_falls_fastest_and_the_weights_are_untouched(tmp_path, capsys):
    from PIL import Image

    trainer = regression(tmp_path)
    before = weights(trainer)
    result = lr_find(trainer, min_lr=3e-3, max_lr=10.0, num_training_steps=100)
    lrs, raw = np.array(result.lrs), np.array(result.raw_losses)
    assert len(lrs) == 100 and not result.diverged
    # Each step multiplied the loss by (1 - lr)**2: the test trained with the learning rates it reports.
    assert np.allclose(raw[1:50], raw[:49] * (1 - lrs[:49]) ** 2, rtol=1e-4)
    drop = raw[:-1] - raw[1:]  # how much each step lowered the loss
    fastest = lrs[:-1][drop >= drop.max() / 2]
    suggestion = trainer.metrics["lr_find/suggestion"]
    assert suggestion == result.suggestion() and fastest.min() <= suggestion <= fastest.max()
    assert (fastest.min(), suggestion, fastest.max()) == pytest.approx((0.0103, 0.0795, 0.1017), rel=1e-2)
    assert_same(weights(trainer), before)
    assert trainer.optimizer.param_groups[0]["lr"] == suggestion  # update_attr
    with Image.open(tmp_path / "lr_find.png") as image:
        assert image.format == "PNG" and image.size == (600, 400)
    assert capsys.readouterr().out == (f"LearningRateFinder: 100 steps from 0.003 to 10; suggested learning rate: "
                                       f"{suggestion:.3g} (the optimizer now uses it); curve: {tmp_path / 'lr_find.png'}.\n")


def test_the_test_stops_when_the_loss_diverges(tmp_path):
    result = lr_find(regression(tmp_path), min_lr=1e-2, max_lr=1e3, num_training_steps=60, update_attr=False,
                     plot_path=tmp_path / "curves" / "diverged.png")
    assert result.diverged and len(result.lrs) < 60
    assert result.losses[-1] > 4 * min(result.losses[:-1])
    assert (tmp_path / "curves" / "diverged.png").is_file()


def test_the_search_restores_model_optimizer_scheduler_and_random_states_exactly(tmp_path):
    trainer = classifier(tmp_path, accumulate=1)
    before = weights(trainer)
    optimizer, scheduler = trainer.optimizer.state_dict(), trainer.scheduler.state_dict()
    rng = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    lr_find(trainer, num_training_steps=20, update_attr=False, plot_path=False)
    assert_same(weights(trainer), before)
    assert trainer.optimizer.state_dict() == optimizer and trainer.scheduler.state_dict() == scheduler
    assert torch.equal(torch.get_rng_state(), rng[0]) and np.array_equal(np.random.get_state()[1], rng[1])
    assert random.getstate() == rng[2]
    assert all(p.grad is None for p in trainer.model.parameters())
    assert list(trainer.metrics) == ["lr_find/suggestion"]  # what the search's steps logged is gone

    found = lr_find(trainer, num_training_steps=20, plot_path=False).suggestion()  # update_attr with a schedule
    inner = trainer.scheduler.scheduler
    assert inner.base_lrs == [found] and trainer.optimizer.param_groups[0]["initial_lr"] == found


def test_fit_with_the_finder_equals_fit_with_the_suggested_learning_rate(tmp_path):
    finder = LearningRateFinder(num_training_steps=20, plot_path=False)
    tuned = classifier(tmp_path / "a", callbacks=[finder], accumulate=1)
    tuned.fit()
    assert finder.suggested_lr is not None and tuned.metrics["lr_find/suggestion"] == finder.suggested_lr
    told = classifier(tmp_path / "b", lr=finder.suggested_lr, accumulate=1)
    told.fit()
    assert_same(weights(tuned), weights(told))


def test_without_matplotlib_the_finder_refuses_before_training_unless_asked_for_no_plot(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    trainer = regression(tmp_path, callbacks=[LearningRateFinder(num_training_steps=20)])
    before = weights(trainer)
    with pytest.raises(ImportError, match=r"needs matplotlib: pip install matplotlib \(or pass plot_path=False\)"):
        trainer.fit()
    assert_same(weights(trainer), before)
    result = lr_find(regression(tmp_path), num_training_steps=20, plot_path=False)
    assert len(result.lrs) == 20 and not (tmp_path / "lr_find.png").exists()


def test_a_resumed_run_keeps_the_learning_rate_its_checkpoint_holds_without_testing_again(tmp_path):
    from trainer.callbacks import ModelCheckpoint

    first = LearningRateFinder(num_training_steps=20, plot_path=False)
    regression(tmp_path, max_epochs=1, checkpoint=True, callbacks=[first, ModelCheckpoint(every_n_epochs=1)]).fit()
    again = LearningRateFinder(num_training_steps=20, plot_path=False)
    resumed = regression(tmp_path, max_epochs=2, checkpoint=True, callbacks=[again, ModelCheckpoint(every_n_epochs=1)])
    resumed.fit(resume="latest")
    assert again.result is None and resumed.optimizer.param_groups[0]["lr"] == first.suggested_lr != 0.1


@pytest.mark.parametrize(("arguments", "message"), [
    ({"mode": "cosine"}, r"mode='cosine'\): use one of \['exponential', 'linear'\]"),
    ({"min_lr": 0.0}, r"use 0 < min_lr < max_lr \(min_lr may be 0 with mode='linear'\)"),
    ({"min_lr": 1.0, "max_lr": 0.1}, r"min_lr=1.0, max_lr=0.1\)"),
    ({"num_training_steps": 2}, r"num_training_steps=2\): use a whole number >= 3"),
    ({"early_stop_threshold": 1.0}, r"early_stop_threshold=1.0\): use a number > 1"),
    ({"plot_path": 3}, r"plot_path=3\): use a file path, None"),
])
def test_learning_rate_finder_refuses_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        LearningRateFinder(**arguments)


def test_linear_mode_spaces_the_learning_rates_evenly():
    assert LearningRateFinder(min_lr=0.0, max_lr=1.0, num_training_steps=5, mode="linear").learning_rates() == [
        0.0, 0.25, 0.5, 0.75, 1.0]
    assert LearningRateFinder(min_lr=1e-3, max_lr=10.0, num_training_steps=5).learning_rates() == pytest.approx(
        [1e-3, 1e-2, 1e-1, 1.0, 10.0], rel=1e-12)
