"""FSDP: parameters, gradients and optimizer state sharded across processes with ``fully_shard``."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from strategies.base import Strategy

WRAP_POLICIES = ("TRANSFORMER_BASED_WRAP", "SIZE_BASED_WRAP", "NO_WRAP")
SHARDING = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, 1: True, 2: False}
# Keys of an Accelerate-style ``fsdp_config`` and the argument each one sets here.
CONFIG_KEYS = {
    "fsdp_auto_wrap_policy": "auto_wrap_policy", "fsdp_transformer_layer_cls_to_wrap": "transformer_layer_cls_to_wrap",
    "fsdp_min_num_params": "min_num_params", "fsdp_sharding_strategy": "sharding_strategy",
    "fsdp_reshard_after_forward": "reshard_after_forward", "fsdp_offload_params": "offload_params",
    "fsdp_state_dict_type": "state_dict_type", "fsdp_activation_checkpointing": "activation_checkpointing",
}
# Keys that matter to FSDP1's wrapper only; fully_shard does what they ask by design.
FSDP1_ONLY = ("fsdp_backward_prefetch", "fsdp_backward_prefetch_policy", "fsdp_forward_prefetch",
              "fsdp_cpu_ram_efficient_loading", "fsdp_sync_module_states", "fsdp_use_orig_params", "fsdp_version")


class FSDP(Strategy):
    """Fully sharded data parallel training (``torch.distributed.fsdp.fully_shard``).

    Args:
        auto_wrap_policy: which submodules become their own shard unit: ``"TRANSFORMER_BASED_WRAP"``
            (the classes named in ``transformer_layer_cls_to_wrap``, or the model's ``_no_split_modules``),
            ``"SIZE_BASED_WRAP"`` (submodules of at least ``min_num_params`` parameters) or ``"NO_WRAP"``.
        sharding_strategy: ``"FULL_SHARD"`` (parameters re-sharded after forward) or ``"SHARD_GRAD_OP"``.
        offload_params: keep sharded parameters and gradients on the CPU.
        state_dict_type: how checkpoints are written; this strategy writes one full safetensors file.
    """

    name = "fsdp"

    def __init__(self, auto_wrap_policy: str = "TRANSFORMER_BASED_WRAP",
                 transformer_layer_cls_to_wrap: str | list[str] | None = None, min_num_params: int = 100_000_000,
                 sharding_strategy: str | int = "FULL_SHARD", reshard_after_forward: bool | None = None,
                 offload_params: bool = False, state_dict_type: str = "FULL_STATE_DICT",
                 activation_checkpointing: bool = False) -> None:
        super().__init__()
        if auto_wrap_policy not in WRAP_POLICIES:
            raise ValueError(f"FSDP(auto_wrap_policy={auto_wrap_policy!r}): use one of {list(WRAP_POLICIES)}.")
        if sharding_strategy not in SHARDING:
            raise ValueError(f"FSDP(sharding_strategy={sharding_strategy!r}): this strategy supports FULL_SHARD and "
                             "SHARD_GRAD_OP (use strategy='ddp' for no sharding).")
        if activation_checkpointing:
            raise ValueError("FSDP(activation_checkpointing=True) is not available in this release.")
        if isinstance(transformer_layer_cls_to_wrap, str):
            transformer_layer_cls_to_wrap = [name.strip() for name in transformer_layer_cls_to_wrap.split(",")]
        self.auto_wrap_policy, self.layer_classes = auto_wrap_policy, transformer_layer_cls_to_wrap
        self.min_num_params = min_num_params
        self.reshard_after_forward = SHARDING[sharding_strategy] if reshard_after_forward is None else reshard_after_forward
        self.offload_params, self.state_dict_type = offload_params, state_dict_type
        self._module: nn.Module | None = None

    def setup_environment(self, device: torch.device, process_index: int = 0, num_processes: int = 1) -> None:
        if num_processes < 2:
            raise ValueError("FSDP shards a model across processes, and this job has one: launch it with "
                             "`trainer launch --num_processes N`, or use strategy='auto' for one process.")
        super().setup_environment(device, process_index, num_processes)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FSDP:
        """Build from an ``fsdp_config`` section of a launch configuration (already validated)."""
        kwargs = {}
        for key, value in config.items():
            if key in FSDP1_ONLY:
                continue
            if key not in CONFIG_KEYS:
                close = difflib.get_close_matches(key, list(CONFIG_KEYS), n=1)
                raise ValueError(f"Unknown fsdp_config key {key!r}." + (f" Did you mean {close[0]!r}?" if close else ""))
            kwargs[CONFIG_KEYS[key]] = value
        if kwargs.get("reshard_after_forward") in ("true", "false"):
            kwargs["reshard_after_forward"] = kwargs["reshard_after_forward"] == "true"
        return cls(**kwargs)

    # -- placing the model ---------------------------------------------------------------------------
    def _units(self, module: nn.Module) -> list[nn.Module]:
        """The submodules that become shard units of their own, innermost first."""
        if self.auto_wrap_policy == "NO_WRAP":
            return []
        if self.auto_wrap_policy == "SIZE_BASED_WRAP":
            return [m for m in list(module.modules())[1:][::-1]
                    if sum(p.numel() for p in m.parameters()) >= self.min_num_params]
        names = set(self.layer_classes or getattr(module, "_no_split_modules", None) or [])
        return [m for m in list(module.modules())[1:][::-1] if type(m).__name__ in names]

    def setup_module(self, module: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        module = module.to(self.root_device)
        before = dict(module.named_parameters())
        options: dict[str, Any] = {"reshard_after_forward": self.reshard_after_forward}
        if self.offload_params:
            options["offload_policy"] = CPUOffloadPolicy()
        for unit in self._units(module):
            fully_shard(unit, **options)
        fully_shard(module, **options)
        # fully_shard puts new (sharded) parameters in place of the old ones; an optimizer built
        # before preparation still holds the old ones, so setup_optimizer swaps them.
        after = dict(module.named_parameters())
        self._replaced = {id(old): after[name] for name, old in before.items() if name in after}
        self._module = module
        return module

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        replaced = getattr(self, "_replaced", {})
        if optimizer.state:
            raise ValueError("Prepare the optimizer before it has stepped: FSDP replaces the model's parameters, "
                             "and existing optimizer state could not follow them.")
        for group in optimizer.param_groups:
            group["params"] = [replaced.get(id(p), p) for p in group["params"]]
        return optimizer

    @contextmanager
    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Iterator[None]:
        if not enabled or not hasattr(module, "set_requires_gradient_sync"):
            yield
            return
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)

    def clip_grad_norm_(self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # -- checkpoints: one full file, written by rank 0, read by all ---------------------------------------
    def _options(self, **kwargs: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)

    def save_module(self, module: nn.Module, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(module, options=self._options())
        if self.process_index == 0:
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    def load_module(self, module: nn.Module, path: Path, strict: bool = True) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        state = load_file(str(path))
        expected = set(self.model_keys(module))
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if strict and (missing or unexpected):
            raise RuntimeError(f"The checkpoint {path} does not match the model: missing keys {missing}, "
                               f"unexpected keys {unexpected}.")
        set_model_state_dict(module, state, options=self._options(strict=strict))

    @staticmethod
    def model_keys(module: nn.Module) -> list[str]:
        return list(module.state_dict().keys())

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self._require_module(), optimizer, options=self._options())

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        has_tensors = any(torch.is_tensor(v) for per_param in state.get("state", {}).values() for v in per_param.values())
        if not has_tensors:  # e.g. plain SGD: only the hyperparameters (lr...) to restore
            for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
                group.update({k: v for k, v in saved.items() if k != "params"})
            return
        set_optimizer_state_dict(self._require_module(), optimizer, state, options=self._options())

    def _require_module(self) -> nn.Module:
        if self._module is None:
            raise RuntimeError("FSDP needs the model prepared before its optimizer state can be saved or loaded.")
        return self._module
