"""The calls of Accelerate's examples/by_feature/memory.py, made from the trainer paths, on 1 or 2 processes.

Written for this project: the Accelerator calls (``find_executable_batch_size`` around the whole
training, ``free_memory`` before each attempt, a fresh ``prepare`` each time), their order and
their arguments are upstream's; only the hub loads come from ``offline``. Upstream's
TESTING_MOCKED_DATALOADERS switch is left out. A CPU does not run out of memory on this model, so a
forward pre-hook on the model raises torch's ``OutOfMemoryError("CUDA out of memory. ...")`` for
batches over 12 samples, as a device with less memory would. Changed values, so that the tiny
model learns in seconds: lr 2e-5 -> 2e-3, num_epochs 3 -> 12, num_warmup_steps 100 -> 3.

Checks: the batch sizes tried are 16, 14, 12 (the 0.9 shrink) and the last one trains to the end;
the training loss falls; ``gather_for_metrics`` returns one prediction per validation sample.
"""

import argparse
import sys

import torch
from offline import AutoModelForSequenceClassification, AutoTokenizer, evaluate, load_dataset
from torch.optim import AdamW
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup, set_seed

from trainer import Accelerator, DistributedType
from trainer.utils import find_executable_batch_size

MAX_GPU_BATCH_SIZE = 16
EVAL_BATCH_SIZE = 32
SIMULATED_MEMORY_LIMIT = 12  # training samples per forward; the eval batches (32) run without gradients


def simulated_memory_limit(module, args, kwargs):
    if module.training and kwargs["input_ids"].shape[0] > SIMULATED_MEMORY_LIMIT:
        raise torch.OutOfMemoryError(f"CUDA out of memory. (simulated: more than {SIMULATED_MEMORY_LIMIT} samples)")


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
    tried, epoch_losses = [], []

    @find_executable_batch_size(starting_batch_size=batch_size)
    def inner_training_loop(batch_size):
        nonlocal accelerator
        tried.append(batch_size)
        epoch_losses.clear()
        accelerator.free_memory()

        set_seed(seed)

        model = AutoModelForSequenceClassification.from_pretrained("bert-base-cased", return_dict=True)
        model.register_forward_pre_hook(simulated_memory_limit, with_kwargs=True)
        model = model.to(accelerator.device)
        optimizer = AdamW(params=model.parameters(), lr=lr)
        train_dataloader, eval_dataloader = get_dataloaders(accelerator, batch_size)

        lr_scheduler = get_linear_schedule_with_warmup(
            optimizer=optimizer,
            num_warmup_steps=3,
            num_training_steps=(len(train_dataloader) * num_epochs),
        )

        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
            model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
        )

        for epoch in range(num_epochs):
            model.train()
            losses = []
            for _step, batch in enumerate(train_dataloader):
                batch.to(accelerator.device)
                outputs = model(**batch)
                loss = outputs.loss
                losses.append(loss.item())
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            epoch_losses.append(sum(losses) / len(losses))

            model.eval()
            gathered = 0
            for _step, batch in enumerate(eval_dataloader):
                batch.to(accelerator.device)
                with torch.no_grad():
                    outputs = model(**batch)
                predictions = outputs.logits.argmax(dim=-1)
                predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
                gathered += len(predictions)
                metric.add_batch(
                    predictions=predictions,
                    references=references,
                )

            eval_metric = metric.compute()
            accelerator.print(f"epoch {epoch}:", eval_metric)
            assert gathered == len(eval_dataloader.dataset), (epoch, gathered, len(eval_dataloader.dataset))

    inner_training_loop()
    accelerator.end_training()

    assert tried == [16, 14, 12], tried
    assert len(epoch_losses) == int(config["num_epochs"]) and epoch_losses[-1] < 0.75 * epoch_losses[0], epoch_losses
    sys.stdout.write(f"MEMORY OK rank {accelerator.process_index} batch sizes {tried}\n")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description="by_feature/memory.py's calls, from trainer.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16", "fp8"])
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    config = {"lr": 2e-3, "num_epochs": 12, "seed": 42, "batch_size": 16}
    training_function(config, args)


if __name__ == "__main__":
    main()
