"""The calls of Accelerate's examples/by_feature/schedule_free.py, made from the trainer paths, on local data.

Same Accelerator calls, order and arguments as upstream, with schedulefree's AdamWScheduleFree
switched between train and eval mode through the prepared optimizer; datasets, tokenizer, model
and metric come from ``offline``. Changed values: lr 2e-5 -> 2e-3, warmup_steps 100 -> 2.
Checks: ``optimizer.train()``/``optimizer.eval()`` reach schedulefree (its ``train_mode`` flag
flips, and eval mode moves the weights to the averaged sequence), the training loss falls, the
gathered evaluation covers each validation sample once, and the model beats chance.
"""

import argparse

import torch
from compat_checks import check_accuracy, check_every_sample_once, check_loss_fell, say, validation_labels
from offline import AutoModelForSequenceClassification, AutoTokenizer, evaluate, load_dataset
from torch.utils.data import DataLoader
from transformers import set_seed

from trainer import Accelerator, DistributedType
from trainer.utils import is_schedulefree_available

if is_schedulefree_available():
    import schedulefree
else:
    raise ImportError("This script needs the schedulefree package: pip install schedulefree")

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

    train_dataloader = DataLoader(tokenized_datasets["train"], shuffle=True, collate_fn=collate_fn, batch_size=batch_size,
                                  drop_last=True)
    eval_dataloader = DataLoader(tokenized_datasets["validation"], shuffle=False, collate_fn=collate_fn,
                                 batch_size=EVAL_BATCH_SIZE, drop_last=(accelerator.mixed_precision == "fp8"))
    return train_dataloader, eval_dataloader


def check_mode(optimizer, model, train_mode):
    """schedulefree's own flag says which mode the wrapped optimizer is in."""
    modes = {group["train_mode"] for group in optimizer.param_groups}
    assert modes == {train_mode}, f"schedulefree's train_mode is {modes}, expected {train_mode}"


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
    optimizer = schedulefree.AdamWScheduleFree(
        model.parameters(),
        lr=lr,
        warmup_steps=2,
    )

    model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader
    )

    expected_labels = validation_labels()
    epoch_losses = []
    for epoch in range(num_epochs):
        model.train()
        optimizer.train()
        check_mode(optimizer, model, True)
        epoch_losses.append([])
        for step, batch in enumerate(train_dataloader):
            batch.to(accelerator.device)
            outputs = model(**batch)
            loss = outputs.loss
            loss = loss / gradient_accumulation_steps
            accelerator.backward(loss)
            if step % gradient_accumulation_steps == 0:
                optimizer.step()
                optimizer.zero_grad()
            epoch_losses[-1].append(loss.item())

        model.eval()
        train_weights = [p.detach().clone() for p in model.parameters()]
        optimizer.eval()
        check_mode(optimizer, model, False)
        moved = any(not torch.equal(p, w) for p, w in zip(model.parameters(), train_weights))
        assert moved, "optimizer.eval() did not move the weights to schedulefree's averaged sequence"
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
    check_loss_fell(epoch_losses[0], epoch_losses[-1])
    check_accuracy(eval_metric, 0.6)
    accelerator.end_training()
    say(accelerator, "SCHEDULE_FREE")


def main():
    parser = argparse.ArgumentParser(description="Schedule-free AdamW on MRPC (compat script).")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16", "fp8"])
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    config = {"lr": 2e-3, "num_epochs": 3, "seed": 42, "batch_size": 16}
    training_function(config, args)


if __name__ == "__main__":
    main()
