"""The calls of Accelerate's examples/by_feature/automatic_gradient_accumulation.py, from the trainer paths, on 1 or 2 processes.

Written for this project: the Accelerator calls (``find_executable_batch_size`` around the whole
training, ``accelerator.gradient_accumulation_steps`` set from the batch size that fits,
``free_memory`` before each attempt, ``accumulate``), their order and their arguments are
upstream's; only the hub loads come from ``offline``. Upstream's TESTING_MOCKED_DATALOADERS switch
is left out. A CPU does not run out of memory on this model, so a forward pre-hook on the model
raises torch's ``OutOfMemoryError("CUDA out of memory. ...")`` for batches over 32 samples, as a
device with less memory would. Changed values: batch_size 256 -> 64 (with the simulated limit the
batch goes 64, 57, 51, 45, 40, 36, 32, so 2 accumulation steps), and so that the tiny model learns
in seconds: lr 2e-5 -> 5e-3, num_epochs 3 -> 16, num_warmup_steps 100 -> 3.

Checks: the batch sizes tried are exactly those (the 0.9 shrink); the last attempt trains with
``gradient_accumulation_steps`` 2, syncing on every second batch and on each epoch's last; the
optimizer steps only then; the training loss falls; ``gather_for_metrics`` returns one prediction
per validation sample.
"""

import argparse
import sys

import torch
from offline import AutoModelForSequenceClassification, AutoTokenizer, evaluate, load_dataset
from torch.optim import AdamW
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup, set_seed

from trainer import Accelerator
from trainer.utils import find_executable_batch_size

EVAL_BATCH_SIZE = 32
SIMULATED_MEMORY_LIMIT = 32  # samples per forward


def simulated_memory_limit(module, args, kwargs):
    if kwargs["input_ids"].shape[0] > SIMULATED_MEMORY_LIMIT:
        raise torch.OutOfMemoryError(f"CUDA out of memory. (simulated: more than {SIMULATED_MEMORY_LIMIT} samples)")


def adam_steps(optimizer):
    return max((int(state["step"]) for state in optimizer.state.values() if "step" in state), default=0)


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
        if accelerator.mixed_precision == "fp8":
            pad_to_multiple_of = 16
        elif accelerator.mixed_precision != "no":
            pad_to_multiple_of = 8
        else:
            pad_to_multiple_of = None
        return tokenizer.pad(
            examples,
            padding="longest",
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
    observed_batch_size = int(config["batch_size"])

    metric = evaluate.load("glue", "mrpc")
    tried, epoch_losses, steps_per_epoch = [], [], []

    @find_executable_batch_size(starting_batch_size=int(observed_batch_size))
    def inner_training_loop(batch_size):
        nonlocal accelerator
        tried.append(batch_size)
        epoch_losses.clear()

        num_gradient_accumulation_steps = observed_batch_size // batch_size
        accelerator.gradient_accumulation_steps = num_gradient_accumulation_steps

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

        batches = len(train_dataloader)
        expected_syncs = [step for step in range(batches)
                          if (step + 1) % num_gradient_accumulation_steps == 0 or step == batches - 1]
        steps_per_epoch[:] = [len(expected_syncs), batches]
        for epoch in range(num_epochs):
            model.train()
            losses, syncs = [], []
            for step, batch in enumerate(train_dataloader):
                with accelerator.accumulate(model):
                    batch.to(accelerator.device)
                    outputs = model(**batch)
                    loss = outputs.loss
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

    inner_training_loop()
    accelerator.end_training()

    assert tried == [64, 57, 51, 45, 40, 36, 32], tried
    assert accelerator.gradient_accumulation_steps == 2, accelerator.gradient_accumulation_steps
    assert len(epoch_losses) == int(config["num_epochs"]) and epoch_losses[-1] < 0.75 * epoch_losses[0], epoch_losses
    sys.stdout.write(f"AUTOMATIC_GRADIENT_ACCUMULATION OK rank {accelerator.process_index} batch sizes {tried} "
                     f"optimizer steps per epoch {steps_per_epoch[0]} of {steps_per_epoch[1]} batches\n")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description="by_feature/automatic_gradient_accumulation.py's calls, from trainer.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16", "fp8"])
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    config = {"lr": 5e-3, "num_epochs": 16, "seed": 42, "batch_size": 64}
    training_function(config, args)


if __name__ == "__main__":
    main()
