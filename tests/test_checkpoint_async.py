"""Asynchronous checkpoints: ``save_state(blocking=False)`` and ``ModelCheckpoint(async_save=True)``.

The state is copied when the save is asked for; a background thread writes it while training goes
on. What it writes is byte for byte what a synchronous save of the same moment writes, a resume
from it is exact, and its failures reach the training thread at the next wait. (Saves killed
part-way through on the writer's thread are in ``test_faults_checkpoint.py``.)
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from fault_helpers import assert_still_loads, prepared, train_steps
from trainer_setup import make_trainer

from trainer import PartialState
from trainer.callbacks import ModelCheckpoint
from trainer.checkpoint_errors import CheckpointWriteError
from trainer.checkpoint_state import find_latest


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hold_writer(accelerator) -> threading.Event:
    """Keep the accelerator's writer thread busy until the returned event is set (a queued save then waits)."""
    gate = threading.Event()
    writer = accelerator.checkpoint_writer
    writer._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
    writer._executor.submit(gate.wait)
    return gate


def weights(accelerator, model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in accelerator.unwrap_model(model).state_dict().items()}


def test_an_async_save_writes_the_state_of_its_moment_byte_for_byte_while_training_goes_on(tmp_path):
    parts = prepared(seed=1)
    accelerator, model = parts[0], parts[1]
    train_steps(*parts, steps=2)
    iteration = accelerator.save_iteration
    accelerator.save_state(tmp_path / "sync")
    at_save = weights(accelerator, model)
    accelerator.save_iteration = iteration  # the same moment, recorded the same way
    gate = hold_writer(accelerator)
    accelerator.save_state(tmp_path / "async", blocking=False)
    assert not (tmp_path / "async").exists()  # returned before anything was written
    train_steps(*parts, steps=2)  # weights, optimizer and RNG move on while the write waits
    assert not all(torch.equal(value, at_save[name]) for name, value in weights(accelerator, model).items())
    gate.set()
    accelerator.wait_for_checkpoint()
    assert files_of(tmp_path / "async") == files_of(tmp_path / "sync")
    assert_still_loads(tmp_path / "async", at_save)


def test_tied_weights_are_stored_once_in_an_async_save_as_in_a_sync_one(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from trainer import Accelerator

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    accelerator = Accelerator(cpu=True)
    model, _ = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                   DataLoader(TensorDataset(torch.arange(4)), batch_size=2))[:2]
    accelerator.save_state(tmp_path / "sync")
    accelerator.save_iteration -= 1
    accelerator.save_state(tmp_path / "async", blocking=False)
    accelerator.wait_for_checkpoint()
    assert files_of(tmp_path / "async") == files_of(tmp_path / "sync")


def test_the_next_save_and_load_wait_for_the_pending_one(tmp_path):
    parts = prepared(seed=2)
    accelerator = parts[0]
    gate = hold_writer(accelerator)
    accelerator.save_state(tmp_path / "a", blocking=False)
    assert accelerator.checkpoint_writer.pending
    threading.Timer(0.2, gate.set).start()
    accelerator.save_state(tmp_path / "b")  # waits for "a" to be in place first
    assert (tmp_path / "a" / "accelerator.json").is_file() and not accelerator.checkpoint_writer.pending
    accelerator.save_state(tmp_path / "c", blocking=False)
    accelerator.load_state(tmp_path / "c")  # reads the finished checkpoint
    assert files_of(tmp_path / "c").keys() == files_of(tmp_path / "a").keys()


def test_a_disk_that_fills_up_during_an_async_write_fails_at_the_next_wait_and_keeps_the_previous_checkpoint(small_disk):
    mount, path, saved = small_disk
    accelerator, *_ = prepared(seed=3)
    gate = hold_writer(accelerator)
    accelerator.save_state(path, blocking=False)  # the space is there when the save is asked for...
    filler = mount / "filler"
    with open(filler, "wb") as file:  # ...and gone by the time the writer runs
        try:
            while True:
                file.write(b"\0" * 65536)
                file.flush()
        except OSError:
            pass
    gate.set()
    with pytest.raises(CheckpointWriteError, match=rf"No space left to save the checkpoint {path}: the disk filled up "
                                                   r"while it was written.*previous checkpoint there is untouched"):
        accelerator.wait_for_checkpoint()
    accelerator.wait_for_checkpoint()  # the error is raised once
    os.remove(filler)
    assert sorted(p.name for p in mount.iterdir()) == ["ckpt", "latest"]  # no scratch folder left
    assert find_latest(mount) == path
    assert_still_loads(path, saved)


