"""Gradient accumulation is exact: k micro-batches give the update of one k-times-larger batch."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from models import classification_data, max_abs_diff, mlp
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from strategies import SingleDevice
from trainer import Accelerator, GradientAccumulation

TOLERANCE = 1e-6


def reference_updates(x: torch.Tensor, y: torch.Tensor, groups: list[int], lr: float = 0.5) -> torch.nn.Module:
    """Plain PyTorch: one SGD step per group, each on the mean loss of the whole group."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    start = 0
    for size in groups:
        optimizer.zero_grad()
        F.cross_entropy(model(x[start:start + size]), y[start:start + size]).backward()
        optimizer.step()
        start += size
    return model


def accumulated_run(loader, steps: int, lr: float = 0.5):
    accelerator = Accelerator(gradient_accumulation_steps=steps)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    stepped = []
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))
            before = [p.detach().clone() for p in model.parameters()]
            optimizer.step()
            optimizer.zero_grad()
            stepped.append(not all(torch.equal(a, p) for a, p in zip(before, model.parameters())))
    return model, stepped


def test_k_micro_batches_equal_one_big_batch():
    x, y = classification_data(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model, stepped = accumulated_run(loader, steps=4)
    assert stepped == [False, False, False, True]
    assert max_abs_diff(model, reference_updates(x, y, [32])) <= TOLERANCE


def test_last_short_group_is_a_boundary_divided_by_its_own_size():
    # 5 batches of 8 with k=4: groups of 4 and 1 micro-batches.
    x, y = classification_data(40)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    model, stepped = accumulated_run(loader, steps=4)
    assert stepped == [False, False, False, True, True]
    reference = reference_updates(x, y, [32, 8])
    assert max_abs_diff(model, reference) <= TOLERANCE
    # Dividing the last group by k (=4) instead of its size would be visibly wrong.
    assert max_abs_diff(model, reference_updates(x, y, [32])) > 1e-3


class Stream(IterableDataset):
    """An iterable dataset: the loader has no length, the end is seen only when reached."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y)


def test_short_group_of_an_unsized_loader_is_rescaled_at_the_boundary():
    x, y = classification_data(48)
    loader = DataLoader(Stream(x, y), batch_size=8)  # 6 batches, k=4: groups of 4 and 2
    model, stepped = accumulated_run(loader, steps=4)
    assert stepped == [False, False, False, True, False, True]
    assert max_abs_diff(model, reference_updates(x, y, [32, 16])) <= TOLERANCE


def test_scheduler_and_zero_grad_act_only_on_boundaries():
    x, y = classification_data(64)
    accelerator = Accelerator(gradient_accumulation_steps=4)
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    model, optimizer, loader, scheduler = accelerator.prepare(
        model, optimizer, DataLoader(TensorDataset(x, y), batch_size=8), scheduler)
    grads_kept = []
    for xb, yb in loader:
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(xb), yb))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            grads_kept.append(model[0].weight.grad is not None)
    assert scheduler.scheduler.last_epoch == 2  # 8 micro-batches / 4
    assert scheduler.get_last_lr() == [0.1 * 0.25]
    assert grads_kept == [True, True, True, False] * 2


def test_zero_grad_clears_as_torch_does_keeps_profiler_annotation_and_calls_an_optimizers_own():
    class CountingSGD(torch.optim.SGD):
        calls = 0

        def zero_grad(self, set_to_none: bool = True) -> None:
            CountingSGD.calls += 1
            super().zero_grad(set_to_none=set_to_none)

    x, y = classification_data(16)

    def stepped(optimizer_class):
        accelerator = Accelerator()
        model = mlp()
        model, optimizer = accelerator.prepare(model, optimizer_class(model.parameters(), lr=0.1))
        accelerator.backward(F.cross_entropy(model(x), y))
        optimizer.step()
        return model, optimizer

    model, optimizer = stepped(torch.optim.SGD)
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    model, optimizer = stepped(torch.optim.SGD)
    optimizer.zero_grad(set_to_none=False)  # zeros kept, as torch keeps them
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    model, optimizer = stepped(torch.optim.SGD)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        optimizer.zero_grad()
    assert "Optimizer.zero_grad#SGD.zero_grad" in {event.name for event in profile.events()}
    assert all(p.grad is None for p in model.parameters())
    model, optimizer = stepped(CountingSGD)
    optimizer.zero_grad()
    assert CountingSGD.calls == 1 and all(p.grad is None for p in model.parameters())


def token_batches(seed: int = 3):
    """Four micro-batches of padded sequences holding very different numbers of real tokens."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [[5, 1], [2, 2], [7, 6], [1, 3]]
    batches = []
    for pair in lengths:
        tokens = torch.randn(2, 7, 6, generator=generator)
        labels = torch.randint(0, 3, (2, 7), generator=generator)
        mask = torch.zeros(2, 7, dtype=torch.bool)
        for row, length in enumerate(pair):
            mask[row, :length] = True
        batches.append((tokens, labels, mask))
    return batches


def summed_token_loss(model, tokens, labels, mask) -> torch.Tensor:
    return F.cross_entropy(model(tokens[mask]), labels[mask], reduction="sum")


def test_token_normalised_accumulation_equals_one_big_batch_with_unequal_lengths():
    batches = token_batches()
    lr = 0.5
    # One big batch: the mean loss over every real token of the four micro-batches.
    reference = mlp()
    optimizer = torch.optim.SGD(reference.parameters(), lr=lr)
    tokens = torch.cat([b[0][b[2]] for b in batches])
    labels = torch.cat([b[1][b[2]] for b in batches])
    F.cross_entropy(reference(tokens), labels).backward()
    optimizer.step()

    accelerator = Accelerator(gradient_accumulation_steps=4, accumulation_normalize="tokens")
    model = mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=lr))
    for batch in batches:
        with accelerator.accumulate(model):
            accelerator.backward(summed_token_loss(model, *batch), num_tokens=int(batch[2].sum()))
            optimizer.step()
            optimizer.zero_grad()
    assert max_abs_diff(model, reference) <= TOLERANCE

    # The default (mean of per-micro-batch means) gives a different update on the same data.
    mean_mode = Accelerator(gradient_accumulation_steps=4)
    other = mlp()
    other, other_opt = mean_mode.prepare(other, torch.optim.SGD(other.parameters(), lr=lr))
    for tokens_b, labels_b, mask in batches:
        with mean_mode.accumulate(other):
            mean_mode.backward(F.cross_entropy(other(tokens_b[mask]), labels_b[mask]))
            other_opt.step()
            other_opt.zero_grad()
    assert max_abs_diff(other, reference) > 1e-3


