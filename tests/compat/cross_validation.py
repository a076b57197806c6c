"""The calls of Accelerate's examples/by_feature/cross_validation.py, made from the trainer paths, on 1 or 2 processes.

Written for this project: the Accelerator calls (one ``prepare`` per fold on the same Accelerator,
``gather_for_metrics`` of logits, ``free_memory(model, optimizer)`` between folds), their order and
their arguments are upstream's; only the hub loads come from ``offline``. Changed values, so that
the tiny model learns in seconds: lr 2e-5 -> 2e-3, num_epochs 3 -> 12, num_warmup_steps 100 -> 3.

Checks: in every fold the training loss falls and each validation sample comes back from
``gather_for_metrics`` exactly once, in data set order; the test loader, which upstream does not
prepare, is read whole by every process, so its gathered batches are one copy per process;
``free_memory`` hands back one None per object; there is one set of test predictions per fold.
The tests run it with COMPAT_TRAIN_SIZE=288, so that each fold trains on 192 pairs.
"""

import argparse
import sys

import numpy as np
import torch
from datasets import DatasetDict
from offline import AutoModelForSequenceClassification, AutoTokenizer, evaluate, load_dataset
from sklearn.model_selection import StratifiedKFold
from torch.optim import AdamW
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup, set_seed

from trainer import Accelerator, DistributedType

MAX_GPU_BATCH_SIZE = 16
EVAL_BATCH_SIZE = 32


def get_fold_dataloaders(
    accelerator: Accelerator, dataset: DatasetDict, train_idxs: list[int], valid_idxs: list[int], batch_size: int = 16
):
    """Train, validation and test loaders for one fold: the fold's split of the train set, and the validation set."""
    tokenizer = AutoTokenizer.from_pretrained("bert-base-cased")
    datasets = DatasetDict(
        {
            "train": dataset["train"].select(train_idxs),
            "validation": dataset["train"].select(valid_idxs),
            "test": dataset["validation"],
        }
    )

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
    test_dataloader = DataLoader(
        tokenized_datasets["test"], shuffle=False, collate_fn=collate_fn, batch_size=EVAL_BATCH_SIZE
    )
    return train_dataloader, eval_dataloader, test_dataloader


def training_function(config, args):
    test_predictions = []
    datasets = load_dataset("nyu-mll/glue", "mrpc")
    kfold = StratifiedKFold(n_splits=int(args.num_folds))
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

    folds = kfold.split(np.zeros(datasets["train"].num_rows), datasets["train"]["label"])
    test_references = []
    for i, (train_idxs, valid_idxs) in enumerate(folds):
        train_dataloader, eval_dataloader, test_dataloader = get_fold_dataloaders(
            accelerator,
            datasets,
            train_idxs,
            valid_idxs,
        )
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

        epoch_losses = []
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
            valid_references = []
            for _step, batch in enumerate(eval_dataloader):
                batch.to(accelerator.device)
                with torch.no_grad():
                    outputs = model(**batch)
                predictions = outputs.logits.argmax(dim=-1)
                predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
                valid_references += references.tolist()
                metric.add_batch(
                    predictions=predictions,
                    references=references,
                )

            eval_metric = metric.compute()
            accelerator.print(f"epoch {epoch}:", eval_metric)
            expected = [int(datasets["train"][int(index)]["label"]) for index in valid_idxs]
            assert valid_references == expected, (i, epoch, len(valid_references), len(expected))
        assert epoch_losses[-1] < 0.75 * epoch_losses[0], (i, epoch_losses)

        fold_predictions = []
        for _step, batch in enumerate(test_dataloader):
            batch.to(accelerator.device)
            with torch.no_grad():
                outputs = model(**batch)
            predictions = outputs.logits
            predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
            # the test loader is not prepared (as upstream): every process reads the whole of it,
            # so each gathered batch is num_processes copies of this process's batch
            assert references.tolist() == batch["labels"].tolist() * accelerator.num_processes, references
            fold_predictions.append(predictions.cpu())
            if i == 0:
                test_references.append(references.cpu())
        test_predictions.append(torch.cat(fold_predictions, dim=0))
        assert len(test_predictions[-1]) == accelerator.num_processes * len(datasets["validation"]), i
        freed = accelerator.free_memory(model, optimizer)
        assert list(freed) == [None, None], freed
        model, optimizer = freed
    test_references = torch.cat(test_references, dim=0)
    assert sorted(test_references.tolist()) == sorted(list(datasets["validation"]["label"]) * accelerator.num_processes)
    preds = torch.stack(test_predictions, dim=0).sum(dim=0).div(int(args.num_folds)).argmax(dim=-1)
    test_metric = metric.compute(predictions=preds, references=test_references)
    accelerator.print("Average test metrics from all folds:", test_metric)
    accelerator.end_training()

    assert len(test_predictions) == int(args.num_folds), len(test_predictions)
    sys.stdout.write(f"CROSS_VALIDATION OK rank {accelerator.process_index}\n")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description="by_feature/cross_validation.py's calls, from trainer.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16", "fp8"])
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--num_folds", type=int, default=3)
    args = parser.parse_args()
    config = {"lr": 2e-3, "num_epochs": 12, "seed": 42, "batch_size": 16}
    training_function(config, args)


if __name__ == "__main__":
    main()
