"""Fault catalogue, big-model inference: checkpoint dtypes, misspelt dtypes, bad device maps, budgets and paths.

Each test is one catalogue case (listed in docs/troubleshooting.md): the error type, a message that
names the problem and the fix, and that the checkpoint files on disk are untouched afterwards.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from trainer import Inferencer, init_empty_weights, load_checkpoint_and_dispatch
from trainer.inference import DeviceMapError, QuantizationConfig, infer_auto_device_map
from trainer.inference.checkpoint_files import CheckpointError
from trainer.utils.modeling import set_module_tensor_to_device

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def empty() -> nn.Module:
    with init_empty_weights():
        return net()


@pytest.fixture(scope="module")
def half_checkpoint(tmp_path_factory) -> Path:
    """The model's weights saved in float16, as most published checkpoints are."""
    folder = tmp_path_factory.mktemp("half")
    save_file({k: v.half().contiguous() for k, v in net().state_dict().items()}, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """A folder of two fp32 shards and their index."""
    folder = tmp_path_factory.mktemp("sharded")
    state = net().state_dict()
    first = {k: v for k, v in state.items() if k.startswith("0.")}
    save_file(first, str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: v for k, v in state.items() if k not in first}, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {k: f"model-0000{1 if k in first else 2}-of-00002.safetensors" for k in state}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def digests(path: Path) -> dict[str, str]:
    """Every file under ``path`` (or the file itself) by its SHA-256: what 'nothing on disk changed' compares."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def still_meta(model: nn.Module) -> bool:
    return all(p.device.type == "meta" for p in model.parameters())


def expected_from_half() -> torch.Tensor:
    """What the fp32 model computes with the checkpoint's fp16-rounded values."""
    reference = net()
    reference.load_state_dict({k: v.half().float() for k, v in reference.state_dict().items()})
    with torch.no_grad():
        return reference(X)


# -- a checkpoint in another dtype: the model keeps its own unless dtype= says otherwise -------------------------------
PLACEMENTS = {"cpu": {"": "cpu"}, "some-on-disk": {"0": "cpu", "2": "disk", "4": "disk"}, "all-on-disk": {"": "disk"}}


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_a_float16_checkpoint_loads_in_the_model_dtype(placement, half_checkpoint, tmp_path):
    before = digests(half_checkpoint)
    model = load_checkpoint_and_dispatch(empty(), half_checkpoint, device_map=PLACEMENTS[placement])
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        output = model(X)
    assert output.dtype == torch.float32 and torch.equal(output, expected_from_half())
    assert digests(half_checkpoint) == before


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_dtype_argument_casts_every_weight(placement, half_checkpoint, tmp_path):
    model = load_checkpoint_and_dispatch(empty(), half_checkpoint, device_map=PLACEMENTS[placement],
                                         offload_folder=tmp_path / "offload", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        output = model(X.bfloat16())
    assert output.dtype == torch.bfloat16
    assert torch.allclose(output.float(), expected_from_half(), atol=0.05)


def test_inferencer_keeps_the_model_dtype(half_checkpoint):
    with Inferencer(empty(), half_checkpoint, device_map={"": "cpu"}) as inferencer:
        assert {p.dtype for p in inferencer.model.parameters()} == {torch.float32}
        assert torch.equal(inferencer(X), expected_from_half())


@pytest.mark.parametrize("placement", ["some-on-disk", "all-on-disk"])
def test_buffers_of_offloaded_layers_keep_the_checkpoint_values(placement, tmp_path):
    def with_norm() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)).eval()

    reference = with_norm()
    reference[1].running_mean.fill_(3.0)
    reference[1].running_var.fill_(2.0)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with init_empty_weights():
        model = with_norm()
    device_map = {"0": "cpu", "1": "disk", "2": "cpu"} if placement == "some-on-disk" else {"": "disk"}
    model = load_checkpoint_and_dispatch(model, tmp_path / "model.safetensors", device_map=device_map)
    assert torch.equal(model[1].running_mean, reference[1].running_mean)
    with torch.no_grad():
        assert torch.equal(model(X), reference(X))


