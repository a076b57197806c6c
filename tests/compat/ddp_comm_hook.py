"""The calls of Accelerate's examples/by_feature/ddp_comm_hook.py, made from the trainer paths, on local data.

Same DDPCommunicationHookType/DistributedDataParallelKwargs/Accelerator calls, order and arguments
as upstream; datasets, tokenizer, model and metric come from ``offline``. Changed values: lr
2e-5 -> 1e-3, warmup 100 -> 2 steps. Checks: on several processes the prepared model is a
DistributedDataParallel whose registered communication hook (DDP's own record of it) is the one
asked for, wrapped as asked; on one process there is nothing to hook; the processes hold the same
weights after training; the training loss falls; the gathered evaluation covers each validation
sample once.
"""

import argparse

import torch
from compat_checks import (
    check_every_sample_once,
    check_loss_fell,
    check_same_on_every_process,
    say,
    validation_labels,
)
from offline import AutoModelForSequenceClassification, AutoTokenizer, evaluate, load_dataset
from torch.nn.parallel import DistributedDataParallel
from torch.optim import AdamW
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup, set_seed

from trainer import Accelerator, DistributedType
from trainer.utils import DDPCommunicationHookType, DistributedDataParallelKwargs

MAX_GPU_BATCH_SIZE = 16
EVAL_BATCH_SIZE = 32

# The name DDP records for each hook (torch.distributed.algorithms.ddp_comm_hooks), and for its wrappers.
HOOK_NAMES = {"fp16": "fp16_compress_hook", "bf16": "bf16_compress_hook", "power_sgd": "powerSGD_hook",
              "batched_power_sgd": "batched_powerSGD_hook"}
WRAPPER_NAMES = {"fp16": "fp16_compress_wrapper", "bf16": "bf16_compress_wrapper"}


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


def check_hook(accelerator, model, args):
    """DDP's logging data names the hook that was registered on the prepared model."""
    if accelerator.num_processes == 1:
        assert not isinstance(model, DistributedDataParallel), "one process: the model should not be wrapped in DDP"
        return
    assert isinstance(model, DistributedDataParallel), f"the prepared model is a {type(model).__name__}"
    registered = model._get_ddp_logging_data().get("comm_hook")
    if args.ddp_comm_hook == "no":
        assert not registered, f"no hook was asked for, but {registered!r} is registered"
        return
    assert registered, f"no communication hook is registered (asked for {args.ddp_comm_hook})"
    expected = WRAPPER_NAMES.get(args.ddp_comm_wrapper, HOOK_NAMES[args.ddp_comm_hook])
    assert registered.split(".")[0] == expected, f"registered hook {registered!r}, expected {expected!r}"


def training_function(config, args):
    ddp_comm_hook_type = DDPCommunicationHookType(args.ddp_comm_hook)
    ddp_comm_wrapper = DDPCommunicationHookType(args.ddp_comm_wrapper)
    ddp_kwargs = DistributedDataParallelKwargs(comm_hook=ddp_comm_hook_type, comm_wrapper=ddp_comm_wrapper)
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision, kwargs_handlers=[ddp_kwargs])
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
        num_warmup_steps=2,
        num_training_steps=(len(train_dataloader) * num_epochs),
    )

    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )
    check_hook(accelerator, model, args)

    expected_labels = validation_labels()
    epoch_losses = []
    for epoch in range(num_epochs):
        model.train()
        epoch_losses.append([])
        for _step, batch in enumerate(train_dataloader):
            batch.to(accelerator.device)
            with accelerator.accumulate(model):
                output = model(**batch)
                loss = output.loss
                accelerator.backward(loss)
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
    check_same_on_every_process(accelerator, model)
    check_loss_fell(epoch_losses[0], epoch_losses[-1])
    accelerator.end_training()
    say(accelerator, "DDP_COMM_HOOK")


def main():
    parser = argparse.ArgumentParser(description="MRPC training with a DDP communication hook (compat script).")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16", "fp8"])
    parser.add_argument("--ddp_comm_hook", type=str, default="no",
                        choices=["no", "fp16", "bf16", "power_sgd", "batched_power_sgd"])
    parser.add_argument("--ddp_comm_wrapper", type=str, default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    config = {"lr": 1e-3, "num_epochs": 3, "seed": 42, "batch_size": 16}
    training_function(config, args)


if __name__ == "__main__":
    main()
