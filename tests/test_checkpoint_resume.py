"""save_state -> load_state -> continue is bit-identical to never stopping; saves are safe."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from models import classification_data, mlp, same_weights
from torch.utils.data import DataLoader, TensorDataset

from trainer import Accelerator, PartialState, set_seed
from trainer.checkpoint_io import join_state, split_state

EPOCHS, BATCHES_PER_EPOCH, STOP_AT = 3, 10, (1, 6)  # stop after 6 batches of epoch 1


def build(seed: int, precision: str = "no", project_dir=None):
    set_seed(seed)
    accelerator = Accelerator(gradient_accumulation_steps=2, mixed_precision=precision, project_dir=project_dir)
    model = mlp(seed=seed, dropout=0.3)  # dropout: the RNG state matters
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    x, y = classification_data(BATCHES_PER_EPOCH * 4)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    return accelerator, *accelerator.prepare(model, optimizer, loader, scheduler)


def train_batches(accelerator, model, optimizer, loader, scheduler, batches):
    for x, y in batches:
        with accelerator.accumulate(model):
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 0.5)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()


def uninterrupted(precision: str = "no"):
    accelerator, model, optimizer, loader, scheduler = build(0, precision)
    for _ in range(EPOCHS):
        train_batches(accelerator, model, optimizer, loader, scheduler, loader)
    return model, optimizer


def interrupted(tmp_path, precision: str = "no", batches: int = STOP_AT[1]):
    accelerator, model, optimizer, loader, scheduler = build(0, precision)
    epoch = STOP_AT[0]
    for _ in range(epoch):
        train_batches(accelerator, model, optimizer, loader, scheduler, loader)
    train_batches(accelerator, model, optimizer, loader, scheduler, _take(loader, batches))
    accelerator.save_state(tmp_path / "ckpt")

    # What a new process does: everything rebuilt from other seeds, then the state loaded.
    PartialState._reset_state()
    accelerator, model, optimizer, loader, scheduler = build(123, precision)
    assert not same_weights(model, mlp(seed=0, dropout=0.3))
    accelerator.load_state(tmp_path / "ckpt")
    assert loader.iteration == epoch
    train_batches(accelerator, model, optimizer, loader, scheduler, accelerator.skip_first_batches(loader, batches))
    for _ in range(epoch + 1, EPOCHS):
        train_batches(accelerator, model, optimizer, loader, scheduler, loader)
    return model, optimizer


def _take(loader, count):
    for index, batch in enumerate(loader):
        yield batch
        if index + 1 == count:
            return


@pytest.mark.parametrize("precision, batches", [("no", 6), ("fp16", 6), ("bf16", 6), ("no", 5), ("fp16", 5)])
def test_resume_is_bit_identical_to_never_stopping(tmp_path, precision, batches):
    """Saved at an accumulation boundary (6 batches, k=2) or inside a group (5): the same weights."""
    straight_model, straight_optimizer = uninterrupted(precision)
    resumed_model, resumed_optimizer = interrupted(tmp_path, precision, batches)
    assert same_weights(straight_model, resumed_model)
    a, b = straight_optimizer.state_dict(), resumed_optimizer.state_dict()
    for key in a["state"]:
        for name, value in a["state"][key].items():
            assert torch.equal(value, b["state"][key][name]), (key, name)


def test_checkpoint_files_are_safetensors_and_json(tmp_path):
    accelerator, model, optimizer, loader, scheduler = build(0, "fp16")
    train_batches(accelerator, model, optimizer, loader, scheduler, loader)
    path = accelerator.save_state(tmp_path / "ckpt")
    names = sorted(p.name for p in path.iterdir())
    assert names == ["accelerator.json", "dataloader.json", "manifest.json", "model.safetensors", "optimizer.json",
                     "optimizer.safetensors", "precision.json", "random_states_0.json",
                     "random_states_0.safetensors", "scheduler.json"]
    info = json.loads((path / "accelerator.json").read_text())
    assert info["counts"] == {"models": 1, "optimizers": 1, "schedulers": 1, "dataloaders": 1, "custom_objects": 0}
    assert info["mixed_precision"] == "fp16"
    assert json.loads((path / "precision.json").read_text())["scaler"]["scale"] == accelerator.scaler.get_scale()
    assert sorted(q.name for q in tmp_path.iterdir()) == ["ckpt"]  # no scratch directory left


class Counter:
    def __init__(self, fail: bool = False) -> None:
        self.count, self.fail = 0, fail

    def state_dict(self):
        if self.fail:
            raise RuntimeError("disk full")
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    accelerator, model, *_ = build(0)
    counter = Counter()
    accelerator.register_for_checkpointing(counter)
    counter.count = 7
    path = accelerator.save_state(tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    counter.fail = True
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        accelerator.save_state(tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["ckpt"]
    counter.fail, counter.count = False, 0
    accelerator.load_state(path)
    assert counter.count == 7


def test_state_that_would_need_pickle_is_refused(tmp_path):
    accelerator, *_ = build(0)

    class Holder:
        def state_dict(self):
            return {"callback": print}

        def load_state_dict(self, state):
            pass

    accelerator.register_for_checkpointing(Holder())
    with pytest.raises(TypeError, match=r"Cannot store a builtin_function_or_method at callback.*nothing is pickled"):
        accelerator.save_state(tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    assert list(tmp_path.iterdir()) == []


def test_register_for_checkpointing_needs_state_dict():
    accelerator = Accelerator()
    with pytest.raises(TypeError, match="has no state_dict"):
        accelerator.register_for_checkpointing(object())


def test_loading_into_a_different_setup_is_one_clear_error(tmp_path):
    accelerator, *_ = build(0)
    accelerator.save_state(tmp_path / "ckpt")
    PartialState._reset_state()
    other = Accelerator()
    other.prepare(mlp())
    with pytest.raises(ValueError, match=r"holds .*'optimizers': 1.* but this Accelerator has prepared .*'optimizers': 0"):
        other.load_state(tmp_path / "ckpt")


def test_loading_into_a_different_model_names_the_keys(tmp_path):
    accelerator, *_ = build(0)
    accelerator.save_state(tmp_path / "ckpt")
    PartialState._reset_state()
    other = Accelerator(gradient_accumulation_steps=2)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))  # no dropout
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    x, y = classification_data(8)
    other.prepare(model, optimizer, DataLoader(TensorDataset(x, y)), scheduler)
    with pytest.raises(RuntimeError, match=r"missing keys \['2.bias', '2.weight'\], unexpected keys \['3.bias', '3.weight'\]"):
        other.load_state(tmp_path / "ckpt")


def test_loading_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no accelerator.json"):
        Accelerator().load_state(tmp_path)


def test_numbered_checkpoints_in_project_dir(tmp_path):
    accelerator, model, *_ = build(0, project_dir=tmp_path)
    first = accelerator.save_state()
    with torch.no_grad():
        model[0].weight.zero_()
    second = accelerator.save_state()
    assert (first.name, second.name) == ("checkpoint_0", "checkpoint_1")
    with torch.no_grad():
        model[0].weight.fill_(3.0)
    assert accelerator.load_state() == second
    assert torch.count_nonzero(model[0].weight) == 0


def test_save_state_without_a_directory_or_project_dir():
    with pytest.raises(ValueError, match="pass one, or create the Accelerator with project_dir="):
        Accelerator().save_state()


def test_split_and_join_round_trip_of_awkward_state():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(2)}},
             "param_groups": [{"betas": (0.9, 0.999), "params": [0], "eps": math.inf, "name": None}],
             "nested": [[1, 2.5, "x", True]]}
    skeleton, tensors = split_state(state)
    json.dumps(skeleton)  # JSON-ready
    restored = join_state(json.loads(json.dumps(skeleton)), tensors)
    assert restored["state"][0]["exp_avg"].tolist() == [1.0, 1.0]
    assert restored["param_groups"] == state["param_groups"]
    assert restored["nested"] == state["nested"]


class RunsCode:
    """Unpickling this object writes a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_checkpoint_holding_a_pickle_is_refused_and_nothing_runs(tmp_path):
    import pickle

    accelerator, *_ = build(0)
    path = accelerator.save_state(tmp_path / "ckpt")
    marker = tmp_path / "code-ran"
    (path / "extra_state.pkl").write_bytes(pickle.dumps(RunsCode(str(marker))))
    with pytest.raises(ValueError, match=r"Refusing to load .*\['extra_state.pkl'\], which are neither JSON nor safetensors"):
        accelerator.load_state(path)
    assert not marker.exists()
