"""The calls of Accelerate's examples/by_feature/gradient_accumulation_for_autoregressive_models.py, from trainer.

Same Accelerator calls, order and arguments as upstream (gather of the token counts, the prepared
model's ``no_sync`` on all but the last micro-batch, ``clip_grad_norm_``, ``gather_for_metrics``);
datasets, tokenizer and the causal LM come from ``offline``. Changed values: lr 2e-5 -> 3e-3.
Upstream's evaluation gathers the last training loss (``loss``, not ``eval_loss``); kept as it is.
Checks: every update's ``num_items_in_batch`` is the sum of the processes' label tokens, the
returned gradient norm is a finite number, the processes hold the same weights after each epoch,
and the training and evaluation losses fall.
"""

import argparse
import contextlib
import math
import os

import torch
from compat_checks import check_loss_fell, check_same_on_every_process, mean, say
from offline import AutoModelForCausalLM, AutoTokenizer, load_dataset
from torch.optim import AdamW
from torch.utils.data import DataLoader
from transformers import get_constant_schedule, set_seed

from trainer import Accelerator, DistributedType

EVAL_BATCH_SIZE = 32


def get_dataloaders(accelerator: Accelerator, batch_size: int = 16, max_training_samples=500):
    """Tokenized wikitext loaders; each batch is padded one past its longest line and shifted into labels."""
    tokenizer = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM-360M")
    tokenizer.pad_token = tokenizer.eos_token
    with accelerator.local_main_process_first():
        datasets = load_dataset("Salesforce/wikitext", "wikitext-2-v1")
        datasets["train"] = datasets["train"].select(range(max_training_samples))

    def tokenize_function(examples):
        return tokenizer(examples["text"], truncation=True, max_length=None, return_attention_mask=False)

    with accelerator.main_process_first():
        datasets = datasets.filter(lambda x: len(x) > 0, input_columns="text")
    with accelerator.main_process_first():
        tokenized_datasets = datasets.map(tokenize_function, batched=True, remove_columns=["text"])
    with accelerator.main_process_first():
        tokenized_datasets = tokenized_datasets.filter(lambda x: len(x) > 0, input_columns="input_ids")

    def collate_fn(examples):
        max_length = (
            128
            if accelerator.distributed_type == DistributedType.XLA
            else max([len(e["input_ids"]) for e in examples])
        )
        if accelerator.mixed_precision == "fp8":
            pad_to_multiple_of = 16
        elif accelerator.mixed_precision != "no":
            pad_to_multiple_of = 8
        else:
            pad_to_multiple_of = None
        batch = tokenizer.pad(examples, padding="max_length", max_length=max_length + 1,
                              pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")
        batch["labels"] = batch["input_ids"][:, 1:]
        batch["input_ids"] = batch["input_ids"][:, :-1]
        if "attention_mask" in batch:
            batch["attention_mask"] = batch["attention_mask"][:, :-1]
        batch["labels"] = torch.where(batch["labels"] == tokenizer.pad_token_id, -100, batch["labels"])
        return batch

    train_dataloader = DataLoader(tokenized_datasets["train"], shuffle=False, collate_fn=collate_fn, batch_size=batch_size)
    eval_dataloader = DataLoader(tokenized_datasets["validation"], shuffle=False, collate_fn=collate_fn,
                                 batch_size=EVAL_BATCH_SIZE)
    return train_dataloader, eval_dataloader


def training_function(config, args):
    gradient_accumulation_steps = int(args.gradient_accumulation_steps)
    if args.with_wandb_tracking:
        accelerator = Accelerator(
            cpu=args.cpu,
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=gradient_accumulation_steps,
            log_with="wandb",
        )
    else:
        accelerator = Accelerator(
            cpu=args.cpu, mixed_precision=args.mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps
        )
    if accelerator.distributed_type == DistributedType.XLA and gradient_accumulation_steps > 1:
        raise NotImplementedError("Gradient accumulation on TPUs is not supported: use gradient_accumulation_steps=1")
    lr = config["lr"]
    num_epochs = int(config["num_epochs"])
    seed = int(config["seed"])
    batch_size = int(config["batch_size"])
    max_grad_norm = config["max_grad_norm"]

    if args.with_wandb_tracking:
        run = os.path.split(__file__)[-1].split(".")[0]
        run_name = f"{accelerator.num_processes}GPU-grad{gradient_accumulation_steps}-bs{batch_size}"
        accelerator.init_trackers(
            run,
            config,
            init_kwargs={"wandb": {"name": run_name}},
        )

    set_seed(seed)
    train_dataloader, eval_dataloader = get_dataloaders(accelerator, batch_size)
    model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM-360M")
    model = model.to(accelerator.device)
    optimizer = AdamW(params=model.parameters(), lr=lr)
    lr_scheduler = get_constant_schedule(
        optimizer=optimizer,
    )

    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler
    )

    num_samples_in_epoch = len(train_dataloader)
    remainder = num_samples_in_epoch % gradient_accumulation_steps
    remainder = remainder if remainder != 0 else gradient_accumulation_steps
    total_gradient_updates = math.ceil(num_samples_in_epoch / gradient_accumulation_steps)

    epoch_losses, eval_losses = [], []
    total_batched_samples = 0
    for epoch in range(num_epochs):
        model.train()
        epoch_losses.append([])
        training_iterator = iter(train_dataloader)
        for update_step in range(total_gradient_updates):
            batch_samples = []
            num_batches_in_step = (
                gradient_accumulation_steps if update_step != (total_gradient_updates - 1) else remainder
            )
            for _ in range(num_batches_in_step):
                batch_samples += [next(training_iterator)]
            local_num_items_in_batch = sum([(batch["labels"].ne(-100)).sum() for batch in batch_samples])
            num_items_in_batch = accelerator.gather(local_num_items_in_batch).sum().item()
            per_process = [int(count) for count in accelerator.gather(local_num_items_in_batch[None]).tolist()]
            assert num_items_in_batch == sum(per_process) and int(local_num_items_in_batch) in per_process, (
                num_items_in_batch, per_process)

            losses = []
            for i, batch in enumerate(batch_samples):
                ctx = (
                    model.no_sync
                    if (i < len(batch_samples) - 1 and accelerator.num_processes > 1)
                    else contextlib.nullcontext
                )
                with ctx():
                    total_batched_samples += 1
                    outputs = model(**batch, use_cache=False, num_items_in_batch=num_items_in_batch)
                    loss = outputs.loss
                    loss = loss * gradient_accumulation_steps * accelerator.num_processes
                    accelerator.backward(loss)
                    losses.append(loss.detach())

            grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()

            losses = accelerator.gather(sum(losses)).sum().item() / (
                accelerator.num_processes * gradient_accumulation_steps
            )
            grad_norm = grad_norm.detach().item() if isinstance(grad_norm, torch.Tensor) else grad_norm
            assert isinstance(grad_norm, float) and math.isfinite(grad_norm), f"gradient norm {grad_norm!r}"
            accelerator.print(
                f"epoch {epoch} - update step {update_step}:: grad norm: {grad_norm} ::train loss: {losses}"
            )
            epoch_losses[-1].append(losses)
            if args.with_wandb_tracking:
                accelerator.log(
                    {
                        "train/grad_norm": grad_norm,
                        "train/epoch": epoch,
                        "train/loss": losses,
                    },
                    step=update_step + total_gradient_updates * epoch,
                )
        check_same_on_every_process(accelerator, model)

        model.eval()
        losses = []
        own_eval_losses = []
        for _step, batch in enumerate(eval_dataloader):
            with torch.no_grad():
                outputs = model(**batch, use_cache=False)
            eval_loss = outputs.loss
            losses.append(accelerator.gather_for_metrics(loss.repeat(EVAL_BATCH_SIZE)))
            own_eval_losses.append(eval_loss.item())

        losses = torch.cat(losses)
        try:
            eval_loss = torch.mean(losses)
            perplexity = math.exp(eval_loss)
        except OverflowError:
            perplexity = float("inf")
        accelerator.print(f"epoch {epoch}:: eval perplexity: {perplexity} eval_loss: {eval_loss}")
        eval_losses.append(mean(own_eval_losses))
        if args.with_wandb_tracking:
            accelerator.log(
                {
                    "eval/perplexity": perplexity,
                    "eval/loss": eval_loss,
                    "eval/epoch": epoch,
                },
                step=update_step + total_gradient_updates * epoch,
            )
    check_loss_fell(epoch_losses[0], epoch_losses[-1])
    assert eval_losses[-1] < 0.9 * eval_losses[0], f"the evaluation loss did not fall: {eval_losses}"
    accelerator.end_training()
    say(accelerator, "GA_AUTOREGRESSIVE")


def main():
    parser = argparse.ArgumentParser(description="Causal LM with token-count-normalised accumulation (compat script).")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16", "fp8"])
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--per_device_batch_size", type=int, default=2)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--with_wandb_tracking", action="store_true")
    args = parser.parse_args()
    config = {"lr": 3e-3, "num_epochs": 3, "seed": 42, "batch_size": args.per_device_batch_size, "max_grad_norm": 1.0}
    training_function(config, args)


if __name__ == "__main__":
    main()
