"""The calls of Accelerate's examples/by_feature/gradient_accumulation.py, made from the trainer paths, on 1 or 2 processes.

Written for this project: the Accelerator calls (``Accelerator(gradient_accumulation_steps=...)``,
``with accelerator.accumulate(model)`` around every step, the optimizer and scheduler stepped on
every batch), their order and their arguments are upstream's; only the hub loads come from
``offline``. Upstream's TESTING_MOCKED_DATALOADERS switch is left out. Changed values, so that the
tiny model learns in seconds: lr 2e-5 -> 5e-3, num_epochs 3 -> 16, num_warmup_steps 100 -> 3.

Checks: ``accelerator.sync_gradients`` is True on every ``gradient_accumulation_steps``-th batch and
on the last batch of each epoch, and only there; the optimizer really steps only then (Adam's step
count after each epoch); the training loss falls; ``gather_for_metrics`` returns one prediction per
validation sample.
"""

import argparse
import sys

import torch
from offline import AutoModelForSequenceClassification, AutoTokenizer, evaluate, load_dataset
from torch.optim import AdamW
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup, set_seed

from trainer import Accelerator, DistributedType

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


def adam_steps(optimizer):
    return max((int(state["step"]) for state in optimizer.state.values() if "step" in state), default=0)


def training_function(config, args):
    gradient_accumulation_steps = int(args.gradient_accumulation_steps)
    accelerator = Accelerator(
        cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps
    )
    if accelerator.distributed_type == DistributedType.XLA and gradient_accumulation_steps > 1:
        raise NotImplementedError("Gradient accumulation on XLA devices is not supported here; pass 1.")
    lr = config["lr"]
    num_epochs = int(config["num_epochs"])
    seed = int(config["seed"])
    batch_size = int(config["batch_size"])

    metric = evaluate.load("glue", "mrpc")

    set_seed(seed)
    train_dataloader, eval_dataloader = get_dataloaders(accelerator, batch_size)
    model = AutoModelForSequenceClassification.from_pretrained("bert-base-cased", return_dict=True)
    model = model.to(accelerator.device)
    optimizer = AdamW(params=model.parameters(), lr=lr)
    lr_scheduler = get_linear_schedule_with_warmup(
        optimizer=optimizer,
        num_warmup_steps=3,
        num_training_steps=(len(train_dataloader) * num_epochs),
    )

    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )

    batches = len(train_dataloader)
    expected_syncs = [step for step in range(batches) if (step + 1) % gradient_accumulation_steps == 0 or step == batches - 1]
    epoch_losses = []
    for epoch in range(num_epochs):
        model.train()
        losses, syncs = [], []
        for step, batch in enumerate(train_dataloader):
            batch.to(accelerator.device)
            with accelerator.accumulate(model):
                output = model(**batch)
                loss = output.loss
                losses.append(loss.item())
                if accelerator.sync_gradients:
                    syncs.append(step)
                accelerator.backward(loss)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
        epoch_losses.append(sum(losses) / len(losses))
        assert syncs == expected_syncs, (epoch, syncs, expected_syncs)
        assert adam_steps(optimizer) == (epoch + 1) * len(expected_syncs), (epoch, adam_steps(optimizer))

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
    accelerator.end_training()

    assert epoch_losses[-1] < 0.75 * epoch_losses[0], epoch_losses
    sys.stdout.write(f"GRADIENT_ACCUMULATION OK rank {accelerator.process_index} "
                     f"optimizer steps per epoch {len(expected_syncs)} of {batches} batches\n")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description="by_feature/gradient_accumulation.py's calls, from trainer.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16", "fp8"])
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    config = {"lr": 5e-3, "num_epochs": 16, "seed": 42, "batch_size": 16}
    training_function(config, args)


if __name__ == "__main__":
    main()
