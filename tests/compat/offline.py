"""Offline stand-ins for the hub loads of Accelerate's example scripts, with the same call shapes.

The compat scripts import ``load_dataset``, ``AutoTokenizer``, ``AutoModelForSequenceClassification``,
``AutoModelForCausalLM`` and ``evaluate`` from here instead of from datasets/transformers/evaluate, and
then call them exactly as the upstream scripts do (``AutoTokenizer.from_pretrained("bert-base-cased")``,
``load_dataset("nyu-mll/glue", "mrpc")``, ``evaluate.load("glue", "mrpc")``). What comes back is real:
a ``datasets.DatasetDict``, a ``transformers`` fast tokenizer built here from a word list, a small
``BertForSequenceClassification`` / ``LlamaForCausalLM`` built from a config, and ``evaluate.load`` of a
metric script kept next to this file. Only the hub download is replaced.

The MRPC-like data is learnable: a pair is a paraphrase (label 1) when the second sentence is the
first with two words swapped, and not one (label 0) when it is another sentence.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import datasets
import evaluate as _evaluate
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [f"w{i}" for i in range(120)]
TRAIN_SIZE = int(os.environ.get("COMPAT_TRAIN_SIZE", "192"))
VALIDATION_SIZE = int(os.environ.get("COMPAT_VALIDATION_SIZE", "70"))  # not a multiple of 2 x 32: the last batch is short


def _sentence(rng: random.Random) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(5, 10))]


def _mrpc_split(size: int, seed: int) -> datasets.Dataset:
    rng = random.Random(seed)
    rows: dict[str, list[Any]] = {"sentence1": [], "sentence2": [], "label": [], "idx": []}
    for index in range(size):
        first = _sentence(rng)
        label = index % 2
        if label:
            second = list(first)
            i, j = rng.sample(range(len(second)), 2)
            second[i], second[j] = second[j], second[i]
        else:
            second = _sentence(rng)
        rows["sentence1"].append(" ".join(first))
        rows["sentence2"].append(" ".join(second))
        rows["label"].append(label)
        rows["idx"].append(index)
    return datasets.Dataset.from_dict(rows)


def _text_split(size: int, seed: int) -> datasets.Dataset:
    rng = random.Random(seed)
    # Counting sentences ("w3 w4 w5 ...") a causal model learns quickly; some lines are empty as in wikitext.
    lines = []
    for index in range(size):
        start = rng.randrange(len(WORDS) - 12)
        lines.append("" if index % 7 == 0 else " ".join(WORDS[start:start + rng.randint(4, 12)]))
    return datasets.Dataset.from_dict({"text": lines})


def load_dataset(path: str, name: str | None = None, **kwargs: Any) -> datasets.DatasetDict:
    """``datasets.load_dataset`` for the two hub datasets the examples use, built locally."""
    if path.endswith("glue") and name == "mrpc":
        return datasets.DatasetDict({"train": _mrpc_split(TRAIN_SIZE, 0), "validation": _mrpc_split(VALIDATION_SIZE, 1),
                                     "test": _mrpc_split(VALIDATION_SIZE, 2)})
    if path.endswith("wikitext"):
        return datasets.DatasetDict({"train": _text_split(TRAIN_SIZE, 3), "validation": _text_split(VALIDATION_SIZE, 4),
                                     "test": _text_split(VALIDATION_SIZE, 5)})
    raise ValueError(f"offline.load_dataset has no local copy of {path!r} {name!r}")


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]", model_max_length=128,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


class AutoTokenizer:
    @staticmethod
    def from_pretrained(name: str, **kwargs: Any) -> PreTrainedTokenizerFast:
        """A word-level tokenizer over the local vocabulary (BERT's special tokens, pair template)."""
        return _tokenizer()


def _fixed_init(build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)  # the same weights on every process and every call, like a downloaded checkpoint
        return build()


class AutoModelForSequenceClassification:
    @staticmethod
    def from_pretrained(name: str, return_dict: bool = True, **kwargs: Any) -> BertForSequenceClassification:
        """A 2-layer BERT classifier from a config, the same weights every time."""
        config = BertConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=128, num_labels=2,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, return_dict=return_dict)
        return _fixed_init(lambda: BertForSequenceClassification(config))


class AutoModelForCausalLM:
    @staticmethod
    def from_pretrained(name: str, **kwargs: Any) -> LlamaForCausalLM:
        """A 2-layer Llama (SmolLM's architecture) from a config, the same weights every time."""
        config = LlamaConfig(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                             max_position_embeddings=128, pad_token_id=0)
        return _fixed_init(lambda: LlamaForCausalLM(config))


class evaluate:  # noqa: N801 - stands where the module name stands in the upstream scripts
    @staticmethod
    def load(path: str, config_name: str | None = None, **kwargs: Any) -> Any:
        """``evaluate.load`` of the local metric script for ``("glue", "mrpc")``."""
        if path != "glue":
            raise ValueError(f"offline.evaluate has no local metric {path!r}")
        # In memory: on disk the processes' metric files share one lock, and evaluate waits a second for it.
        kwargs.setdefault("keep_in_memory", True)
        return _evaluate.load(str(HERE / "metrics" / "glue" / "glue.py"), config_name, **kwargs)
