"""The calls of Accelerate's examples/by_feature/multi_process_metrics.py, made from the trainer paths, on 1 or 2 processes.

Written for this project: the Accelerator calls (``gather`` of predictions and labels, then the
duplicates of the last round cut off by hand with ``use_distributed`` and the data set length),
their order and their arguments are upstream's; only the hub loads come from ``offline``.
Upstream's TESTING_MOCKED_DATALOADERS switch is left out. Changed values, so that the tiny model
learns in seconds: lr 2e-5 -> 2e-3, num_epochs 3 -> 12, num_warmup_steps 100 -> 3.

Checks: every epoch the labels handed to the metric are the validation set's, each sample exactly
once and in data set order (70 samples: on 2 processes the last round is padded, and the cut must
remove exactly the padding); the training loss falls; the best eval accuracy beats chance (a
constant answer scores exactly 0.5).
"""

import argparse
import sys

import torch
from offline import AutoModelForSequenceClassification, AutoTokenizer, evaluate, load_dataset
from torch.optim import AdamW
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup, set_seed

from trainer import Accelerator, DistributedType

MAX_GPU_BATCH_SIZE = 16
EVAL_BATCH_SIZE = 32


def get_dataloaders(accelerator: Accelerator, batch_size: int = 16):
    """Train and validation loaders over the tokenized MRPC pairs."""
    tokenizer = AutoTokenizer.from_pretrained("bert-base-cased")
    datasets = load_dataset("nyu-mll/glue", "mrpc")

    def tokenize_function(examples):
        return tokenizer(examples["sentence1"], examples["sentence2"], truncation=True, max_length=None)

    with accelerator.main_process_first():
        tokenized_datasets = datasets.map(
            tokenize_function,
            batched=True,
            remove_columns=["idx", "sentence1", "sentence2"],
        )
    tokenized_datasets = tokenized_datasets.rename_column("label", "labels")

    def collate_fn(examples):
        max_length = 128 if accelerator.distributed_type == DistributedType.XLA else None
        if accelerator.mixed_precision == "fp8":
            pad_to_multiple_of = 16
        elif accelerator.mixed_precision != "no":
            pad_to_multiple_of = 8
        else:
            pad_to_multiple_of = None
        return tokenizer.pad(
            examples,
            padding="longest",
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            return_tensors="pt",
        )

    train_dataloader = DataLoader(
        tokenized_datasets["train"], shuffle=True, collate_fn=collate_fn, batch_size=batch_size
    )
    eval_dataloader = DataLoader(
        tokenized_datasets["validation"], shuffle=False, collate_fn=collate_fn, batch_size=EVAL_BATCH_SIZE
    )
    return train_dataloader, eval_dataloader


def training_function(config, args):
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    lr = config["lr"]
    num_epochs = int(config["num_epochs"])
    seed = int(config["seed"])
    batch_size = int(config["batch_size"])

    metric = evaluate.load("glue", "mrpc")

    gradient_accumulation_steps = 1
    if batch_size > MAX_GPU_BATCH_SIZE and accelerator.distributed_type != DistributedType.XLA:
        gradient_accumulation_steps = batch_size // MAX_GPU_BATCH_SIZE
        batch_size = MAX_GPU_BATCH_SIZE

    set_seed(seed)
    train_dataloader, eval_dataloader = get_dataloaders(accelerator, batch_size)
    model = AutoModelForSequenceClassification.from_pretrained("bert-base-cased", return_dict=True)
    model = model.to(accelerator.device)
    optimizer = AdamW(params=model.parameters(), lr=lr)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer,
        num_warmup_steps=3,
        num_training_steps=(len(train_dataloader) * num_epochs) // gradient_accumulation_steps,
    )

    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )

    expected_labels = list(eval_dataloader.dataset["labels"])
    epoch_losses, accuracies = [], []
    for epoch in range(num_epochs):
        model.train()
        losses = []
        for step, batch in enumerate(train_dataloader):
            batch.to(accelerator.device)
            outputs = model(**batch)
            loss = outputs.loss
            loss = loss / gradient_accumulation_steps
            losses.append(loss.item())
            accelerator.backward(loss)
            if step % gradient_accumulation_steps == 0:
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
        epoch_losses.append(sum(losses) / len(losses))

        model.eval()
        samples_seen = 0
        labels_given = []
        for step, batch in enumerate(eval_dataloader):
            batch.to(accelerator.device)
            with torch.no_grad():
                outputs = model(**batch)
            predictions = outputs.logits.argmax(dim=-1)
            predictions, references = accelerator.gather((predictions, batch["labels"]))
            if accelerator.use_distributed:
                if step == len(eval_dataloader) - 1:
                    predictions = predictions[: len(eval_dataloader.dataset) - samples_seen]
                    references = references[: len(eval_dataloader.dataset) - samples_seen]
                else:
                    samples_seen += references.shape[0]
            labels_given += references.tolist()
            assert len(predictions) == len(references)
            metric.add_batch(
                predictions=predictions,
                references=references,
            )

        eval_metric = metric.compute()
        accelerator.print(f"epoch {epoch}:", eval_metric)
        assert labels_given == expected_labels, (epoch, len(labels_given), len(expected_labels))
        accuracies.append(eval_metric["accuracy"])
    accelerator.end_training()

    assert accelerator.use_distributed == (accelerator.num_processes > 1)
    assert epoch_losses[-1] < 0.75 * epoch_losses[0], epoch_losses
    assert max(accuracies) > 0.5, accuracies
    sys.stdout.write(f"MULTI_PROCESS_METRICS OK rank {accelerator.process_index} samples {len(expected_labels)}\n")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description="by_feature/multi_process_metrics.py's calls, from trainer.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16", "fp8"])
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    config = {"lr": 2e-3, "num_epochs": 12, "seed": 42, "batch_size": 16}
    training_function(config, args)


if __name__ == "__main__":
    main()
