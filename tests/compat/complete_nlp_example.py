"""The calls of Accelerate's examples/complete_nlp_example.py, made from the trainer paths, on 1 or 2 processes.

Written for this project: the Accelerator calls (trackers, ``save_state`` per epoch or every n
steps, ``load_state``, ``skip_first_batches``), their order and their arguments are upstream's;
only the hub loads come from ``offline``. Changed values, so that the tiny model learns in
seconds: lr 2e-5 -> 2e-3, num_epochs 3 -> 12, num_warmup_steps 100 -> 3.

Checks, besides upstream's run: the training loss falls, ``gather_for_metrics`` returns one
prediction per validation sample, and across a save and a resume: ``--compat_record FILE`` makes a
run write, after each ``save_state``, a fingerprint of what it saved (weights, learning rate,
optimizer step count); a run given ``--resume_from_checkpoint`` and the same record checks right
after ``load_state`` that it got exactly that state back, that it starts at the epoch (and step)
after the checkpoint, and that its first resumed epoch's loss is already low. With tracking, the
main process checks that the trackers wrote files under ``--project_dir``.
"""

import argparse
import json
import math
import os
import sys

import torch
from offline import AutoModelForSequenceClassification, AutoTokenizer, evaluate, load_dataset
from torch.optim import AdamW
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup, set_seed

from trainer import Accelerator, DataLoaderConfiguration, DistributedType

MAX_GPU_BATCH_SIZE = 16
EVAL_BATCH_SIZE = 32


def fingerprint(model, optimizer, lr_scheduler):
    """What a checkpoint must bring back: a weight checksum, the learning rate, Adam's step count."""
    steps = [float(state["step"]) for state in optimizer.state.values() if "step" in state]
    return {
        "weights": sum(float(p.detach().double().abs().sum()) for p in model.parameters()),
        "lr": float(lr_scheduler.get_last_lr()[0]),
        "optimizer_step": max(steps, default=0.0),
    }


def record(args, accelerator, name, entry):
    """Add ``entry`` under ``name`` to this process's record file (``--compat_record`` + ``.rank<i>``)."""
    if args.compat_record:
        path = f"{args.compat_record}.rank{accelerator.process_index}"
        saved = recorded_at(path) if os.path.exists(path) else {}
        saved[name] = entry
        with open(path, "w") as file:
            json.dump(saved, file)


def recorded_at(path):
    with open(path) as file:
        return json.load(file)


def recorded(args, accelerator):
    return recorded_at(f"{args.compat_record}.rank{accelerator.process_index}")


