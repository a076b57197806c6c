"""CheckpointFiles: every layout reads back exactly, damaged checkpoints fail up front with the file named, and
reading a shard tensor by tensor keeps memory near one tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file, save_model

from trainer.inference import checkpoint_shards
from trainer.inference.checkpoint_files import CheckpointError, CheckpointFiles, check_against_model

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]


class NotATensor:
    """A class torch.load(weights_only=True) does not know, standing for any pickled object in a .bin."""

    def __init__(self) -> None:
        self.value = 3


def gpt2_config(n_embd: int = 64):
    return transformers.GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=1000, n_positions=64,
                                   bos_token_id=0, eos_token_id=0)


def gpt2(n_embd: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(gpt2_config(n_embd)).eval()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return gpt2()


@pytest.fixture(scope="module")
def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}  # detached, still tied


@pytest.fixture
def untied(state) -> dict[str, torch.Tensor]:
    """The state dict without the tied duplicate, as save_pretrained writes it."""
    assert state["lm_head.weight"].equal(state["transformer.wte.weight"])
    return {k: v for k, v in state.items() if k != "lm_head.weight"}


def assert_round_trip(files: CheckpointFiles, expected: dict[str, torch.Tensor]) -> None:
    assert sorted(files.names()) == sorted(expected)
    for name, tensor in expected.items():
        assert files.shape(name) == tuple(tensor.shape)
        assert files.dtype(name) == tensor.dtype
        assert files.nbytes(name) == tensor.numel() * tensor.element_size()
        got = files.get_tensor(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    seen = []
    for shard in files.shards:
        for name, tensor in files.iter_shard(shard):
            assert files.weight_map[name] == shard
            assert torch.equal(tensor, expected[name]), name
            seen.append(name)
    assert sorted(seen) == sorted(expected)  # every tensor once, across all shards


def write_index(folder: Path, parts: list[dict[str, torch.Tensor]], bin_files: bool = False) -> Path:
    """A hand-made sharded checkpoint: one file per part and an index naming them."""
    weight_map = {}
    for i, part in enumerate(parts, 1):
        name = f"pytorch_model-{i:05d}-of-{len(parts):05d}.bin" if bin_files else f"model-{i:05d}-of-{len(parts):05d}.safetensors"
        if bin_files:
            torch.save(part, folder / name)
        else:
            save_file({k: v.contiguous() for k, v in part.items()}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    index = folder / ("pytorch_model.bin.index.json" if bin_files else "model.safetensors.index.json")
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


def split(tensors: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    names = list(tensors)
    return [{k: tensors[k] for k in names[i::n]} for i in range(n)]


# --- layouts ----------------------------------------------------------------------------------------


def test_single_safetensors_file(tmp_path, model, state):
    path = tmp_path / "gpt2.safetensors"
    save_model(model, str(path))  # drops one of the tied pair
    with CheckpointFiles(path) as files:
        stored = {n: state[n] for n in files.names()}
        assert len(stored) == len(state) - 1
        assert_round_trip(files, stored)
        assert files.shards == [path] and files.is_safetensors(path)
        header = int.from_bytes(path.read_bytes()[:8], "little")
        assert files.shard_nbytes(path) == path.stat().st_size - 8 - header == sum(map(files.nbytes, files.names()))


def test_folder_with_single_model_safetensors(tmp_path, model, untied):
    model.save_pretrained(tmp_path)
    files = CheckpointFiles(tmp_path)
    assert [s.name for s in files.shards] == ["model.safetensors"]
    assert_round_trip(files, untied)


def test_save_pretrained_sharded_folder(tmp_path, model, untied):
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = CheckpointFiles(tmp_path)
    assert len(files.shards) > 2
    assert files.shards == list(dict.fromkeys(tmp_path / f for f in index["weight_map"].values()))  # index order
    assert {n: p.name for n, p in files.weight_map.items()} == index["weight_map"]
    assert files.metadata == index["metadata"]
    assert sum(map(files.shard_nbytes, files.shards)) == index["metadata"]["total_size"]
    assert_round_trip(files, untied)
    # The index file itself is a valid path too.
    assert CheckpointFiles(tmp_path / "model.safetensors.index.json").weight_map == files.weight_map


def test_hand_made_safetensors_index(tmp_path, untied):
    index = write_index(tmp_path, split(untied, 3))
    files = CheckpointFiles(tmp_path)
    assert len(files.shards) == 3 and all(files.is_safetensors(s) for s in files.shards)
    assert files.metadata == {"total_size": 0}
    assert_round_trip(files, untied)
    assert CheckpointFiles(index).names() == files.names()


def test_torch_file_with_tied_weights(tmp_path, state):
    path = tmp_path / "weights.pt"
    torch.save(state, path)  # lm_head.weight and transformer.wte.weight share one storage
    files = CheckpointFiles(path)
    assert not files.is_safetensors(path)
    assert files.names() == list(state)
    assert_round_trip(files, state)
    tied = state["lm_head.weight"]
    assert files.shard_nbytes(path) == sum(files.nbytes(n) for n in state) - tied.numel() * tied.element_size()
    files.close()


def test_folder_with_pytorch_model_bin(tmp_path, state):
    (tmp_path / "config.json").write_text("{}")
    torch.save(state, tmp_path / "training_args.bin")  # stands for a file that is not the weights
    torch.save(state, tmp_path / "pytorch_model.bin")
    files = CheckpointFiles(tmp_path)
    assert files.shards == [tmp_path / "pytorch_model.bin"]
    assert_round_trip(files, state)


def test_hand_made_bin_index(tmp_path, untied):
    write_index(tmp_path, split(untied, 2), bin_files=True)
    files = CheckpointFiles(tmp_path)
    assert [s.name for s in files.shards] == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert_round_trip(files, untied)


def test_safetensors_index_is_preferred_over_bin(tmp_path, untied):
    write_index(tmp_path, split(untied, 2))
    torch.save({"other": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    assert sorted(CheckpointFiles(tmp_path).names()) == sorted(untied)


def test_iter_shard_subset_and_lookups(tmp_path, untied):
    write_index(tmp_path, split(untied, 2))
    files = CheckpointFiles(tmp_path)
    shard = files.shards[0]
    held = [n for n, p in files.weight_map.items() if p == shard]
    wanted = held[::2]
    got = dict(files.iter_shard(shard.name, names=reversed(wanted)))  # a file name works; order is file order
    assert sorted(got) == sorted(wanted) and all(torch.equal(got[n], untied[n]) for n in wanted)
    other = next(n for n, p in files.weight_map.items() if p != shard)
    with pytest.raises(KeyError, match="does not hold"):
        files.iter_shard(shard, names=[other])  # checked at the call, not at the first step
    with pytest.raises(KeyError, match="not a file of checkpoint"):
        files.iter_shard(tmp_path / "elsewhere.safetensors")
    with pytest.raises(KeyError, match="not in checkpoint"):
        files.shape("no.such.weight")
    assert other in files and len(files) == len(untied)


def test_mmap_backend_reads_the_same(tmp_path, monkeypatch, untied):
    """Where safetensors has no pread backend, handles are memory-mapped and renewed as bytes are read."""
    monkeypatch.setattr(checkpoint_shards, "_PREAD", False)
    monkeypatch.setattr(checkpoint_shards, "_MMAP_REOPEN_BYTES", 100_000)
    write_index(tmp_path, split(untied, 2))
    with CheckpointFiles(tmp_path) as files:
        assert_round_trip(files, untied)
    assert checkpoint_shards._PREAD is False


def test_close_then_read_again(tmp_path, untied):
    path = tmp_path / "model.safetensors"
    save_file(untied, str(path))
    files = CheckpointFiles(path)
    name = files.names()[0]
    first = files.get_tensor(name)
    files.close()
    assert torch.equal(files.get_tensor(name), first)
    files.close()


# --- damaged checkpoints ----------------------------------------------------------------------------


def raises(path: Path, *words: str) -> str:
    """The CheckpointError for ``path``, checked to name the file and to say ``words``."""
    with pytest.raises(CheckpointError) as info:
        CheckpointFiles(path)
    message = str(info.value)
    assert path.name in message
    for word in words:
        assert word in message, message
    return message


def small(path: Path) -> Path:
    save_file({"a": torch.arange(12.0).reshape(3, 4), "b": torch.ones(5, dtype=torch.int64)}, str(path))
    return path


def test_missing_path(tmp_path):
    raises(tmp_path / "nowhere", "does not exist")


def test_folder_without_checkpoint_lists_its_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("")
    raises(tmp_path, "no recognisable checkpoint", "config.json", "notes.txt", "model.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    raises(empty, "it is empty")


def test_folder_with_several_files_and_no_index(tmp_path):
    small(tmp_path / "a.safetensors")
    small(tmp_path / "b.safetensors")
    raises(tmp_path, "a.safetensors", "b.safetensors", "no index")


def test_index_not_json_or_without_weight_map(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a": ')
    raises(index, "not valid JSON")
    index.write_text(json.dumps({"metadata": {}}))
    raises(index, "weight_map")


def test_index_with_missing_shard(tmp_path, model):
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    gone = sorted(tmp_path.glob("model-*.safetensors"))[1]
    gone.unlink()
    message = raises(tmp_path / "model.safetensors.index.json", "missing", "download")
    assert gone.name in message


def test_index_and_shards_disagree(tmp_path):
    small(tmp_path / "part.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "part.safetensors", "c": "part.safetensors"}}))
    raises(index, "c (in part.safetensors)")
    index.write_text(json.dumps({"weight_map": {"a": "../part.safetensors"}}))
    raises(index, "invalid shard names")


def test_truncated_safetensors(tmp_path):
    data = small(tmp_path / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-7])
    assert "7 missing" in raises(cut, "truncated", "download")
    cut.write_bytes(data[:40])  # inside the header
    raises(cut, "truncated")
    cut.write_bytes(data[:5])
    raises(cut, "truncated")


def test_truncated_shard_in_sharded_folder(tmp_path, model):
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated") as info:
        CheckpointFiles(tmp_path)
    assert shard.name in str(info.value)


def test_corrupt_safetensors_header(tmp_path):
    data = bytearray(small(tmp_path / "model.safetensors").read_bytes())
    bad = tmp_path / "bad.safetensors"
    data[8:10] = b"#!"  # the JSON no longer parses
    bad.write_bytes(bytes(data))
    raises(bad, "corrupt", "not valid JSON")
    bad.write_bytes((2**62).to_bytes(8, "little") + bytes(data[8:]))  # an impossible header length
    raises(bad, "corrupt")
    bad.write_bytes(small(tmp_path / "ok.safetensors").read_bytes() + b"extra")
    raises(bad, "5 bytes after the last tensor")


def test_header_sizes_that_do_not_add_up(tmp_path):
    header = json.dumps({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(12))
    raises(bad, "corrupt", "'a'", "12 bytes")
    header = json.dumps({"a": {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}}).encode()
    bad.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    raises(bad, "malformed")


def test_git_lfs_pointer(tmp_path):
    pointer = tmp_path / "model.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 12345\n")
    raises(pointer, "Git LFS pointer")


def test_bin_that_needs_pickle_is_refused(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.ones(2), "extra": NotATensor()}, path)
    raises(path, "weights_only", "NotATensor")
    raises(tmp_path, "weights_only")


def test_bin_in_legacy_format_or_truncated(tmp_path):
    legacy = tmp_path / "legacy.bin"
    torch.save({"weight": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    raises(legacy, "legacy")
    cut = tmp_path / "cut.bin"
    torch.save({"weight": torch.ones(1000)}, cut)
    cut.write_bytes(cut.read_bytes()[:2000])
    raises(cut, "truncated or corrupt")


def test_bin_that_is_not_a_flat_state_dict(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "state_dict": {"weight": torch.ones(2)}}, path)
    raises(path, "training checkpoint", "'state_dict'")
    torch.save([torch.ones(2)], path)
    raises(path, "list")


# --- check_against_model ----------------------------------------------------------------------------


def expected_of(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items()}


@pytest.fixture
def saved(tmp_path, model) -> CheckpointFiles:
    model.save_pretrained(tmp_path, max_shard_size="200KB")
    return CheckpointFiles(tmp_path)


def test_check_against_model_passes_for_the_same_model(saved, model):
    check_against_model(saved, expected_of(model), ignore=["lm_head.weight"])
    check_against_model(saved, expected_of(model), ignore=["lm_head.*"])


def test_check_reports_tied_weight_as_missing(saved, model):
    with pytest.raises(CheckpointError) as info:
        check_against_model(saved, expected_of(model))
    message = str(info.value)
    assert str(saved.path) in message and "1 missing key(s)" in message and "lm_head.weight" in message
    assert "ignore" in message and info.value.missing == ["lm_head.weight"]


def test_check_reports_shape_mismatches_with_a_hint(saved):
    other = expected_of(gpt2(n_embd=32))
    with pytest.raises(CheckpointError) as info:
        check_against_model(saved, other, ignore=["lm_head.weight"])
    message = str(info.value)
    assert "transformer.h.0.attn.c_attn.bias: checkpoint (192,) vs model (96,)" in message
    assert "same config as the checkpoint?" in message
    assert info.value.mismatched == sorted(info.value.mismatched) and len(info.value.mismatched) == len(saved.names())


def test_check_reports_unexpected_only_when_strict(saved, model):
    expected = expected_of(model)
    del expected["transformer.ln_f.bias"], expected["transformer.h.0.mlp.c_fc.weight"]
    with pytest.raises(CheckpointError) as info:
        check_against_model(saved, expected, ignore=["lm_head.weight"])
    message = str(info.value)
    assert "2 unexpected key(s)" in message
    assert message.index("transformer.h.0.mlp.c_fc.weight") < message.index("transformer.ln_f.bias")  # sorted
    assert "missing" not in message
    check_against_model(saved, expected, strict=False, ignore=["lm_head.weight"])


def test_check_lists_the_first_twenty_and_a_count(saved, model):
    expected = expected_of(model)
    expected.update({f"extra.{i:02d}.weight": ((1,), torch.float32) for i in range(25)})
    expected["transformer.wpe.weight"] = ((3, 4), torch.float32)
    with pytest.raises(CheckpointError) as info:
        check_against_model(saved, expected, ignore=["lm_head.weight"])
    message = str(info.value)
    assert "25 missing key(s)" in message and "extra.19.weight" in message and "extra.20.weight" not in message
    assert "... and 5 more" in message and len(info.value.missing) == 25
    assert "transformer.wpe.weight: checkpoint (64, 64) vs model (3, 4)" in message


def test_check_names_a_prefix_difference(saved):
    base = transformers.GPT2Model(gpt2_config())  # the same weights without the "transformer." prefix
    with pytest.raises(CheckpointError, match="start with 'transformer.'"):
        check_against_model(saved, expected_of(base))


# --- memory -----------------------------------------------------------------------------------------

MEMORY_SCRIPT = textwrap.dedent("""
    import gc, sys
    import psutil, torch
    from safetensors.torch import save_file
    from trainer.inference import checkpoint_shards
    from trainer.inference.checkpoint_files import CheckpointFiles

    path, tensor_numel, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    save_file({f"t{i}": torch.full((tensor_numel,), float(i)) for i in range(count)}, path)
    gc.collect()
    process = psutil.Process()
    for backend in ("default", "mmap"):  # the mmap backend is what older safetensors have
        if backend == "mmap":
            checkpoint_shards._PREAD = False
        base = peak = process.memory_info().rss
        with CheckpointFiles(path) as files:
            for name, tensor in files.iter_shard(files.shards[0]):
                assert float(tensor.sum()) == float(name[1:]) * tensor_numel  # touches every page
                peak = max(peak, process.memory_info().rss)
                del tensor
            for name in files.names():
                tensor = files.get_tensor(name)
                assert float(tensor.sum()) == float(name[1:]) * tensor_numel
                peak = max(peak, process.memory_info().rss)
                del tensor
        print(backend, peak - base)
""")


def test_iterating_a_shard_keeps_memory_near_one_tensor(tmp_path):
    """A 200 MB file read tensor by tensor grows this process by about one 25 MB tensor, not by the file."""
    path = tmp_path / "big.safetensors"
    numel, count = 6_250_000, 8  # 8 float32 tensors of 25 MB
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path), str(numel), str(count)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert path.stat().st_size > 200e6
    growth = dict(line.split() for line in done.stdout.split("\n") if line)
    largest = numel * 4
    for backend, grown in growth.items():
        assert int(grown) < largest + 50e6, (backend, int(grown) / 1e6)
