"""The small Llama, the fixed global batches and the loop that the N-D parallel worker and the one-process reference share."""

from __future__ import annotations

from typing import Any

import torch

STEPS = 20
BATCH, LENGTH, VOCAB = 8, 16, 64


def llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=LENGTH)
    return LlamaForCausalLM(config)


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(step))


def causal_lm_loss(output: Any, tokens: torch.Tensor) -> torch.Tensor:
    """The loss transformers computes from ``labels=tokens``: each position predicts the next token, mean over them."""
    logits = getattr(output, "logits", output)  # a whole model's output object, or a pipeline stage's logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                             tokens[:, 1:].reshape(-1))


def train(accelerator: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer, accumulation: int,
          rank: int = 0, replicas: int = 1, steps: range = range(STEPS), forward_backward: bool = False) -> None:
    """Optimizer steps ``steps``; each takes the step's global batch in ``accumulation`` micro-batches, each split
    over the ``replicas`` data-parallel processes (this one reads part ``rank``). With ``forward_backward``
    the step is ``accelerator.forward_backward`` (which pipeline stages need), else ``backward`` of the model's loss."""
    for step in steps:
        tokens = global_batch(step)
        micro = BATCH // accumulation
        for k in range(accumulation):
            part = tokens[k * micro:(k + 1) * micro]
            mine = part[rank * micro // replicas:(rank + 1) * micro // replicas]
            with accelerator.accumulate(model):
                if forward_backward:
                    accelerator.forward_backward(model, causal_lm_loss, mine, target=mine)
                else:
                    accelerator.backward(model(input_ids=mine, labels=mine).loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()


def local_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This process's bytes of parameters and of optimizer state (its shards only)."""
    def local(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    params = sum(local(p).numel() * p.element_size() for p in model.parameters())
    state = sum(local(v).numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)
    return {"params": params, "optimizer": state}


def token_dataset() -> torch.utils.data.TensorDataset:
    """The STEPS global batches as one dataset (in order), for the Trainer's runs."""
    return torch.utils.data.TensorDataset(torch.cat([global_batch(step) for step in range(STEPS)]))


def llama_trainer(output_dir: Any, batch_size: int, pipelined: bool = False, **settings: Any) -> Any:
    """A Trainer over ``token_dataset`` (no shuffling, no checkpoints or trackers), AdamW at 1e-2, clipping at 1;
    ``pipelined``: its step is ``accelerator.forward_backward`` (as pipeline stages need)."""
    from trainer import Trainer

    class LlamaTrainer(Trainer):
        def training_step(self, batch: Any) -> torch.Tensor:
            (tokens,) = batch
            if pipelined:
                return self.accelerator.forward_backward(self.model, causal_lm_loss, tokens, target=tokens)
            return self.model(input_ids=tokens, labels=tokens).loss

        def validation_step(self, batch: Any) -> dict[str, torch.Tensor]:
            (tokens,) = batch  # pipeline stages evaluate when called: the logits come back on every process
            return {"val_loss": causal_lm_loss(self.model(tokens) if pipelined else self.model(input_ids=tokens), tokens)}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.model.parameters(), lr=1e-2)

    return LlamaTrainer(llama(), train_data=token_dataset(), batch_size=batch_size, shuffle=False, max_epochs=1,
                        grad_clip=1.0, output_dir=output_dir, checkpoint=False, trackers=[], progress_bar=False,
                        model_summary=False, **settings)
