"""Models and checkpoints for the big-model inference tests: built from configs and written here."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


def gpt2_config(layers: int = 4):
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.GPT2Config(n_layer=layers, n_embd=64, n_head=2, vocab_size=500, n_positions=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)


def gpt2(seed: int = 0, layers: int = 4):
    """A small transformers decoder whose output embedding is tied to its input embedding."""
    import transformers

    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(gpt2_config(layers)).eval()


class TiedLM(nn.Module):
    """A plain-PyTorch language model with tied embeddings and a stack of blocks."""

    def __init__(self, vocab: int = 300, width: int = 48, depth: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width * 2), nn.GELU(), nn.Linear(width * 2, width))
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return self.head(self.norm(hidden))


class Stack(nn.Module):
    """Square linear layers: a model of ``depth * width**2 * 4`` bytes for memory tests and benchmarks."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def write_sharded_stack(folder: Path, width: int, depth: int, layers_per_shard: int, seed: int = 0) -> Path:
    """Write a Stack's weights as safetensors shards with a transformers-style index, one shard in memory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    shards = (depth + layers_per_shard - 1) // layers_per_shard
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {}
        for layer in range(shard * layers_per_shard, min(depth, (shard + 1) * layers_per_shard)):
            tensors[f"layers.{layer}.weight"] = torch.randn(width, width, generator=generator) / width**0.5
            tensors[f"layers.{layer}.bias"] = torch.randn(width, generator=generator) * 0.1
        save_file(tensors, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder
