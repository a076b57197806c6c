"""DDP: one model replica per process, gradients averaged by ``DistributedDataParallel``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .base import Strategy
from .spec import StrategySpec

# Hooks torch ships, by name: gradients compressed to 16 bits for the all-reduce, or PowerSGD's low-rank approximation.
_BUILTIN_HOOKS = ("fp16", "bf16", "power_sgd", "batched_power_sgd")
_WRAPPERS = ("fp16", "bf16")  # a PowerSGD hook whose low-rank factors are sent in 16 bits


def multi_device_type(device: torch.device) -> str:
    """The launch configuration's name for data parallel on ``device``'s kind: ``MULTI_CPU``, ``MULTI_GPU`` (CUDA)..."""
    return "MULTI_GPU" if device.type == "cuda" else f"MULTI_{device.type.upper()}"


class DDP(Strategy):
    """Data parallel training with ``torch.nn.parallel.DistributedDataParallel``.

    Args:
        bucket_cap_mb: gradient bucket size for the all-reduce.
        find_unused_parameters: tolerate parameters that get no gradient in some steps (slower).
        static_graph: the set of used parameters never changes (lets DDP skip some bookkeeping).
        gradient_as_bucket_view: gradients alias the communication buckets (saves a copy).
        broadcast_buffers: copy rank 0's buffers (e.g. batch-norm statistics) to all ranks each forward.
        comm_hook: ``"fp16"``/``"bf16"`` (compress gradients for the all-reduce), ``"power_sgd"`` /
            ``"batched_power_sgd"`` (PowerSGD), or a DDP comm hook callable ``hook(state, bucket) -> Future``.
        comm_state: the state a hook callable receives.
        comm_wrapper: ``"fp16"``/``"bf16"``: send a PowerSGD hook's factors in 16 bits.
        comm_state_option: PowerSGD's settings (``matrix_approximation_rank``, ``start_powerSGD_iter``...).
    """

    spec = StrategySpec(name="ddp", summary="data parallel: one replica per process, gradients averaged by "
                        "DistributedDataParallel",
                        distributed_types=("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_HPU",
                                           "MULTI_SDAA", "MULTI_MUSA", "MULTI_NEURON"),
                        launch_flag="multi_gpu", picked_by_auto=True)

    def __init__(self, bucket_cap_mb: float = 25.0, find_unused_parameters: bool = False, static_graph: bool = False,
                 gradient_as_bucket_view: bool = True, broadcast_buffers: bool = True,
                 comm_hook: str | Callable | None = None, comm_state: Any = None, comm_wrapper: str | None = None,
                 comm_state_option: dict[str, Any] | None = None) -> None:
        super().__init__()
        if isinstance(comm_hook, str) and comm_hook not in _BUILTIN_HOOKS:
            raise ValueError(f"DDP(comm_hook={comm_hook!r}): use one of {list(_BUILTIN_HOOKS)} or a hook callable.")
        if comm_wrapper is not None and comm_wrapper not in _WRAPPERS:
            raise ValueError(f"DDP(comm_wrapper={comm_wrapper!r}): use one of {list(_WRAPPERS)}, or None.")
        if (comm_wrapper is not None or comm_state_option) and comm_hook not in ("power_sgd", "batched_power_sgd"):
            raise ValueError(f"DDP(comm_wrapper=..., comm_state_option=...) configure a PowerSGD hook, and comm_hook is "
                             f"{comm_hook!r}: use comm_hook='power_sgd' or 'batched_power_sgd', or leave them out.")
        self.ddp_kwargs: dict[str, Any] = {"bucket_cap_mb": bucket_cap_mb, "find_unused_parameters": find_unused_parameters,
                           "static_graph": static_graph, "gradient_as_bucket_view": gradient_as_bucket_view}
        if not broadcast_buffers:  # passed only when changed: recent torch warns about the argument itself
            self.ddp_kwargs["broadcast_buffers"] = False
        self.comm_hook, self.comm_state = comm_hook, comm_state
        self.comm_wrapper, self.comm_state_option = comm_wrapper, dict(comm_state_option or {})

    @property
    def distributed_type(self) -> str:
        """``MULTI_<device kind>``: ``MULTI_CPU``, ``MULTI_GPU`` (CUDA), ``MULTI_XPU``..."""
        return multi_device_type(self.root_device)

    def setup_module(self, module: nn.Module) -> nn.Module:
        module = module.to(self.root_device)
        if not self.is_distributed or not any(p.requires_grad for p in module.parameters()):
            return module  # nothing to synchronise
        device_ids = [self.root_device.index] if self.root_device.type not in ("cpu", "mps") else None
        wrapped = DistributedDataParallel(module, device_ids=device_ids, **self.ddp_kwargs)
        if self.comm_hook is not None:
            state, hook = self._hook()
            wrapped.register_comm_hook(state, hook)
        return wrapped

    def _hook(self) -> tuple[Any, Callable]:
        """(state, hook) for ``register_comm_hook``."""
        if callable(self.comm_hook):
            return self.comm_state, self.comm_hook
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

        hooks: dict[str, Callable] = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook,
                                      "power_sgd": powerSGD_hook.powerSGD_hook,
                                      "batched_power_sgd": powerSGD_hook.batched_powerSGD_hook}
        hook = hooks[str(self.comm_hook)]
        if self.comm_wrapper is not None:
            wrap = {"fp16": default_hooks.fp16_compress_wrapper, "bf16": default_hooks.bf16_compress_wrapper}
            hook = wrap[self.comm_wrapper](hook)
        if self.comm_hook in ("power_sgd", "batched_power_sgd"):
            return powerSGD_hook.PowerSGDState(process_group=None, **self.comm_state_option), hook
        return self.comm_state, hook

    def unwrap_module(self, module: nn.Module) -> nn.Module:
        return module.module if isinstance(module, DistributedDataParallel) else module

    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Any:
        if enabled and isinstance(module, DistributedDataParallel):
            return module.no_sync()
        return super().no_backward_sync(module, enabled)

    @contextmanager
    def force_backward_sync(self, module: nn.Module) -> Iterator[None]:
        """DDP's reducer is told to all-reduce in the next backward, whatever ``no_sync`` said."""
        if not isinstance(module, DistributedDataParallel):
            yield
            return
        saved = module.require_backward_grad_sync, module.require_forward_param_sync
        module.require_backward_grad_sync = module.require_forward_param_sync = True
        module.reducer.prepare_for_backward([])
        try:
            yield
        finally:
            module.require_backward_grad_sync, module.require_forward_param_sync = saved

    @contextmanager
    def join(self, modules: list[nn.Module]) -> Iterator[None]:
        """Let processes with fewer batches finish while the others still run (uneven inputs)."""
        from torch.distributed.algorithms.join import Join, Joinable

        joinables: list[Joinable] = [m for m in modules if isinstance(m, DistributedDataParallel)]
        if not joinables:
            yield
            return
        with Join(joinables):
            yield
