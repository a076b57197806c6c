"""What train_data may be: a datasets.Dataset, a streaming datasets.IterableDataset from JSON lines, tokenised text."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from callbacks import Callback
from trainer import Trainer
from trainer.collate import PaddingCollator
from trainer.data_loader import PreparedDataLoader, Sharding

datasets = pytest.importorskip("datasets")


class DictClassifier(Trainer):
    """Batches are dicts {"x": features, "y": label}, as rows of a datasets.Dataset are."""

    def training_step(self, batch):
        x, y = (batch["x"], batch["y"]) if isinstance(batch, dict) else batch
        return F.cross_entropy(self.model(x), y)


class Batches(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, batch, batch_idx):
        self.seen.append(batch)


def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x[:256] / 16.0, dtype=torch.float32), torch.tensor(y[:256])


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def fit(train_data, tmp_path, **settings):
    batches = Batches()
    trainer = DictClassifier(model(), train_data=train_data, batch_size=32, max_epochs=2, output_dir=tmp_path, seed=3,
                             callbacks=[batches], trackers=[], progress_bar=False, checkpoint=False, **settings)
    trainer.fit()
    return trainer, batches.seen


def test_a_datasets_dataset_is_formatted_to_torch_and_trains_like_tensors(tmp_path):
    x, y = digits()
    table = datasets.Dataset.from_dict({"x": x.numpy(), "y": y.numpy()})  # built from local data, no format set
    trainer, seen = fit(table, tmp_path / "hf")
    assert isinstance(seen[0]["x"], torch.Tensor) and seen[0]["x"].dtype == torch.float32
    assert seen[0]["y"].dtype == torch.int64
    reference, _ = fit(TensorDataset(x, y), tmp_path / "tensors")
    # Same samples in the same shuffled order: the same weights, bit for bit.
    for a, b in zip(trainer.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.equal(a, b)


def write_jsonl(path, count):
    generator = torch.Generator().manual_seed(5)
    with path.open("w") as file:
        for i in range(count):
            features = torch.randn(4, generator=generator).tolist()
            file.write(json.dumps({"id": i, "x": features, "y": int(features[0] > 0)}) + "\n")


def test_a_streaming_dataset_from_json_lines_trains_and_shards_per_process(tmp_path):
    path = tmp_path / "train.jsonl"
    write_jsonl(path, 50)
    stream = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)
    assert isinstance(stream, datasets.IterableDataset)

    class Linear(DictClassifier):
        def training_step(self, batch):
            return F.cross_entropy(self.model(batch["x"]), batch["y"])

    torch.manual_seed(0)
    batches = Batches()
    trainer = Linear(torch.nn.Linear(4, 2), train_data=stream, batch_size=8, max_epochs=3, output_dir=tmp_path,
                     callbacks=[batches], trackers=[], progress_bar=False, checkpoint=False)
    trainer.fit()
    ids = [int(i) for batch in batches.seen for i in batch["id"]]
    assert ids == list(range(50)) * 3  # every example once per epoch, in file order (a stream is not shuffled)
    assert trainer.global_step == 21  # 7 batches an epoch, the last one short
    # Per process: each of two processes reads its own part of the stream, together all of it, once.
    stream2 = datasets.load_dataset("json", data_files=[str(path)], split="train", streaming=True).with_format("torch")
    parts = []
    for rank in range(2):
        loader = PreparedDataLoader(DataLoader(stream2, batch_size=4), sharding=Sharding(2, rank))
        parts.append([int(i) for batch in loader for i in batch["id"]])
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == list(range(50))


def test_tokenised_examples_are_padded_per_batch():
    collate = PaddingCollator(pad_token_id=7)
    batch = collate([{"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [1, 2, 3], "score": 0.5},
                     {"input_ids": torch.tensor([4]), "attention_mask": [1], "labels": [4], "score": 1.5}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    assert batch["score"].tolist() == [0.5, 1.5]
    left = PaddingCollator(pad_token_id=0, padding_side="left", pad_to_multiple_of=4)([{"input_ids": [5, 6]}])
    assert left["input_ids"].tolist() == [[0, 0, 5, 6]]