# -- misspelt dtype names --------------------------------------------------------------------------------------------
MISSPELT_DTYPES = {
    "load_checkpoint_and_dispatch": (lambda ckpt: load_checkpoint_and_dispatch(empty(), ckpt, dtype="flaot16"),
                                     "dtype='flaot16'", "float16"),
    "Inferencer": (lambda ckpt: Inferencer(empty(), ckpt, dtype="bf61"), "dtype='bf61'", "bf16"),
    "Inferencer-without-checkpoint": (lambda ckpt: Inferencer(net(), dtype="torch.bfloat61"), "dtype='torch.bfloat61'",
                                      "bfloat16"),
    "infer_auto_device_map": (lambda ckpt: infer_auto_device_map(empty(), dtype="flaot32"), "dtype='flaot32'", "float32"),
    "QuantizationConfig": (lambda ckpt: QuantizationConfig(load_in_4bit=True, bnb_4bit_compute_dtype="bfloat61"),
                           "bnb_4bit_compute_dtype='bfloat61'", "bfloat16"),
}


@pytest.mark.parametrize("where", list(MISSPELT_DTYPES))
def test_misspelt_dtype_lists_the_valid_ones(where, half_checkpoint):
    call, named, suggestion = MISSPELT_DTYPES[where]
    before = digests(half_checkpoint)
    with pytest.raises(ValueError) as error:
        call(half_checkpoint)
    message = str(error.value)
    assert message.startswith(f"{named} is not a torch dtype. Did you mean {suggestion!r}?"), message
    assert "'float32', 'float16', 'bfloat16'" in message, message
    assert digests(half_checkpoint) == before


# -- device maps and memory budgets ----------------------------------------------------------------------------------
BAD_MAPS = {
    "missing-module": ({"0": "cpu", "2.wieght": "cpu", "": "cpu"},
                       r"The device map names '2.wieght', which is not a module or weight of Sequential\. Did you mean "
                       r"'2.weight'\? Use names from model.named_modules\(\) \(at the top: '0', '1', '2', '3', '4'\)"),
    "misspelt-strategy": ("atuo", r"device_map='atuo' is neither a strategy nor a device\. Did you mean 'auto'\? "
                                  r"Use one of 'auto', 'balanced'"),
    "unknown-device": ({"0": "cpu", "": "gpu"}, r"device_map\[''\]: Unknown device 'gpu': use an accelerator index \(0\), "
                                                r"'cpu' or 'disk'"),
    "weights-left-out": ({"0": "cpu"}, r"The device map leaves 4 weight\(s\) without a device: 2.bias, 2.weight, 4.bias, "
                                       r"4.weight\. Add entries for them, or '' for everything else"),
}


@pytest.mark.parametrize("case", list(BAD_MAPS))
def test_a_bad_device_map_is_one_error_before_loading(case, sharded):
    device_map, message = BAD_MAPS[case]
    before = digests(sharded)
    model = empty()
    with pytest.raises(DeviceMapError, match=message):
        load_checkpoint_and_dispatch(model, sharded, device_map=device_map)
    assert still_meta(model) and digests(sharded) == before


BAD_BUDGETS = {
    "bad-unit": ({"cpu": "2 gigs"}, r"max_memory\['cpu'\]: Not a memory size: '2 gigs'\. Did you mean '2GiB'\? Use bytes"),
    "unknown-device": ({"gpu0": "1GB"}, r"max_memory\['gpu0'\]: Unknown device 'gpu0': use an accelerator index"),
    "negative": ({"cpu": -5}, r"max_memory\['cpu'\]: A memory size cannot be negative: -5"),
    "not-a-dict": ("4GB", r"max_memory='4GB': give a dict \{device: size\}"),
}


@pytest.mark.parametrize("case", list(BAD_BUDGETS))
def test_a_bad_max_memory_names_the_entry(case, sharded):
    budget, message = BAD_BUDGETS[case]
    model = empty()
    with pytest.raises(DeviceMapError, match=message):
        load_checkpoint_and_dispatch(model, sharded, device_map="auto", max_memory=budget)
    assert still_meta(model)


