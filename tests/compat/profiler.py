"""The calls of Accelerate's examples/by_feature/profiler.py, made from the trainer paths, on local data.

Same ProfileKwargs/Accelerator/profile calls, order and arguments as upstream; datasets,
tokenizer, model and metric come from ``offline``. Changed values: lr 2e-5 -> 1e-3, warmup
100 -> 2 steps. Checks: ``prof.key_averages()`` lists the forward's, backward's and optimizer's
operations; with ``--output_trace_dir`` each process wrote ``profile_<rank>.json`` (Accelerate's
name), a Chrome trace of that process's training steps; with ``--record_shapes`` the trace holds
input shapes; the gathered evaluation covers each validation sample once.
"""

import argparse
import json
import os

import torch
from compat_checks import check_every_sample_once, say, validation_labels
from offline import AutoModelForSequenceClassification, AutoTokenizer, evaluate, load_dataset
from torch.optim import AdamW
from torch.utils.data import DataLoader
from transformers import get_linear_schedule_with_warmup, set_seed

from trainer import Accelerator, DistributedType
from trainer.utils import ProfileKwargs

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


def check_profile(prof, accelerator, args, steps):
    """The profile saw this process's training steps; the trace file, if asked for, is this process's."""
    names = {event.key for event in prof.key_averages()}
    for op in ("aten::addmm", "aten::embedding", "autograd::engine::evaluate_function: AddmmBackward0"):
        assert op in names, f"{op} is not in the profile: {sorted(names)[:30]}"
    assert any(name.startswith("Optimizer.step#AdamW.step") for name in names), "no optimizer step was profiled"
    if args.output_trace_dir is None:
        return
    path = os.path.join(args.output_trace_dir, f"profile_{accelerator.process_index}.json")
    assert os.path.isfile(path), f"no trace at {path}: {os.listdir(args.output_trace_dir)}"
    with open(path) as file:
        trace = json.load(file)
    events = trace["traceEvents"]
    steps_seen = sum(1 for e in events if e.get("name", "").startswith("Optimizer.step#AdamW.step"))
    assert steps_seen == steps, f"the trace has {steps_seen} optimizer steps, this process took {steps}"
    if args.record_shapes:
        assert any(e.get("args", {}).get("Input Dims") for e in events), "record_shapes: no input shapes in the trace"
    pids = {e["pid"] for e in events if e.get("ph") == "X" and e.get("name") == "aten::addmm"}
    assert pids == {os.getpid()}, f"the trace's operations ran in processes {pids}, not in this one ({os.getpid()})"


def training_function(config, args):
    profile_kwargs = ProfileKwargs(
        record_shapes=args.record_shapes,
        profile_memory=args.profile_memory,
        with_flops=args.with_flops,
        output_trace_dir=args.output_trace_dir,
    )
    accelerator = Accelerator(cpu=args.cpu, mixed_precision=args.mixed_precision, kwargs_handlers=[profile_kwargs])
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

    expected_labels = validation_labels()
    for epoch in range(num_epochs):
        model.train()
        with accelerator.profile() as prof:
            for _step, batch in enumerate(train_dataloader):
                batch.to(accelerator.device)
                with accelerator.accumulate(model):
                    output = model(**batch)
                    loss = output.loss
                    accelerator.backward(loss)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
        accelerator.print(
            prof.key_averages().table(
                sort_by="self_cpu_time_total" if args.cpu else f"self_{accelerator.device.type}_time_total",
                row_limit=-1,
            )
        )
        check_profile(prof, accelerator, args, steps=len(train_dataloader))

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
    accelerator.end_training()
    say(accelerator, "PROFILER")


def main():
    parser = argparse.ArgumentParser(description="Profiled MRPC training (compat script).")
    parser.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16", "fp8"])
    parser.add_argument("--record_shapes", action="store_true", default=False)
    parser.add_argument("--profile_memory", action="store_true", default=False)
    parser.add_argument("--with_flops", action="store_true", default=False)
    parser.add_argument("--output_trace_dir", type=str, default=None)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    config = {"lr": 1e-3, "num_epochs": 3, "seed": 42, "batch_size": 16}
    training_function(config, args)


if __name__ == "__main__":
    main()