def test_async_model_checkpoints_resume_exactly_and_match_sync_ones(tmp_path):
    def run(out: Path, async_save: bool, **overrides):
        PartialState._reset_state()
        trainer = make_trainer(out, checkpoint=False, trackers=[], callbacks=[
            ModelCheckpoint(every_n_steps=2, save_top_k=2, async_save=async_save)], **overrides)
        trainer.fit()
        return trainer

    sync, asynchronous = run(tmp_path / "sync", False), run(tmp_path / "async", True)
    names = sorted(p.name for p in (tmp_path / "sync" / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "async" / "checkpoints").iterdir())
    kept = [name for name in names if name.startswith("epoch=")]
    assert len(kept) == 2  # retention deleted the older ones once each new one was in place
    for name in kept:
        ours, theirs = files_of(tmp_path / "async" / "checkpoints" / name), files_of(tmp_path / "sync" / "checkpoints" / name)
        assert ours == theirs, name
    assert find_latest(tmp_path / "async" / "checkpoints").name == kept[-1] == find_latest(tmp_path / "sync" / "checkpoints").name
    # Stopped early by max_steps, then resumed from the newest async checkpoint: equal to the uninterrupted run.
    first = run(tmp_path / "resumed", True, max_steps=6)
    assert first.global_step == 6
    PartialState._reset_state()
    resumed = make_trainer(tmp_path / "resumed", checkpoint=False, trackers=[],
                           callbacks=[ModelCheckpoint(every_n_steps=2, save_top_k=2, async_save=True)])
    resumed.fit(resume="latest")
    final = resumed.accelerator.unwrap_model(resumed.model).state_dict()
    for name, value in sync.accelerator.unwrap_model(sync.model).state_dict().items():
        assert torch.equal(final[name], value), name
    assert asynchronous.global_step == sync.global_step == resumed.global_step


def test_the_staging_copies_are_reused_from_one_async_save_to_the_next(tmp_path):
    parts = prepared(seed=4)
    accelerator, model = parts[0], parts[1]
    train_steps(*parts, steps=1)
    accelerator.save_state(tmp_path / "a", blocking=False)
    accelerator.wait_for_checkpoint()
    buffers = {key: buffer.data_ptr() for key, buffer in accelerator.staging_buffers._buffers.items()}
    model_bytes = sum(v.numel() * v.element_size() for v in weights(accelerator, model).values())
    assert accelerator.staging_buffers.nbytes >= 3 * model_bytes  # weights and AdamW's two moments
    train_steps(*parts, steps=1)
    accelerator.save_state(tmp_path / "b", blocking=False)
    accelerator.wait_for_checkpoint()
    assert {key: buffer.data_ptr() for key, buffer in accelerator.staging_buffers._buffers.items()} == buffers
    assert_still_loads(tmp_path / "b", weights(accelerator, model))


def test_an_accelerator_pickles_while_an_async_save_is_being_written(tmp_path):
    import pickle

    from trainer import Accelerator

    accelerator = Accelerator(cpu=True)  # as Accelerate's own test pickles it: a model, no optimizer
    accelerator.prepare(torch.nn.Linear(4, 4))
    gate = hold_writer(accelerator)
    try:
        accelerator.save_state(tmp_path / "ckpt", blocking=False)
        copy = pickle.loads(pickle.dumps(accelerator))  # its writer's thread, lock and pending write stay behind
        assert not copy.checkpoint_writer.pending and accelerator.checkpoint_writer.pending
    finally:
        gate.set()
    accelerator.wait_for_checkpoint()
    assert (tmp_path / "ckpt" / "accelerator.json").is_file()