# -- paths -----------------------------------------------------------------------------------------------------------
def test_an_offload_folder_that_is_a_file(sharded, tmp_path):
    path = tmp_path / "offload"
    path.write_text("my notes")
    model = empty()
    with pytest.raises(ValueError, match=rf"offload_folder='{path}' is a file; give a directory \(it is created if "
                                         r"missing\) where offloaded weights can be written"):
        load_checkpoint_and_dispatch(model, sharded, device_map={"0": "cpu", "": "disk"}, offload_folder=path)
    with pytest.raises(ValueError, match=rf"offload_folder='{path}/sub' is inside {path}, which is a file"):
        load_checkpoint_and_dispatch(model, sharded, device_map={"0": "cpu", "": "disk"}, offload_folder=path / "sub")
    assert path.read_text() == "my notes" and still_meta(model)


def test_a_checkpoint_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere" / "model.safetensors"
    with pytest.raises(CheckpointError, match=rf"Checkpoint path {missing} does not exist; check the path, or download "
                                              "the checkpoint first"):
        load_checkpoint_and_dispatch(empty(), missing, device_map={"": "cpu"})


def test_an_index_naming_a_missing_shard(sharded, tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    for name in ("model.safetensors.index.json", "model-00001-of-00002.safetensors"):
        (folder / name).write_bytes((sharded / name).read_bytes())
    before = digests(folder)
    model = empty()
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json names 1 shard file\(s\) missing from .*: "
                                              r"model-00002-of-00002.safetensors \(holding 4 tensors\); the download is "
                                              r"incomplete, so download the missing files again"):
        load_checkpoint_and_dispatch(model, folder, device_map={"": "cpu"})
    assert still_meta(model) and digests(folder) == before


def test_a_torch_file_on_disk_without_an_offload_folder(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save(net().state_dict(), path)
    before = digests(path)
    model = empty()
    with pytest.raises(ValueError, match=r"The device map puts 4 weight\(s\) on disk \(2.bias, ...\) and checkpoint .*"
                                         r"pytorch_model.bin is a torch file, which cannot be read in place: pass "
                                         r"offload_folder="):
        load_checkpoint_and_dispatch(model, path, device_map={"0": "cpu", "": "disk"})
    assert still_meta(model) and digests(path) == before


def test_set_module_tensor_to_device_with_a_value_of_another_shape():
    model = net()
    with pytest.raises(ValueError, match=r"set_module_tensor_to_device: '2.weight' has shape \(16, 16\) and the value "
                                         r"given has \(16, 8\); pass a value of the tensor's shape"):
        set_module_tensor_to_device(model, "2.weight", "cpu", value=torch.zeros(16, 8))
    assert model[2].weight.shape == (16, 16)


PREDICT_FAULTS = {
    "misspelt-strategy": ({"device_map": "sequentail"}, DeviceMapError, r"device_map='sequentail' is neither a strategy "
                                                                       r"nor a device\. Did you mean 'sequential'\?"),
    "offload-folder-is-a-file": ({"device_map": {"": "disk"}, "offload_folder": "FILE"}, ValueError,
                                 r"offload_folder='.*notes.txt' is a file; give a directory"),
}


@pytest.mark.parametrize("case", list(PREDICT_FAULTS))
def test_trainer_predict_with_a_bad_device_map(case, tmp_path):
    from trainer import Trainer

    arguments, kind, message = PREDICT_FAULTS[case]
    notes = tmp_path / "notes.txt"
    notes.write_text("kept")
    arguments = {k: notes if v == "FILE" else v for k, v in arguments.items()}
    trainer = Trainer(net(), trackers=[], progress_bar=False, checkpoint=False, output_dir=tmp_path, batch_size=3)
    data = list(X)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(kind, match=message):
        trainer.predict(data, **arguments)
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()) and notes.read_text() == "kept"
    assert torch.equal(torch.cat(trainer.predict(data)), net()(X).detach())  # the model still runs as before