def test_token_normalised_clip_sees_the_normalised_gradient():
    batches = token_batches()
    accelerator = Accelerator(gradient_accumulation_steps=4, accumulation_normalize="tokens")
    model = mlp()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.5))
    norms = []
    for batch in batches:
        with accelerator.accumulate(model):
            accelerator.backward(summed_token_loss(model, *batch), num_tokens=torch.tensor(int(batch[2].sum())))
            norms.append(accelerator.clip_grad_norm_(model.parameters(), 1e9))
    assert norms[:3] == [None, None, None]
    reference = mlp()
    tokens = torch.cat([b[0][b[2]] for b in batches])
    labels = torch.cat([b[1][b[2]] for b in batches])
    F.cross_entropy(reference(tokens), labels).backward()
    expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e9)
    assert abs(norms[3].item() - expected.item()) <= TOLERANCE


def test_token_mode_requires_the_token_count():
    accelerator = Accelerator(gradient_accumulation_steps=2, accumulation_normalize="tokens")
    model = accelerator.prepare(mlp())
    loss = model(torch.randn(2, 6)).sum()
    with pytest.raises(ValueError, match="num_tokens=n"):
        accelerator.backward(loss)


def test_token_count_outside_token_mode_is_an_error():
    accelerator = Accelerator(gradient_accumulation_steps=2)
    model = accelerator.prepare(mlp())
    with pytest.raises(ValueError, match="accumulation_normalize='tokens'"):
        accelerator.backward(model(torch.randn(2, 6)).sum(), num_tokens=4)


@pytest.mark.parametrize("steps", [0, -1, 1.5, True])
def test_bad_accumulation_steps(steps):
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be a whole number >= 1"):
        Accelerator(gradient_accumulation_steps=steps)


def test_bad_normalisation_name():
    with pytest.raises(ValueError, match=r"normalize='token' is not one of \['mean', 'tokens'\]"):
        Accelerator(gradient_accumulation_steps=2, accumulation_normalize="token")


class RecordingSingleDevice(SingleDevice):
    """A real SingleDevice strategy that also notes when the loop asked it not to synchronise."""

    def __init__(self) -> None:
        super().__init__()
        self.no_sync_steps: list[int] = []
        self.backward_calls = 0

    def backward(self, loss, module=None, **kwargs):
        self.backward_calls += 1
        super().backward(loss, module, **kwargs)

    @contextmanager
    def no_backward_sync(self, module, enabled=True):
        self.no_sync_steps.append(self.backward_calls)
        yield


@pytest.mark.parametrize("sync_each_batch, expected", [(False, [0, 1, 3, 4]), (True, [])])
def test_micro_steps_skip_gradient_sync_except_on_boundaries(sync_each_batch, expected):
    strategy = RecordingSingleDevice()
    policy = GradientAccumulation(3, sync_each_batch=sync_each_batch)
    accelerator = Accelerator(strategy=strategy, gradient_accumulation_plugin=policy)
    model = mlp()
    model, optimizer, loader = accelerator.prepare(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(TensorDataset(*classification_data(48)), batch_size=8))
    for x, y in loader:
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))
            optimizer.step()
            optimizer.zero_grad()
    # Six micro-batches, groups of three: backward calls 0, 1 and 3, 4 run without synchronising.
    assert strategy.no_sync_steps == expected


def test_groups_may_run_across_epochs_without_sync_with_dataloader():
    policy = GradientAccumulation(4, sync_with_dataloader=False)
    accelerator = Accelerator(gradient_accumulation_plugin=policy)
    model = mlp()
    model, optimizer, loader = accelerator.prepare(
        model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(TensorDataset(*classification_data(40)), batch_size=8))
    boundaries = []
    for _ in range(2):  # 5 batches per epoch: groups of four run over the epoch's end
        for x, y in loader:
            with accelerator.accumulate(model):
                accelerator.backward(F.cross_entropy(model(x), y))
                boundaries.append(accelerator.sync_gradients)
    assert boundaries == [False, False, False, True] * 2 + [False, False]
