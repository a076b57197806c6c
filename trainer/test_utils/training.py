"""The tiny regression problem of Accelerate's test scripts: y = a * x + b, learnt by a two-parameter model."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from trainer.utils.enums import DistributedType


class RegressionDataset:
    """``length`` samples ``{"x": x, "y": a * x + b + noise}``, x ~ N(0, 1) and noise ~ N(0, 0.1²), in float32.

    ``seed`` fixes the data; without it every dataset differs. The draws come from a generator of the
    dataset's own, so building one leaves torch's global random state untouched. ``x`` and ``y`` hold
    all the samples (1-D tensors).
    """

    def __init__(self, a: float = 2, b: float = 3, length: int = 64, seed: int | None = None) -> None:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        self.length = length
        self.x = torch.randn(length, generator=generator, dtype=torch.float32)
        self.y = a * self.x + b + torch.randn(length, generator=generator, dtype=torch.float32) * 0.1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class RegressionModel(torch.nn.Module):
    """``forward(x) = x * a + b`` with scalar parameters ``a`` and ``b`` (float32, from the given starting values).

    The first forward prints the parameter and input dtypes (what a mixed-precision check looks at).
    ``double_output`` is accepted for call compatibility and changes nothing.
    """

    def __init__(self, a: float = 0, b: float = 0, double_output: bool = False) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a).float())
        self.b = torch.nn.Parameter(torch.tensor(b).float())
        self.first_batch = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first_batch:
            print(f"Model dtype: {self.a.dtype}, {self.b.dtype}. Input dtype: {x.dtype}")
            self.first_batch = False
        return x * self.a + self.b


class RegressionModel4XPU(torch.nn.Module):
    """``RegressionModel`` with two-element parameters ``a`` and ``b`` (starting at [2, 3]) of which the first
    entries compute ``x * a[0] + b[0]``: a model whose parameters are not scalars."""

    def __init__(self, a: float = 0, b: float = 0, double_output: bool = False) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([2, 3]).float())
        self.b = torch.nn.Parameter(torch.tensor([2, 3]).float())
        self.first_batch = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first_batch:
            print(f"Model dtype: {self.a.dtype}, {self.b.dtype}. Input dtype: {x.dtype}")
            self.first_batch = False
        return x * self.a[0] + self.b[0]


_MRPC_FILES = {"train": "tests/test_samples/MRPC/train.csv", "validation": "tests/test_samples/MRPC/dev.csv"}


def mocked_dataloaders(accelerator: Any, batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    """Train (shuffled, batches of 2) and validation (batches of 1) loaders over the MRPC sample CSVs under
    ``tests/test_samples/MRPC`` of the working directory, tokenized with ``bert-base-cased``.

    Needs ``datasets`` and ``transformers`` (and the tokenizer, from the hub or its cache); ``batch_size`` is
    accepted for call compatibility. On XLA, batches are padded to 128 tokens, elsewhere to their longest.
    """
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("bert-base-cased")
    raw = load_dataset("csv", data_files=_MRPC_FILES)
    label_ids = {label: i for i, label in enumerate(raw["train"].unique("label"))}

    def tokenize(examples: dict[str, list[Any]]) -> Any:
        encoded = tokenizer(examples["sentence1"], examples["sentence2"], truncation=True, max_length=None,
                            padding="max_length")
        if "label" in examples:
            encoded["labels"] = [label_ids[label] for label in examples["label"]]
        return encoded

    tokenized = raw.map(tokenize, batched=True, remove_columns=["sentence1", "sentence2", "label"])

    def collate(examples: list[dict[str, Any]]) -> Any:
        if accelerator.distributed_type == DistributedType.XLA:
            return tokenizer.pad(examples, padding="max_length", max_length=128, return_tensors="pt")
        return tokenizer.pad(examples, padding="longest", return_tensors="pt")

    train = DataLoader(tokenized["train"], shuffle=True, collate_fn=collate, batch_size=2)
    evaluation = DataLoader(tokenized["validation"], shuffle=False, collate_fn=collate, batch_size=1)
    return train, evaluation


def mocked_dataloaders_for_autoregressive_models(accelerator: Any, batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    """Causal-LM train and validation loaders (batches of 2 and 1, unshuffled) over the first sentences of the MRPC
    sample CSVs, tokenized with ``HuggingFaceTB/SmolLM-360M`` (its EOS as padding).

    Each batch is padded to one more than its longest row (128 on XLA; to a multiple of 16 under fp8 and of 8
    under other mixed precision), then shifted: ``labels`` are the next tokens, with padding as -100.
    """
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM-360M")
    tokenizer.pad_token = tokenizer.eos_token
    raw = load_dataset("csv", data_files=_MRPC_FILES)

    def tokenize(examples: dict[str, list[Any]]) -> Any:
        return tokenizer(examples["sentence1"], truncation=True, max_length=None, return_attention_mask=False)

    with accelerator.main_process_first():
        tokenized = raw.map(tokenize, batched=True, remove_columns=["sentence1", "sentence2", "label"])

    def collate(examples: list[dict[str, Any]]) -> Any:
        if accelerator.distributed_type == DistributedType.XLA:
            longest = 128
        else:
            longest = max(len(example["input_ids"]) for example in examples)
        multiple = {"fp8": 16, "no": None}.get(accelerator.mixed_precision, 8)
        batch = tokenizer.pad(examples, padding="max_length", max_length=longest + 1, pad_to_multiple_of=multiple,
                              return_tensors="pt")
        batch["labels"] = batch["input_ids"][:, 1:]
        batch["input_ids"] = batch["input_ids"][:, :-1]
        if "attention_mask" in batch:
            batch["attention_mask"] = batch["attention_mask"][:, :-1]
        batch["labels"] = torch.where(batch["labels"] == tokenizer.pad_token_id, -100, batch["labels"])
        return batch

    train = DataLoader(tokenized["train"], shuffle=False, collate_fn=collate, batch_size=2)
    evaluation = DataLoader(tokenized["validation"], shuffle=False, collate_fn=collate, batch_size=1)
    return train, evaluation
