"""The calls of Accelerate's examples/by_feature/tracking.py, made from the trainer paths, on local data.

Same Accelerator/init_trackers/log calls, order and arguments as upstream (``log_with="all"``:
every tracker whose package is installed, each offline here); datasets, tokenizer, model and
metric come from ``offline``. Changed values: lr 2e-5 -> 1e-3, warmup 100 -> 2 steps.
Checks: with ``--with_tracking`` every installed tracker ran, and TensorBoard's own reader
(``EventAccumulator``) reads back each logged value at its epoch from the event file under
``--project_dir``; the training loss falls; the gathered evaluation covers each validation sample once.
"""

import argparse
import glob
import os

import torch
from compat_checks import check_every_sample_once, check_loss_fell, say, validation_labels
from offline import AutoModelForSequenceClassification, AutoTokenizer, evaluate, load_dataset
from torch.optim import AdamW
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup, set_seed

from trainer import Accelerator, DistributedType

MAX_GPU_BATCH_SIZE = 16
EVAL_BATCH_SIZE = 32


def get_dataloaders(accelerator: Accelerator, batch_size: int = 16):
    """Tokenized MRPC train/validation loaders, padded per batch."""
    tokenizer = AutoTokenizer.from_pretrained("bert-base-cased")
    datasets = load_dataset("nyu-mll/glue", "mrpc")

    def tokenize_function(examples):
        return tokenizer(examples["sentence1"], examples["sentence2"], truncation=True, max_length=None)

    with accelerator.main_process_first():
        tokenized_datasets = datasets.map(tokenize_function, batched=True, remove_columns=["idx", "sentence1", "sentence2"])
    tokenized_datasets = tokenized_datasets.rename_column("label", "labels")

    def collate_fn(examples):
        max_length = 128 if accelerator.distributed_type == DistributedType.XLA else None
        if accelerator.mixed_precision == "fp8":
            pad_to_multiple_of = 16
        elif accelerator.mixed_precision != "no":
            pad_to_multiple_of = 8
        else:
            pad_to_multiple_of = None
        return tokenizer.pad(examples, padding="longest", max_length=max_length, pad_to_multiple_of=pad_to_multiple_of,
                             return_tensors="pt")

    train_dataloader = DataLoader(tokenized_datasets["train"], shuffle=True, collate_fn=collate_fn, batch_size=batch_size)
    eval_dataloader = DataLoader(tokenized_datasets["validation"], shuffle=False, collate_fn=collate_fn,
                                 batch_size=EVAL_BATCH_SIZE)
    return train_dataloader, eval_dataloader


def check_tensorboard(project_dir, run, logged):
    """TensorBoard's reader finds every logged value at its step in the run's event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(project_dir, "**", "events.out.tfevents.*"), recursive=True)
    runs = {os.path.dirname(path) for path in files if run in os.path.relpath(path, project_dir)}
    assert len(runs) == 1, f"expected one TensorBoard run named {run!r} under {project_dir}, found {sorted(runs)}"
    events = EventAccumulator(runs.pop())
    events.Reload()
    for key in logged[0]:
        read = [(scalar.step, scalar.value) for scalar in events.Scalars(key)]
        expected = [(step, float(values[key])) for step, values in enumerate(logged)]
        assert len(read) == len(expected), f"{key}: read {read}, logged {expected}"
        for (step, value), (want_step, want) in zip(read, expected):
            assert step == want_step and abs(value - want) <= 1e-6 * max(1.0, abs(want)), (key, read, expected)


def training_function(config, args):
    if args.with_tracking:
        accelerator = Accelerator(
            cpu=args.cpu, mixed_precision=args.mixed_precision, log_with="all", project_dir=args.project_dir
        )
    else:
        accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision)
    lr = config["lr"]
    num_epochs = int(config["num_epochs"])
    seed = int(config["seed"])
    batch_size = int(config["batch_size"])
    set_seed(seed)

    train_dataloader, eval_dataloader = get_dataloaders(accelerator, batch_size)
    metric = evaluate.load("glue", "mrpc")

    gradient_accumulation_steps = 1
    if batch_size > MAX_GPU_BATCH_SIZE and accelerator.distributed_type != DistributedType.XLA:
        gradient_accumulation_steps = batch_size // MAX_GPU_BATCH_SIZE
        batch_size = MAX_GPU_BATCH_SIZE

    model = AutoModelForSequenceClassification.from_pretrained("bert-base-cased", return_dict=True)
    model = model.to(accelerator.device)
    optimizer = AdamW(params=model.parameters(), lr=lr)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer,
        num_warmup_steps=2,
        num_training_steps=(len(train_dataloader) * num_epochs) // gradient_accumulation_steps,
    )

    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )

    if args.with_tracking:
        run = os.path.split(__file__)[-1].split(".")[0]
        accelerator.init_trackers(run, config)

    expected_labels = validation_labels()
    epoch_losses, logged = [], []
    for epoch in range(num_epochs):
        model.train()
        if args.with_tracking:
            total_loss = 0
        epoch_losses.append([])
        for step, batch in enumerate(train_dataloader):
            batch.to(accelerator.device)
            outputs = model(**batch)
            loss = outputs.loss
            if args.with_tracking:
                total_loss += loss.detach().float()
            loss = loss / gradient_accumulation_steps
            accelerator.backward(loss)
            if step % gradient_accumulation_steps == 0:
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            epoch_losses[-1].append(loss.item())

        model.eval()
        references_seen = []
        for _step, batch in enumerate(eval_dataloader):
            batch.to(accelerator.device)
            with torch.no_grad():
                outputs = model(**batch)
            predictions = outputs.logits.argmax(dim=-1)
            predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
            metric.add_batch(
                predictions=predictions,
                references=references,
            )
            references_seen.append(references)

        eval_metric = metric.compute()
        accelerator.print(f"epoch {epoch}:", eval_metric)
        check_every_sample_once(references_seen, expected_labels)

        if args.with_tracking:
            values = {
                "accuracy": eval_metric["accuracy"],
                "f1": eval_metric["f1"],
                "train_loss": total_loss.item() / len(train_dataloader),
                "epoch": epoch,
            }
            accelerator.log(values, step=epoch)
            logged.append(values)

    if args.with_tracking:
        from trainer.callbacks.trackers.registry import installed_trackers

        names = sorted(tracker.name for tracker in accelerator.trackers)
        assert names == sorted(installed_trackers()), f"log_with='all' started {names}"
    accelerator.end_training()
    check_loss_fell(epoch_losses[0], epoch_losses[-1])
    if args.with_tracking and accelerator.is_main_process:
        check_tensorboard(args.project_dir, run, logged)
    say(accelerator, "TRACKING")


def main():
    parser = argparse.ArgumentParser(description="MRPC training with experiment tracking (compat script).")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16", "fp8"])
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--with_tracking", action="store_true")
    parser.add_argument("--project_dir", type=str, default="logs")
    args = parser.parse_args()
    config = {"lr": 1e-3, "num_epochs": 3, "seed": 42, "batch_size": 16}
    training_function(config, args)


if __name__ == "__main__":
    main()