def training_function(config, args):
    dataloader_config = DataLoaderConfiguration(use_stateful_dataloader=args.use_stateful_dataloader)
    if args.with_tracking:
        accelerator = Accelerator(
            cpu=args.cpu,
            mixed_precision=args.mixed_precision,
            dataloader_config=dataloader_config,
            log_with="all",
            project_dir=args.project_dir,
        )
    else:
        accelerator = Accelerator(
            cpu=args.cpu, mixed_precision=args.mixed_precision, dataloader_config=dataloader_config
        )

    if hasattr(args.checkpointing_steps, "isdigit"):
        if args.checkpointing_steps == "epoch":
            checkpointing_steps = args.checkpointing_steps
        elif args.checkpointing_steps.isdigit():
            checkpointing_steps = int(args.checkpointing_steps)
        else:
            raise ValueError(f"--checkpointing_steps takes a number or 'epoch', not {args.checkpointing_steps!r}.")
    else:
        checkpointing_steps = None
    lr = config["lr"]
    num_epochs = int(config["num_epochs"])
    seed = int(config["seed"])
    batch_size = int(config["batch_size"])

    if args.with_tracking:
        run = os.path.split(__file__)[-1].split(".")[0]
        accelerator.init_trackers(run, config)

    tokenizer = AutoTokenizer.from_pretrained("bert-base-cased")
    datasets = load_dataset("nyu-mll/glue", "mrpc")
    metric = evaluate.load("glue", "mrpc")

    def tokenize_function(examples):
        return tokenizer(examples["sentence1"], examples["sentence2"], truncation=True, max_length=None)

    with accelerator.main_process_first():
        tokenized_datasets = datasets.map(
            tokenize_function,
            batched=True,
            remove_columns=["idx", "sentence1", "sentence2"],
        )
    tokenized_datasets = tokenized_datasets.rename_column("label", "labels")

    gradient_accumulation_steps = 1
    if batch_size > MAX_GPU_BATCH_SIZE and accelerator.distributed_type != DistributedType.XLA:
        gradient_accumulation_steps = batch_size // MAX_GPU_BATCH_SIZE
        batch_size = MAX_GPU_BATCH_SIZE

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

    set_seed(seed)
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

    overall_step = 0
    starting_epoch = 0

    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint is not None or args.resume_from_checkpoint != "":
            accelerator.print(f"Resumed from checkpoint: {args.resume_from_checkpoint}")
            accelerator.load_state(args.resume_from_checkpoint)
            path = os.path.basename(args.resume_from_checkpoint)
        else:
            dirs = [f.name for f in os.scandir(os.getcwd()) if f.is_dir()]
            dirs.sort(key=os.path.getctime)
            path = dirs[-1]
        training_difference = os.path.splitext(path)[0]

        if "epoch" in training_difference:
            starting_epoch = int(training_difference.replace("epoch_", "")) + 1
            resume_step = None
        else:
            resume_step = int(training_difference.replace("step_", ""))
            starting_epoch = resume_step // len(train_dataloader)
            resume_step -= starting_epoch * len(train_dataloader)

        if args.compat_record:  # the state just loaded is the one that was saved
            saved = recorded(args, accelerator)[path]
            loaded = fingerprint(model, optimizer, lr_scheduler)
            for key, value in saved.items():
                assert math.isclose(loaded[key], value, rel_tol=1e-9), (path, key, loaded[key], value)

    epoch_losses, epochs_run = [], []
    for epoch in range(starting_epoch, num_epochs):
        model.train()
        losses = []
        if args.with_tracking:
            total_loss = 0
        if args.resume_from_checkpoint and epoch == starting_epoch and resume_step is not None:
            if not args.use_stateful_dataloader:
                active_dataloader = accelerator.skip_first_batches(train_dataloader, resume_step)
            else:
                active_dataloader = train_dataloader
            overall_step += resume_step
        else:
            active_dataloader = train_dataloader
        steps_this_epoch = 0
        for step, batch in enumerate(active_dataloader):
            batch.to(accelerator.device)
            outputs = model(**batch)
            loss = outputs.loss
            loss = loss / gradient_accumulation_steps
            losses.append(loss.item())
            if args.with_tracking:
                total_loss += loss.detach().float()
            accelerator.backward(loss)
            if step % gradient_accumulation_steps == 0:
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()

            overall_step += 1
            steps_this_epoch += 1

            if isinstance(checkpointing_steps, int):
                output_dir = f"step_{overall_step}"
                if overall_step % checkpointing_steps == 0:
                    if args.output_dir is not None:
                        output_dir = os.path.join(args.output_dir, output_dir)
                    accelerator.save_state(output_dir)
                    record(args, accelerator, f"step_{overall_step}", fingerprint(model, optimizer, lr_scheduler))
        record(args, accelerator, f"{'resumed_' if args.resume_from_checkpoint else ''}losses_epoch_{epoch}", losses)
        skipped = resume_step if args.resume_from_checkpoint and epoch == starting_epoch and resume_step else 0
        assert steps_this_epoch == len(train_dataloader) - skipped, (epoch, steps_this_epoch, skipped)
        epoch_losses.append(sum(losses) / len(losses))
        epochs_run.append((epoch, steps_this_epoch))

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
        if args.with_tracking:
            accelerator.log(
                {
                    "accuracy": eval_metric["accuracy"],
                    "f1": eval_metric["f1"],
                    "train_loss": total_loss.item() / len(train_dataloader),
                    "epoch": epoch,
                },
                step=epoch,
            )

        if checkpointing_steps == "epoch":
            output_dir = f"epoch_{epoch}"
            if args.output_dir is not None:
                output_dir = os.path.join(args.output_dir, output_dir)
            accelerator.save_state(output_dir)
            record(args, accelerator, f"epoch_{epoch}", fingerprint(model, optimizer, lr_scheduler))

    accelerator.end_training()

    if args.resume_from_checkpoint:
        assert epochs_run[0][0] == starting_epoch, epochs_run
        # the first resumed epoch starts from trained weights: its loss is far below an untrained model's ln 2
        assert epoch_losses[0] < 0.75 * math.log(2), epoch_losses
        if args.compat_record:  # the resumed run sees the same batches in the same order as the first run did
            first_run = recorded(args, accelerator)
            for epoch, _ in epochs_run:
                saved = first_run[f"losses_epoch_{epoch}"]
                again = first_run[f"resumed_losses_epoch_{epoch}"]
                assert len(again) <= len(saved) and again == saved[len(saved) - len(again):], (epoch, saved, again)
    else:
        assert [epoch for epoch, _ in epochs_run] == list(range(num_epochs)), epochs_run
        assert epoch_losses[-1] < 0.75 * epoch_losses[0], epoch_losses
    if args.with_tracking and accelerator.is_main_process:
        written = [os.path.join(root, name) for root, _, names in os.walk(args.project_dir) for name in names]
        assert any("events.out.tfevents" in name for name in written), written
    sys.stdout.write(f"COMPLETE_NLP_EXAMPLE OK rank {accelerator.process_index} first epoch {epochs_run[0][0]} "
                     f"first steps {epochs_run[0][1]}\n")
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description="complete_nlp_example.py's calls, from trainer.")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16", "fp8"])
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--checkpointing_steps", type=str, default=None)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None)
    parser.add_argument("--use_stateful_dataloader", action="store_true")
    parser.add_argument("--with_tracking", action="store_true")
    parser.add_argument("--output_dir", type=str, default=".")
    parser.add_argument("--project_dir", type=str, default="logs")
    parser.add_argument("--compat_record", type=str, default=None,
                        help="JSON file of the saved states' fingerprints (written when saving, checked when resuming)")
    args = parser.parse_args()
    config = {"lr": 2e-3, "num_epochs": 12, "seed": 42, "batch_size": 16}
    training_function(config, args)


if __name__ == "__main__":
    main()
