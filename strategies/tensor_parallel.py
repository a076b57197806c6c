"""Tensor parallelism inside the FSDP strategy: a plan applied with ``parallelize_module`` on the mesh's ``tp`` dimension.

A plan maps module names (``*`` matches one level: ``model.layers.*.mlp.up_proj``) to a style:
``"colwise"`` (the weight's output features split: ``ColwiseParallel``), ``"rowwise"`` (input
features split, the output summed: ``RowwiseParallel``), ``"colwise_gather_output"`` (split, the
output gathered whole: an output projection), ``"embedding_rowwise"`` (an embedding's rows, the
vocabulary, split), or any ``ParallelStyle``. Without a plan of the user's, the model's own is used:
transformers models carry one (``model._tp_plan``, or ``config.base_model_tp_plan`` relative to
their base model). Modules the plan leaves out stay whole on every tensor-parallel process; FSDP
then shards all parameters over the data-parallel dimensions.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from torch import nn

STYLES = ("colwise", "rowwise", "colwise_gather_output", "embedding_rowwise")
_SPLITS = {"colwise": "out", "colwise_gather_output": "out", "rowwise": "in"}  # which Linear features a style splits


def model_plan(module: nn.Module) -> dict[str, Any]:
    """The model's own plan (transformers' ``_tp_plan``, else ``config.base_model_tp_plan``), named from ``module``'s top."""
    whole = getattr(module, "_tp_plan", None)
    if isinstance(whole, dict) and whole:
        return dict(whole)
    plan = getattr(getattr(module, "config", None), "base_model_tp_plan", None) or {}
    prefix = getattr(module, "base_model_prefix", "")
    if prefix and isinstance(getattr(module, prefix, None), nn.Module):
        return {f"{prefix}.{pattern}": style for pattern, style in plan.items()}
    return dict(plan)


def _style(style: Any, pattern: str) -> Any:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

    if isinstance(style, ParallelStyle):
        return style
    if style == "colwise":
        return ColwiseParallel()
    if style == "rowwise":
        return RowwiseParallel()
    if style == "colwise_gather_output":
        return ColwiseParallel(output_layouts=Replicate())
    if style == "embedding_rowwise":
        return RowwiseParallel(input_layouts=Replicate())
    raise ValueError(f"Tensor-parallel plan: {pattern!r} -> {style!r} is not a style this strategy applies: use "
                     f"{' or '.join(map(repr, STYLES))}, or a torch.distributed.tensor.parallel.ParallelStyle.")


def resolve_plan(module: nn.Module, plan: dict[str, Any] | None, tp_size: int) -> dict[str, Any]:
    """``{module name: ParallelStyle}`` for every module a pattern names; clear errors for what cannot be split."""
    given = plan if plan is not None else model_plan(module)
    if not given:
        raise ValueError(f"tp_size={tp_size} needs a tensor-parallel plan, and {type(module).__name__} names none (no "
                         "config.base_model_tp_plan): pass ParallelismConfig(tp_plan={'<module name>': 'colwise' | "
                         "'rowwise', ...}), e.g. {'layers.*.mlp.up_proj': 'colwise', 'layers.*.mlp.down_proj': 'rowwise'}.")
    names = dict(module.named_modules())
    resolved: dict[str, Any] = {}
    for pattern, style in given.items():
        # "*" stands for one level of names: a match has as many dots as the pattern
        matched = [name for name in names if name and fnmatch.fnmatchcase(name, pattern) and _one_level(name, pattern)]
        if not matched:
            raise ValueError(f"Tensor-parallel plan: {pattern!r} names no submodule of {type(module).__name__}.")
        for name in matched:
            _check_divisible(name, names[name], style, tp_size)
            resolved[name] = _style(style, pattern)
    return resolved


def _one_level(name: str, pattern: str) -> bool:
    return name.count(".") == pattern.count(".")


def _check_divisible(name: str, module: nn.Module, style: Any, tp_size: int) -> None:
    if isinstance(module, nn.Linear) and style in _SPLITS:
        side = _SPLITS[style]
        features, what = (module.out_features, "output features") if side == "out" else (module.in_features,
                                                                                            "input features")
    elif isinstance(module, nn.Embedding) and style == "embedding_rowwise":
        features, what = module.num_embeddings, "embeddings"
    else:
        return
    if features % tp_size:
        raise ValueError(f"Tensor-parallel plan: {name} ({style}) has {features} {what}, which do not split evenly "
                         f"over tp_size={tp_size} processes: choose a tp_size that divides {features}.")


def parallelize(module: nn.Module, tp_mesh: Any, plan: dict[str, Any] | None) -> None:
    """Split the planned submodules of ``module`` over ``tp_mesh`` (in place)."""
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(module, tp_mesh, resolve_plan(module, plan, tp_mesh.size()))


def data_parallel_mesh(mesh: Any) -> Any:
    """The mesh FSDP shards over: (``dp_replicate``, ``dp_shard``), ``dp_shard`` alone, or None (no data parallelism)."""
    names = [name for name in ("dp_replicate", "dp_shard") if name in (mesh.mesh_dim_names or ())]
    if not names:
        return None
    return mesh[tuple(names)] if len(names) > 1 else mesh[names[0]]
