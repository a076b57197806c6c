"""DDP: one model replica per process, gradients averaged by ``DistributedDataParallel``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .base import Strategy
from .spec import StrategySpec

_BUILTIN_HOOKS = ("fp16", "bf16")


class DDP(Strategy):
    """Data parallel training with ``torch.nn.parallel.DistributedDataParallel``.

    Args:
        bucket_cap_mb: gradient bucket size for the all-reduce.
        find_unused_parameters: tolerate parameters that get no gradient in some steps (slower).
        static_graph: the set of used parameters never changes (lets DDP skip some bookkeeping).
        gradient_as_bucket_view: gradients alias the communication buckets (saves a copy).
        broadcast_buffers: copy rank 0's buffers (e.g. batch-norm statistics) to all ranks each forward.
        comm_hook: ``"fp16"``/``"bf16"`` (compress gradients for the all-reduce) or a DDP comm hook
            callable ``hook(state, bucket) -> Future``; ``comm_state`` is passed to it as ``state``.
    """

    spec = StrategySpec(name="ddp", summary="data parallel: one replica per process, gradients averaged by "
                        "DistributedDataParallel",
                        distributed_types=("MULTI_GPU", "MULTI_CPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_HPU"),
                        launch_flag="multi_gpu", picked_by_auto=True)

    def __init__(self, bucket_cap_mb: float = 25.0, find_unused_parameters: bool = False, static_graph: bool = False,
                 gradient_as_bucket_view: bool = True, broadcast_buffers: bool = True,
                 comm_hook: str | Callable | None = None, comm_state: Any = None) -> None:
        super().__init__()
        if isinstance(comm_hook, str) and comm_hook not in _BUILTIN_HOOKS:
            raise ValueError(f"DDP(comm_hook={comm_hook!r}): use one of {list(_BUILTIN_HOOKS)} or a hook callable.")
        self.ddp_kwargs: dict[str, Any] = {"bucket_cap_mb": bucket_cap_mb, "find_unused_parameters": find_unused_parameters,
                           "static_graph": static_graph, "gradient_as_bucket_view": gradient_as_bucket_view}
        if not broadcast_buffers:  # passed only when changed: recent torch warns about the argument itself
            self.ddp_kwargs["broadcast_buffers"] = False
        self.comm_hook, self.comm_state = comm_hook, comm_state

    def setup_module(self, module: nn.Module) -> nn.Module:
        module = module.to(self.root_device)
        if not self.is_distributed or not any(p.requires_grad for p in module.parameters()):
            return module  # nothing to synchronise
        device_ids = [self.root_device.index] if self.root_device.type not in ("cpu", "mps") else None
        wrapped = DistributedDataParallel(module, device_ids=device_ids, **self.ddp_kwargs)
        if self.comm_hook is not None:
            wrapped.register_comm_hook(self.comm_state, self._hook())
        return wrapped

    def _hook(self) -> Callable:
        if callable(self.comm_hook):
            return self.comm_hook
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        hooks = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}
        return hooks[str(self.comm_hook)]

    def unwrap_module(self, module: nn.Module) -> nn.Module:
        return module.module if isinstance(module, DistributedDataParallel) else module

    def no_backward_sync(self, module: nn.Module, enabled: bool = True) -> Any:
        if enabled and isinstance(module, DistributedDataParallel):
            return module.no_sync()
        return super().no_backward_sync(module, enabled)

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
