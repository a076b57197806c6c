"""Pipeline-parallel inference: GPT-2 split across the launched processes, one stage each.

    trainer launch --num_processes 2 --cpu examples/pipeline_inference.py

Each process builds the whole model, keeps only its stage (half of the transformer layers with
two processes) and the batch flows through the stages in micro-batches. The model is built from
a config (random weights), so the example runs offline; a checkpoint would be loaded the same way.
"""

import torch
from transformers import AutoModelForSequenceClassification, GPT2Config

from trainer import PartialState, prepare_pippy

torch.manual_seed(0)  # every process must build the same weights
config = GPT2Config(n_layer=4, n_embd=256, n_head=4, pad_token_id=50256)  # GPT-2's vocabulary, fewer and narrower layers
model = AutoModelForSequenceClassification.from_config(config)
model.eval()

# Input configs
# Create example inputs for the model
input = torch.randint(
    low=0,
    high=model.config.vocab_size,
    size=(2, 1024),  # bs x seq_len
    device="cpu",
    dtype=torch.int64,
    requires_grad=False,
)

# Create a pipeline stage from the model
# `auto` cuts the model's transformer layers into one stage per process, evenly;
# the batch of 2 is run as 2 micro-batches (one per process by default)
model = prepare_pippy(model, split_points="auto", example_args=(input,))

# Pass `gather_output=True` to have the output on every process
# model = prepare_pippy(model, split_points="auto", example_args=(input,), gather_output=True)

# Run the model: every process passes the same batch
with torch.no_grad():
    output = model(input)

# The output is on the last process only (None elsewhere)
if PartialState().is_last_process:
    print(f"output shape: {tuple(output.shape)}")
