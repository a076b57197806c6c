"""Fine-tuning a small transformers model built from a config (no download), on text tokenised here."""

from __future__ import annotations

import json
import random

import pytest
import torch

from callbacks import Callback
from trainer import Trainer

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

POSITIVE = ["good", "great", "fine", "nice", "happy", "excellent", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "sad", "terrible", "horrible", "nasty", "ugly"]
FILLER = ["the", "movie", "was", "a"]


def sentiment_texts(count: int = 64) -> tuple[list[str], list[int]]:
    rng = random.Random(0)
    texts, labels = [], []
    for i in range(count):
        label = i % 2
        words = (POSITIVE if label else NEGATIVE) + FILLER
        texts.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))))
        labels.append(label)
    return texts, labels


def word_tokenizer(texts: list[str]):
    """A word-level tokenizer trained on the texts themselves (the tokenizers library, no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


class Losses(Callback):
    def __init__(self):
        self.values, self.batches = [], []

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        self.values.append(outputs.item())  # the default training_step returns the model output's .loss
        self.batches.append(batch)


def test_a_small_bert_fine_tunes_with_the_default_training_step(tmp_path):
    texts, labels = sentiment_texts()
    tokenizer = word_tokenizer(texts)
    # Rows keep their "text" column: the Trainer passes the model only the arguments its forward takes.
    data = datasets.Dataset.from_dict({"text": texts, "labels": labels}).map(lambda rows: tokenizer(rows["text"]),
                                                                              batched=True)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                                     num_labels=2, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    losses = Losses()
    trainer = Trainer(model, train_data=data, batch_size=8, max_epochs=4, output_dir=tmp_path, tokenizer=tokenizer,
                      callbacks=[losses], trackers=["csv"], progress_bar=False, checkpoint=False)
    trainer.fit()

    first, last = sum(losses.values[:4]) / 4, sum(losses.values[-4:]) / 4
    assert last < first - 0.2, (first, last)
    batch = losses.batches[0]
    lengths = batch["attention_mask"].sum(dim=1)
    assert batch["input_ids"].shape[1] == lengths.max()  # padded to the batch's longest, not a fixed length
    assert (batch["input_ids"][batch["attention_mask"] == 0] == tokenizer.pad_token_id).all()
    stored = json.loads((tmp_path / "csv" / "config.json").read_text())
    assert stored["model_config"]["vocab_size"] == tokenizer.vocab_size
    assert stored["model_config"]["model_type"] == "bert"
