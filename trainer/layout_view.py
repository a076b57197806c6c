"""What the Accelerator tells a script about the processes' layout: the N-D mesh, each process's place on it,
and which kind of sharding runs (Accelerate's ``parallelism_config``, ``torch_device_mesh``, ``*_parallel_rank``,
``is_fsdp2``, ``multi_device``, ``should_save_model``)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from trainer.utils.enums import DistributedType

if TYPE_CHECKING:
    from trainer.parallelism import ParallelismConfig
    from trainer.strategies import Strategy

# The distributed types of several accelerator devices (one process each), as Accelerate counts them.
_MULTI_DEVICE = {DistributedType.MULTI_GPU, DistributedType.MULTI_NPU, DistributedType.MULTI_MLU,
                 DistributedType.MULTI_SDAA, DistributedType.MULTI_MUSA, DistributedType.MULTI_XPU,
                 DistributedType.MULTI_HPU, DistributedType.MULTI_NEURON}


class LayoutView:
    """Read-only facts of the layout, from the strategy (mixed into ``Accelerator``)."""

    strategy: Strategy

    if TYPE_CHECKING:  # the Accelerator's own facts
        @property
        def distributed_type(self) -> Any: ...

        @property
        def use_distributed(self) -> bool: ...

        @property
        def is_local_main_process(self) -> bool: ...

    @property
    def parallelism_config(self) -> ParallelismConfig | None:
        """The ``ParallelismConfig`` the run was given (``Accelerator(parallelism_config=...)``, the launch's), or None."""
        return self.strategy.parallelism_config

    @property
    def torch_device_mesh(self) -> Any:
        """The ``DeviceMesh`` of the processes (named dimensions ``dp_replicate``, ``dp_shard``, ``tp``, ``pp``), or None."""
        return self.strategy.device_mesh

    def _rank_on(self, dimension: str, kind: str) -> int:
        if self.parallelism_config is None:
            raise RuntimeError(f"{kind} is not configured: give Accelerator(parallelism_config=ParallelismConfig(...)) "
                               "(or the launch's parallelism_config section) to lay the processes out on a mesh.")
        mesh = self.torch_device_mesh
        return mesh.get_local_rank(dimension) if dimension in (mesh.mesh_dim_names or ()) else 0

    @property
    def data_parallel_rank(self) -> int:
        """This process's index among the data-parallel replicas (0 where there is one)."""
        return self._rank_on("dp_replicate", "Data parallelism")

    @property
    def data_parallel_shard_rank(self) -> int:
        """This process's index among the processes the weights are sharded over (0 where they are not)."""
        return self._rank_on("dp_shard", "Shard-based data parallelism")

    @property
    def tensor_parallel_rank(self) -> int:
        """This process's index in its tensor-parallel group (0 where there is none)."""
        return self._rank_on("tp", "Tensor parallelism")

    @property
    def pipeline_parallel_rank(self) -> int:
        """This process's pipeline stage (0 where there is one stage)."""
        return self._rank_on("pp", "Pipeline parallelism")

    @property
    def context_parallel_rank(self) -> int:
        """This process's index in its context-parallel group: always 0 here (``cp_size`` is 1)."""
        return self._rank_on("cp", "Context parallelism")

    @property
    def is_fsdp2(self) -> bool:
        """Whether the model is sharded with FSDP, which is ``fully_shard`` (FSDP2) here."""
        return self.distributed_type == DistributedType.FSDP

    @property
    def is_composable_parallelism_enabled(self) -> bool:
        """Whether the composable N-D parallelism of ``fully_shard`` runs (Accelerate's name for ``is_fsdp2``)."""
        return self.is_fsdp2

    @property
    def multi_device(self) -> bool:
        """Whether several processes each drive an accelerator device (DDP on GPUs and the like)."""
        return self.use_distributed and self.distributed_type in _MULTI_DEVICE

    @property
    def should_save_model(self) -> bool:
        """Whether this process takes part in writing the model: every process with a ``ParallelismConfig`` (the
        weights are sharded and gathered together), else the main process of each machine, as Accelerate says."""
        return True if self.parallelism_config is not None else self.is_local_main_process

    @contextmanager
    def maybe_context_parallel(self, buffers: Sequence[Any] | None = None, buffer_seq_dims: Sequence[int] | None = None,
                               no_restore_buffers: set[Any] | None = None) -> Iterator[None]:
        """Accelerate's context for splitting ``buffers`` along the sequence for context parallelism. ``cp_size`` is
        always 1 here (``ParallelismConfig`` refuses more), so the block runs on whole sequences, as Accelerate's
        does when context parallelism is off."""
        yield

    def deepspeed_ulysses_dl_adapter(self, dl: Any, model: Any) -> Any:
        """Accelerate's adapter of a data loader for DeepSpeed's Ulysses sequence parallelism. Sequence parallelism
        is not enabled here (no ``sp_size``), so the loader is returned as it is, as Accelerate does without it."""
        return dl
