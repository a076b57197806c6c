"""The fault catalogue for checkpoints: damaged, cut short, missing or added files, malformed JSON, models
that do not match, saves killed at every step, a full or read-only disk, another strategy's layout.

Every case checks the error's type, that its message names the checkpoint, the file (or key) and
the fix, that the failed load changed nothing (the prepared model keeps its weights, the files
their bytes), and where a save is involved, that the previous checkpoint still loads. The saves
killed part-way are real processes (forked from this one, so nothing is imported again) that
send themselves SIGKILL at a chosen call of the save.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch
from fault_helpers import assert_still_loads, prepared, saved_checkpoint, train_steps
from models import classification_data, mlp

from trainer import Accelerator, PartialState
from trainer.checkpoint_errors import CheckpointError, CheckpointFileNotFoundError, CheckpointKeysError, CheckpointWriteError
from trainer.checkpoint_state import find_latest, write_latest

FIX_EARLIER = "Load an earlier checkpoint"
FIX_UNCHECKED = "pass verify=False"


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """One saved checkpoint for the whole module; each case damages a copy of it."""
    return saved_checkpoint(tmp_path_factory.mktemp("original"))


@pytest.fixture
def ckpt(original, tmp_path):
    path, weights = original
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    return copy, weights


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def setup_with(model: torch.nn.Module):
    """What ``fault_helpers.prepared`` builds, around another model."""
    from torch.utils.data import DataLoader, TensorDataset

    accelerator = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    x, y = classification_data(16)
    return (accelerator, *accelerator.prepare(model, optimizer, scheduler, DataLoader(TensorDataset(x, y), batch_size=4)))


def fails_to_load(path: Path, error: type[BaseException], match: str, model_args: dict | None = None, **load_args):
    """Load ``path`` into a fresh setup: it must raise ``error`` (matching ``match``) and change no state or file."""
    PartialState._reset_state()
    accelerator, model, optimizer, *_ = prepared(seed=5) if model_args is None else setup_with(mlp(5, **model_args))
    before = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    files = snapshot(path) if path.is_dir() else {}
    with pytest.raises(error, match=match) as caught:
        accelerator.load_state(path, **load_args)
    after = accelerator.unwrap_model(model).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a failed load changed the model"
    assert not optimizer.optimizer.state, "a failed load changed the optimizer"
    assert accelerator.save_iteration == 0
    assert (snapshot(path) if path.is_dir() else {}) == files, "a failed load changed the checkpoint's files"
    PartialState._reset_state()
    return caught.value


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x04
    path.write_bytes(bytes(data))


# -- checked against the manifest ---------------------------------------------------------------------------------
KINDS = ["model.safetensors", "optimizer.safetensors", "optimizer.json", "accelerator.json", "scheduler.json",
         "dataloader.json", "precision.json", "random_states_0.json", "random_states_0.safetensors"]


@pytest.mark.parametrize("name", KINDS)
def test_a_changed_byte_is_named(ckpt, original, name):
    path, _ = ckpt
    flip_byte(path / name, -3)
    error = fails_to_load(path, CheckpointError, f"{path} does not match its manifest.json: {name} is damaged")
    assert FIX_EARLIER in str(error) and FIX_UNCHECKED in str(error)
    assert_still_loads(*original)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "accelerator.json",
                                  "random_states_0.safetensors"])
def test_a_file_cut_short_is_named(ckpt, name):
    path, _ = ckpt
    size = (path / name).stat().st_size
    with open(path / name, "r+b") as file:
        file.truncate(size // 2)
    error = fails_to_load(path, CheckpointError, rf"{name} is {size // 2:,} bytes, cut short \(it was saved with {size:,}\)")
    assert FIX_EARLIER in str(error)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
                                  "random_states_0.json"])
def test_a_missing_file_is_named(ckpt, name):
    path, _ = ckpt
    (path / name).unlink()
    error = fails_to_load(path, CheckpointError, f"{path} does not match its manifest.json: {name} is missing")
    assert FIX_EARLIER in str(error)


def test_an_added_file_is_named(ckpt):
    path, weights = ckpt
    (path / "notes.json").write_text("{}")
    fails_to_load(path, CheckpointError, r"notes.json was added after the save .*Remove the added file\(s\), or pass "
                                         "verify=False")
    (path / "notes.json").unlink()
    assert_still_loads(path, weights)


def test_a_damaged_manifest_is_named(ckpt):
    path, _ = ckpt
    (path / "manifest.json").write_text('{"format": "trainer-checkpoint-manifest", "files": [')
    fails_to_load(path, CheckpointError, f"{path} has a damaged manifest.json .*not valid JSON.*{FIX_EARLIER.lower()}, "
                                         "or pass verify=False")


def test_verify_false_loads_a_damaged_but_readable_checkpoint(ckpt):
    path, weights = ckpt
    flip_byte(path / "model.safetensors", -3)  # inside the last weight's data: still a valid file
    fails_to_load(path, CheckpointError, "model.safetensors is damaged")
    PartialState._reset_state()
    accelerator, model, *_ = prepared(seed=5)
    accelerator.load_state(path, verify=False)
    loaded = accelerator.unwrap_model(model).state_dict()
    differing = sum(int((loaded[k] != weights[k]).sum()) for k in weights)
    assert differing == 1  # the one damaged value came through, as asked


def test_the_environment_switch_turns_checking_off(ckpt, monkeypatch):
    path, _ = ckpt
    flip_byte(path / "model.safetensors", -3)
    monkeypatch.setenv("TRAINER_VERIFY_CHECKPOINTS", "0")
    accelerator, *_ = prepared(seed=5)
    assert accelerator.load_state(path) == path
    monkeypatch.setenv("TRAINER_VERIFY_CHECKPOINTS", "maybe")
    fails_to_load(path, ValueError, "TRAINER_VERIFY_CHECKPOINTS='maybe' is not a switch: set it to 0 .* or 1")


def test_a_checkpoint_without_a_manifest_loads_unchecked(ckpt):
    path, weights = ckpt
    (path / "manifest.json").unlink()  # as written before manifests existed
    assert_still_loads(path, weights)


# -- read without a manifest (or verify=False): the file and the key are still named ---------------------------------
@pytest.mark.parametrize("name", ["accelerator.json", "optimizer.json", "dataloader.json", "random_states_0.json"])
def test_malformed_json_is_named(ckpt, name):
    path, _ = ckpt
    (path / name).write_text('{"counts": {"models": 1,')
    fails_to_load(path, CheckpointError, f"{path} has a damaged {name}: it is not valid JSON .*{FIX_EARLIER}",
                  verify=False)


WRONG_STRUCTURE = {
    "accelerator-is-a-list": ("accelerator.json", lambda d: [d], "holds a JSON list, where a state dict"),
    "accelerator-without-counts": ("accelerator.json", lambda d: {k: v for k, v in d.items() if k != "counts"},
                                   "has no 'counts' entry"),
    "counts-not-numbers": ("accelerator.json", lambda d: {**d, "counts": {"models": "one"}}, "'counts' must give a number"),
    "optimizer-without-param-groups": ("optimizer.json", lambda d: {"state": d["state"]}, "has no 'param_groups' entry"),
    "dataloader-without-iteration": ("dataloader.json", lambda d: {"position": 0}, "has no 'iteration' entry"),
    "rng-meta-is-a-string": ("random_states_0.json", lambda d: {**d, "meta": "x"}, "'meta' must hold"),
}


@pytest.mark.parametrize("case", list(WRONG_STRUCTURE))
def test_json_of_the_wrong_structure_is_named(ckpt, case):
    path, _ = ckpt
    name, change, says = WRONG_STRUCTURE[case]
    (path / name).write_text(json.dumps(change(json.loads((path / name).read_text()))))
    fails_to_load(path, CheckpointError, f"{path} has a damaged {name}: .*{says}.*{FIX_EARLIER}", verify=False)


def test_optimizer_groups_of_another_optimizer_are_named(ckpt):
    path, _ = ckpt
    state = json.loads((path / "optimizer.json").read_text())
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:2]
    (path / "optimizer.json").write_text(json.dumps(state))
    fails_to_load(path, CheckpointError, r"optimizer.json\) with parameter groups of \[2\] parameters, but the prepared "
                                         r"optimizer's groups have \[4\]. Prepare the same model and optimizer", verify=False)


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_safetensors_cut_short_without_a_manifest_is_named(ckpt, name):
    path, _ = ckpt
    (path / "manifest.json").unlink()
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[:-10])
    fails_to_load(path, CheckpointError, f"{path} cannot be loaded: {path / name} is truncated.*{FIX_EARLIER}")


def test_a_corrupt_safetensors_header_is_named(ckpt):
    path, _ = ckpt
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:16] = b"garbage!"
    (path / "model.safetensors").write_bytes(bytes(data))
    fails_to_load(path, CheckpointError, f"{path / 'model.safetensors'} has a corrupt safetensors header.*{FIX_EARLIER}",
                  verify=False)


def test_missing_optimizer_tensors_are_a_file_not_found_error(ckpt):
    path, _ = ckpt
    (path / "optimizer.safetensors").unlink()
    error = fails_to_load(path, FileNotFoundError, f"{path} has no optimizer.safetensors: it is incomplete", verify=False)
    assert isinstance(error, CheckpointFileNotFoundError) and FIX_EARLIER in str(error)


def test_a_tensor_the_json_names_but_the_file_lacks_is_named(ckpt):
    path, _ = ckpt
    text = (path / "optimizer.json").read_text().replace('"state.0.exp_avg"', '"state.0.momentum"')
    (path / "optimizer.json").write_text(text)
    fails_to_load(path, CheckpointError, r"optimizer.json refers to tensors that optimizer.safetensors does not hold: "
                                         r"\['state.0.momentum'\]. Load an earlier checkpoint", verify=False)


def test_weights_of_another_shape_are_named(ckpt):
    path, _ = ckpt
    error = fails_to_load(path, CheckpointKeysError, r"model.safetensors does not match the model: 0.weight is \[16, 6\] "
                                                     r"in the file but \[8, 6\] in the model.*the model it was saved from",
                          model_args={"hidden": 8}, strict=False)
    assert isinstance(error, RuntimeError)


def test_missing_and_unexpected_model_keys_are_named(ckpt):
    path, _ = ckpt
    fails_to_load(path, CheckpointKeysError, r"missing keys \['3.bias', '3.weight'\], unexpected keys \['2.bias', "
                                             r"'2.weight'\].*pass strict=False", model_args={"dropout": 0.1})


def test_another_strategys_layout_names_the_strategy(ckpt):
    path, _ = ckpt
    (path / "model.safetensors").unlink()
    (path / "zero").mkdir()
    info = json.loads((path / "accelerator.json").read_text())
    (path / "accelerator.json").write_text(json.dumps({**info, "strategy": "deepspeed"}))
    fails_to_load(path, FileNotFoundError, r"written by the deepspeed strategy, which keeps the models in its own format "
                                           r"\(zero/\), so it has no model.safetensors .*load it with the deepspeed strategy",
                  verify=False)


def test_a_sharded_fsdp_checkpoint_loaded_by_another_strategy_names_merge_weights(tmp_path, monkeypatch):
    from strategies import FSDP

    monkeypatch.setenv("TRAINER_USE_CPU", "1")
    accelerator = Accelerator(strategy=FSDP(state_dict_type="SHARDED_STATE_DICT"))  # one process, no process group
    model = mlp(0)
    accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    path = accelerator.save_state(tmp_path / "sharded")
    assert (path / "sharded_state").is_dir() and not (path / "model.safetensors").exists()
    PartialState._reset_state()
    other = Accelerator(cpu=True)
    other_model = mlp(1)
    other.prepare(other_model, torch.optim.AdamW(other_model.parameters()))
    with pytest.raises(FileNotFoundError, match=rf"{path} was written by the fsdp strategy.*\(sharded_state/\).*for the "
                                                rf"single_device strategy.*load it with the FSDP strategy.*`trainer "
                                                rf"merge-weights {path} OUTPUT_DIR`"):
        other.load_state(path)
    assert torch.equal(other_model[0].weight, mlp(1)[0].weight)


def test_a_folder_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    fails_to_load(tmp_path / "empty", FileNotFoundError, f"{tmp_path / 'empty'} is not a checkpoint written by "
                                                         "save_state\\(\\): it has no accelerator.json. Check the path")


# -- saves killed at each step --------------------------------------------------------------------------------------
# (event, module name ends with, function, n-th such event): the save sends itself SIGKILL there.
KILL_POINTS = {
    "scratch-created": (True, ("return", "checkpoint_io", "new_scratch_directory", 1), "old"),
    "mid-files": (True, ("call", "state_format", "write_split_state", 2), "old"),
    "files-written": (True, ("call", "checkpoint_manifest", "write_manifest", 1), "old"),
    "scratch-complete": (True, ("call", "checkpoint_io", "commit_directory", 1), "old"),
    "after-swap": (True, ("return", "checkpoint_io", "_exchange", 1), "new"),
    "between-renames": (False, ("c_return", "posix", "replace", 1), "old-copy"),
    "after-second-rename": (False, ("c_return", "posix", "replace", 2), "new"),
}


def _kill_at(event: str, module: str, function: str, nth: int):
    seen = 0

    def profile(frame, kind, arg):
        nonlocal seen
        if kind != event:
            return
        if kind in ("call", "return"):
            name, where = frame.f_code.co_name, frame.f_globals.get("__name__", "")
        else:
            name, where = getattr(arg, "__name__", ""), getattr(arg, "__module__", "") or ""
        if name == function and where.endswith(module):
            seen += 1
            if seen == nth:
                os.kill(os.getpid(), signal.SIGKILL)

    return profile


def save_and_get_killed(path: Path, point: tuple, exchange: bool, blocking: bool = True) -> dict[str, torch.Tensor]:
    """Fork a process that saves a further-trained state over ``path`` and SIGKILLs itself at ``point``.

    Returns the weights that save would have written. The training happens here, before the fork,
    so the child only saves (with one thread: a thread pool does not survive a fork). With
    ``blocking=False`` the kill comes from the background writer's thread, started in the child.
    """
    parts = prepared(seed=1)
    train_steps(*parts, steps=3)
    accelerator, model = parts[0], parts[1]
    new = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 3
        try:
            from trainer import checkpoint_io

            torch.set_num_threads(1)
            if not exchange:  # as on a file system that cannot swap two folders in one step
                checkpoint_io._exchange = lambda first, second: False
            sys.setprofile(_kill_at(*point))
            threading.setprofile(sys.getprofile())
            accelerator.save_state(path, blocking=blocking)
            accelerator.wait_for_checkpoint()
            code = 0  # the kill point was never reached
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the save killed at {point} did not finish in 30 s")
        time.sleep(0.01)
    PartialState._reset_state()
    status = done[1]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the child ended with status {status}"
    return new


def leftovers_of(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


ASYNC_KILL_POINTS = ("mid-files", "files-written", "scratch-complete", "after-swap")  # those on the writer's thread


@pytest.mark.parametrize(("point", "blocking"), [pytest.param(point, True, id=point) for point in KILL_POINTS]
                         + [pytest.param(point, False, id=f"{point}-async") for point in ASYNC_KILL_POINTS])
def test_a_save_killed_at_any_point_leaves_a_loadable_checkpoint(ckpt, point, blocking):
    path, old = ckpt
    write_latest(path.parent, path)
    exchange, kill, expect = KILL_POINTS[point]
    new = save_and_get_killed(path, kill, exchange, blocking)
    if expect == "old-copy":
        assert not path.exists() and any(".old-" in name for name in leftovers_of(path))
        with pytest.warns(UserWarning, match=rf"{path} does not exist: a save_state\(\) replacing it was interrupted .*"
                                             r"Loading that complete previous checkpoint from .*\.ckpt\.old-\d+"):
            assert_still_loads(path, old)
        with pytest.warns(UserWarning, match="Resuming from the complete previous checkpoint"):
            assert ".old-" in find_latest(path.parent).name
    else:
        assert_still_loads(path, old if expect == "old" else new)
        assert find_latest(path.parent) == path
    if point not in ("after-second-rename",):
        assert leftovers_of(path), "the killed save left nothing behind to clean up"
    # The next save puts a new checkpoint in place and removes what the killed one left.
    accelerator, model, *_ = prepared(seed=2)
    accelerator.save_state(path)
    weights = {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    assert leftovers_of(path) == []
    assert_still_loads(path, weights)


def test_a_first_save_killed_midway_is_named_when_loaded(tmp_path):
    path = tmp_path / "ckpt"
    save_and_get_killed(path, ("call", "state_format", "write_split_state", 2), True)
    fails_to_load(path, FileNotFoundError, rf"{path} is not a checkpoint .*\(the folder does not exist\).*An unfinished "
                                           r"save left .*\.ckpt\.tmp-\d+-\w+ \(never put in place; the next save removes it\)")


def test_a_live_writers_scratch_folder_is_not_removed(ckpt):
    path, _ = ckpt
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live, dead = path.parent / f".ckpt.tmp-{writer.pid}-abc", path.parent / ".ckpt.tmp-999999999-abc"
        live.mkdir()
        dead.mkdir()
        accelerator, model, *_ = prepared(seed=2)
        accelerator.save_state(path)
        assert live.is_dir() and not dead.exists()  # only the folder of a process that is gone is removed
    finally:
        writer.kill()
        writer.wait()
    assert_still_loads(path, {k: v.clone() for k, v in accelerator.unwrap_model(model).state_dict().items()})


# -- a full or read-only disk ---------------------------------------------------------------------------------------
def assert_previous_checkpoint_kept(mount: Path, path: Path, weights: dict[str, torch.Tensor]) -> None:
    assert sorted(p.name for p in mount.iterdir()) == ["ckpt", "latest"]  # no scratch folder left
    assert find_latest(mount) == path
    assert_still_loads(path, weights)


def test_a_save_that_does_not_fit_fails_before_writing(small_disk):
    mount, path, weights = small_disk
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights
    accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(CheckpointWriteError, match=rf"No space left to save the checkpoint {path}: it needs about "
                                                   r"[\d,]+ bytes, and [\d,]+ bytes are free in .*Free some space"):
        accelerator.save_state(path)
    assert_previous_checkpoint_kept(mount, path, weights)


def test_a_disk_that_fills_up_while_saving_is_named(small_disk):
    mount, path, weights = small_disk
    accelerator, *_ = prepared(seed=3)

    def big_file(scratch: Path) -> None:  # a callback adding more than the disk holds
        (scratch / "extra.json").write_text("0" * 3 * 2**20)

    with pytest.raises(CheckpointWriteError, match=rf"No space left to save the checkpoint {path}: the disk filled up "
                                                   r"while it was written \(it needs about [\d,]+ bytes, plus any files "
                                                   r"before_commit adds; [\d,]+ bytes were free in .* when the save began\)"
                                                   r"\. Free some space .*previous checkpoint there is untouched") as caught:
        accelerator.save_state(path, before_commit=big_file)
    assert caught.value.errno == 28
    assert_previous_checkpoint_kept(mount, path, weights)


def test_a_read_only_folder_is_named(small_disk):
    mount, path, weights = small_disk
    done = subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only: {done.stderr.strip()}")
    accelerator, *_ = prepared(seed=3)
    with pytest.raises(CheckpointWriteError, match=rf"Cannot save the checkpoint {path}: the folder {mount} is not "
                                                   r"writable \(.*Read-only file system.*Make it writable or save elsewhere"):
        accelerator.save_state(path)
    assert_previous_checkpoint_kept(mount, path, weights)
