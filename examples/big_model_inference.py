"""Large-model inference with offload: a model built without memory, filled from a sharded checkpoint,
spread over the CPU and the disk within a memory budget, then used to generate text.

The model is a GPT-2 built from a config (nothing is downloaded) and saved as a sharded
safetensors checkpoint, as transformers writes them. It is then rebuilt on the meta device
(``init_empty_weights``) and loaded by an ``Inferencer`` with ``max_memory={"cpu": "16MB"}``:
the device map keeps what fits in memory and leaves the other blocks on disk, read back layer by
layer (a prefetch thread reading ahead) while it generates. The tokens equal those of the same
model fully in memory.

    python examples/big_model_inference.py --output-dir outputs/big_model
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

import torch

from trainer import Inferencer, init_empty_weights


def build_config():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers.GPT2Config(n_layer=8, n_embd=256, n_head=4, vocab_size=5000, n_positions=128,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)


def run(output_dir: Path, max_cpu: str = "16MB") -> dict:
    """Save, reload with offload, generate; returns what happened (device counts, tokens, equality)."""
    import transformers

    config = build_config()
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    checkpoint = output_dir / "gpt2-checkpoint"
    reference.save_pretrained(checkpoint, max_shard_size="5MB")
    prompt = torch.randint(1, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    expected = reference.generate(prompt, max_new_tokens=16, do_sample=False)
    del reference

    with init_empty_weights():
        empty = transformers.GPT2LMHeadModel(config).eval()
    started = time.perf_counter()
    inferencer = Inferencer(empty, checkpoint, device_map="auto", max_memory={"cpu": max_cpu},
                            offload_folder=output_dir / "offload", prefetch=2)
    loaded = time.perf_counter() - started
    tokens = inferencer.generate(prompt, max_new_tokens=16, do_sample=False)
    inferencer.close()
    return {"shards": len(list(checkpoint.glob("*.safetensors"))), "devices": Counter(map(str, inferencer.device_map.values())),
            "load_seconds": loaded, "tokens": tokens[0, prompt.shape[1]:].tolist(), "equal": torch.equal(tokens, expected)}


def report(result: dict, max_cpu: str = "16MB") -> str:
    devices = ", ".join(f"{count} on {device}" for device, count in sorted(result["devices"].items()))
    return (f"large-model inference: {result['shards']} checkpoint shards loaded into an empty model in "
            f"{result['load_seconds']:.2f} s with max_memory cpu={max_cpu} (device map: {devices}); generated "
            f"{result['tokens'][:8]}...; equal to the model fully in memory: {result['equal']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/big_model"))
    args = parser.parse_args()
    print(report(run(args.output_dir)))


if __name__ == "__main__":
    main()
