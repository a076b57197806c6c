"""fp8 training: the large Linear layers compute their matmuls in float8, the rest of the model in bf16.

fp8 halves the bytes a matmul reads and doubles the tensor-core rate against bf16, but only on GPUs
that have fp8 tensor cores (compute capability 8.9 and up: Ada, Hopper, Blackwell), and only for
matmuls whose dimensions are multiples of 16. Its 3-4 mantissa bits also cost accuracy, which the
layers nearest the data and the loss feel most; so by default the first and the last Linear layer
stay in bf16, like every layer whose shape cannot run in fp8.

Two backends swap the layers: torchao (``convert_to_float8_training``, dynamic scaling, no state of
its own) and TransformerEngine (``te.Linear`` under ``fp8_autocast``), when it is installed.
Parameters, gradients and optimizer state stay fp32 with both, and a checkpoint keeps the keys of
the original ``nn.Linear`` layers.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib.util
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from trainer.precision.policies import MixedPrecision

FP8_MIN_CAPABILITY = (8, 9)
BACKENDS = ("torchao", "te")
TORCHAO_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
TE_RECIPES = ("delayed", "current")
_INSTALL = {
    "torchao": "pip install torchao",
    "te": "pip install --no-build-isolation 'transformer_engine[pytorch]'",
}
_PACKAGE = {"torchao": "torchao", "te": "transformer_engine"}
_NEEDS = "fp8 training needs torchao and a CUDA GPU with compute capability >= 8.9 (Ada, Hopper or newer)"

ModuleFilter = Callable[[nn.Module, str], bool]


class Fp8UnavailableError(ValueError):
    """fp8 was asked for where it cannot run; a ValueError, like every other refused precision."""


def fp8_unavailable_reason(device: torch.device | None = None, backend: str = "torchao") -> str | None:
    """Why fp8 cannot train on ``device`` (None: only what is known without touching a GPU), or None.

    With no device the check stays fork-safe (it never initialises CUDA), so it can run in a launcher
    or notebook before the worker processes start; the device's capability is read once the device is known.
    """
    reasons = []  # everything to fix, at once
    if device is not None and device.type != "cuda":
        reasons.append(f"this run is on the {device.type.upper()}, which has no fp8 matmuls")
    elif device is None and torch.version.cuda is None and torch.version.hip is None:
        reasons.append("this PyTorch is built without CUDA, so there is no GPU to run fp8 on")
    if importlib.util.find_spec(_PACKAGE[backend]) is None:
        reasons.append(f"the {backend} backend is not installed: {_INSTALL[backend]}")
    if reasons:
        return ", and ".join(reasons)
    if device is None:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"{name} has compute capability {capability[0]}.{capability[1]}"
    return None


def check_fp8_available(device: torch.device | None = None, backend: str = "torchao", label: str = "'fp8'") -> None:
    """Raise one clear Fp8UnavailableError, naming the alternative, before any model is touched."""
    reason = fp8_unavailable_reason(device, backend)
    if reason is not None:
        raise Fp8UnavailableError(f"mixed_precision={label}: {_NEEDS}; {reason}. "
                                  "Use mixed_precision='bf16' instead (fp16 on GPUs without bf16).")


def _did_you_mean(name: str, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(name), list(names), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _matches(fqn: str, patterns: Iterable[str]) -> bool:
    """A skip pattern names a module by its full name, a glob on it, or its last dotted parts."""
    return any(fqn == p or fnmatch.fnmatchcase(fqn, p) or fqn.endswith("." + p) for p in patterns)


def fp8_linear_plan(model: nn.Module, skip_modules: Iterable[str] = (), keep_first_and_last: bool = True,
                    module_filter: ModuleFilter | None = None) -> dict[str, str]:
    """For every Linear layer of ``model``, by name: ``"fp8"`` or why it stays in higher precision.

    "First" and "last" are in registration order (``named_modules``), which is the order of the
    forward pass in most models; where it is not, name the layers in ``skip_modules``.
    ``module_filter(module, name)`` returning False keeps a layer out as well.
    """
    skip = tuple(skip_modules)
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    ends = {linears[0][0]: "first Linear", linears[-1][0]: "last Linear"} if linears and keep_first_and_last else {}
    plan: dict[str, str] = {}
    for name, module in linears:
        if name in ends:
            plan[name] = ends[name]
        elif module.in_features % 16 or module.out_features % 16:
            plan[name] = f"in_features={module.in_features}, out_features={module.out_features}: not multiples of 16"
        elif _matches(name, skip):
            plan[name] = "in skip_modules"
        elif module_filter is not None and not module_filter(module, name):
            plan[name] = "refused by module_filter"
        else:
            plan[name] = "fp8"
    return plan


def _torchao_config(recipe: Any) -> Any:
    from torchao.float8 import Float8LinearConfig

    if isinstance(recipe, Float8LinearConfig):
        return recipe
    return Float8LinearConfig.from_recipe_name(recipe)


def convert_to_fp8(model: nn.Module, plan: dict[str, str], backend: str = "torchao", recipe: Any = "tensorwise") -> nn.Module:
    """Swap the Linear layers the plan marks ``"fp8"`` in place; return the model.

    Only modules are swapped, so this runs on any device; the fp8 matmuls need the GPU only when called.
    """
    chosen = {name for name, verdict in plan.items() if verdict == "fp8"}
    if "" in chosen:
        raise ValueError("fp8: the model is a single Linear layer; wrap it in a module (and keep_first_and_last=False).")
    if backend == "torchao":
        from torchao.float8 import convert_to_float8_training

        return convert_to_float8_training(model, module_filter_fn=lambda module, name: name in chosen,
                                          config=_torchao_config(recipe))
    import transformer_engine.pytorch as te

    for name in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old: nn.Linear = getattr(parent, child)
        new = te.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                        params_dtype=old.weight.dtype, device=old.weight.device)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        setattr(parent, child, new)
    return model


class Float8Precision(MixedPrecision):
    """fp8 matmuls in the large Linear layers, bf16 autocast for the rest (``mixed_precision="fp8"``).

    Args:
        device: the CUDA device to train on (default: the current one). Anything else, or a GPU below
            compute capability 8.9, is refused here, before the model is touched.
        backend: ``"torchao"`` (default) or ``"te"`` (TransformerEngine).
        recipe: torchao: ``"tensorwise"`` (fastest), ``"rowwise"``, ``"rowwise_with_gw_hp"`` (most
            accurate) or a ``Float8LinearConfig``; TransformerEngine: ``"delayed"`` (default),
            ``"current"`` or a TE recipe object.
        skip_modules: Linear layers to keep in bf16: full names, globs (``"*.gate"``) or name endings.
        keep_first_and_last: keep the first and the last Linear layer in bf16 (default True).
        module_filter: ``(module, name) -> bool``; False keeps that layer in bf16 too.
    """

    def __init__(self, device: torch.device | str | None = None, *, backend: str = "torchao", recipe: Any = None,
                 skip_modules: Iterable[str] = (), keep_first_and_last: bool = True,
                 module_filter: ModuleFilter | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"Float8Precision(backend={backend!r}): use one of {list(BACKENDS)}."
                             f"{_did_you_mean(backend, BACKENDS)}")
        names = TORCHAO_RECIPES if backend == "torchao" else TE_RECIPES
        if recipe is None:
            recipe = names[0]
        if isinstance(recipe, str) and recipe not in names:
            raise ValueError(f"Float8Precision(recipe={recipe!r}): the {backend} backend knows {list(names)}."
                             f"{_did_you_mean(recipe, names)}")
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        device = torch.device(device)
        check_fp8_available(device, backend)
        super().__init__(device, torch.bfloat16, "fp8")
        self.backend, self.recipe = backend, recipe
        self.skip_modules, self.keep_first_and_last, self.module_filter = tuple(skip_modules), keep_first_and_last, module_filter
        self.plan: dict[str, str] = {}

    def convert_module(self, module: nn.Module) -> nn.Module:
        self.plan = fp8_linear_plan(module, self.skip_modules, self.keep_first_and_last, self.module_filter)
        if "fp8" not in self.plan.values():
            warnings.warn("mixed_precision='fp8': no Linear layer qualifies for fp8 (see Float8Precision.plan); "
                          "the model trains in bf16.", stacklevel=3)
            return module
        return convert_to_fp8(module, self.plan, self.backend, self.recipe)

    def autocast(self, **kwargs: Any) -> AbstractContextManager:
        if self.backend == "torchao":
            return super().autocast(**kwargs)
        stack = contextlib.ExitStack()
        stack.enter_context(super().autocast(**kwargs))
        stack.enter_context(_te_fp8_autocast(self.recipe))
        return stack


def _te_fp8_autocast(recipe: Any) -> AbstractContextManager:
    """TransformerEngine's fp8 context, under its current name (``autocast``) or the older ``fp8_autocast``."""
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as te_recipe

    if recipe == "delayed":
        recipe = te_recipe.DelayedScaling()
    elif recipe == "current":
        recipe = te_recipe.Float8CurrentScaling()
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)
