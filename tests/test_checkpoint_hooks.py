"""Save and load hooks (``register_save_state_pre_hook`` / ``register_load_state_pre_hook``), called the way
Accelerate's own test calls them and the way diffusers' training scripts do: a model saved its own way into
a subfolder, its weights taken out of the list, and loaded back by the load hook."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from models import classification_data, mlp, same_weights
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, TensorDataset

from trainer import Accelerator
from trainer.checkpoint_errors import CheckpointError


def prepared(accelerator: Accelerator, models: int = 1):
    nets = [mlp(seed=i) for i in range(models)]
    optimizer = torch.optim.SGD([p for net in nets for p in net.parameters()], lr=0.1)
    loader = DataLoader(TensorDataset(*classification_data(16)), batch_size=8)
    *nets, optimizer, loader = accelerator.prepare(*nets, optimizer, loader)
    for x, y in loader:  # one step, so that the optimizer has state
        accelerator.backward(sum(F.cross_entropy(net(x), y) for net in nets))
        optimizer.step()
        optimizer.zero_grad()
    return nets


def scramble(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)


@pytest.mark.parametrize("use_safetensors", [True, False])
def test_upstream_hooks_store_a_config_beside_the_state_and_stop_when_removed(tmp_path, use_safetensors):
    accelerator = Accelerator()
    (model,) = prepared(accelerator)
    reference = mlp()
    reference.load_state_dict(model.state_dict())

    def save_config(models, weights, output_dir):
        with open(os.path.join(output_dir, "data.json"), "w") as f:
            json.dump({"class_name": models[0].__class__.__name__}, f)

    def load_config(models, input_dir):
        with open(os.path.join(input_dir, "data.json")) as f:
            models[0].class_name = json.load(f)["class_name"]

    save_hook = accelerator.register_save_state_pre_hook(save_config)
    load_hook = accelerator.register_load_state_pre_hook(load_config)
    accelerator.save_state(tmp_path / "hooked", safe_serialization=use_safetensors)
    scramble(model)
    model.class_name = "random"
    accelerator.load_state(tmp_path / "hooked")
    assert same_weights(model, reference) and model.class_name == "Sequential"

    save_hook.remove()
    load_hook.remove()
    accelerator.save_state(tmp_path / "plain", safe_serialization=use_safetensors)
    assert not (tmp_path / "plain" / "data.json").exists()
    scramble(model)
    model.class_name = "random"
    accelerator.load_state(tmp_path / "plain")
    assert same_weights(model, reference) and model.class_name == "random"


@pytest.mark.parametrize("blocking", [True, False])
def test_a_model_saved_by_the_hooks_is_left_out_of_the_state_files_and_loaded_back_by_them(tmp_path, blocking):
    """diffusers' pattern: the second model (an 'unet') is saved into its own subfolder with a config, its weights
    popped from the list; an EMA copy goes beside it in a file of the hook's own; the load hook pops the model
    and loads it itself."""
    accelerator = Accelerator()
    text_encoder, unet = prepared(accelerator, models=2)
    ema = {name: value.clone() for name, value in unet.state_dict().items()}
    saved = [mlp(seed=9), mlp(seed=9)]
    saved[0].load_state_dict(text_encoder.state_dict())
    saved[1].load_state_dict(unet.state_dict())

    def save_model_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            os.makedirs(os.path.join(output_dir, "unet"))
            save_file(models[1].state_dict(), os.path.join(output_dir, "unet", "diffusion_pytorch_model.safetensors"))
            with open(os.path.join(output_dir, "unet", "config.json"), "w") as f:
                json.dump({"hidden": 16}, f)
            torch.save(ema, os.path.join(output_dir, "unet_ema.pt"))
            weights.pop()  # make sure to pop weight so that corresponding model is not saved again

    def load_model_hook(models, input_dir):
        model = models.pop()
        model.load_state_dict(load_file(os.path.join(input_dir, "unet", "diffusion_pytorch_model.safetensors")))
        ema.update(torch.load(os.path.join(input_dir, "unet_ema.pt"), weights_only=True))

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    folder = accelerator.save_state(tmp_path / "checkpoint", blocking=blocking)
    accelerator.wait_for_checkpoint()
    assert (folder / "model.safetensors").is_file() and not (folder / "model_1.safetensors").exists()
    info = json.loads((folder / "accelerator.json").read_text())
    assert info["model_files"] == 1 and info["hook_files"] == ["unet", "unet_ema.pt"]
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    assert {"unet/config.json", "unet/diffusion_pytorch_model.safetensors", "unet_ema.pt"} <= set(manifest)

    scramble(text_encoder)
    scramble(unet)
    for value in ema.values():
        value.zero_()
    accelerator.load_state(folder)  # the hook's own pickle is not refused: it is the load hook's to read
    assert same_weights(text_encoder, saved[0]) and same_weights(unet, saved[1])
    assert all(torch.equal(ema[name], value) for name, value in saved[1].state_dict().items())


def test_a_load_hook_that_takes_a_different_number_of_models_is_refused_before_anything_is_restored(tmp_path):
    accelerator = Accelerator()
    first, second = prepared(accelerator, models=2)
    accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.pop())
    folder = accelerator.save_state(tmp_path / "checkpoint")
    accelerator.register_load_state_pre_hook(lambda models, input_dir: None)  # takes none: two left, one file
    scramble(first)
    scrambled = [p.clone() for p in first.parameters()]
    with pytest.raises(CheckpointError, match=r"holds 1 model file\(s\).*but 2 model\(s\) are left to load.*"
                                              r"exactly the models whose weights the save hook took out"):
        accelerator.load_state(folder)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), scrambled))  # nothing restored


def test_a_hook_must_be_a_function():
    with pytest.raises(TypeError, match="register_save_state_pre_hook takes a function, got str"):
        Accelerator().register_save_state_pre_hook("save")
