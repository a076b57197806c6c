"""N-D parallelism sizes and the ``DeviceMesh`` they make: data parallel replicate x shard, tensor, context, pipeline.

``ParallelismConfig`` names how many processes each kind of parallelism spans; their product is
the process count. The mesh has one named dimension per kind used (size above 1), outermost first:
``pp``, ``dp_replicate``, ``dp_shard``, ``cp``, ``tp`` (tensor parallelism innermost, where
processes talk most). Data is sharded over the data-parallel processes only (``dp_replicate`` x
``dp_shard``): the processes of one tensor-parallel group read the same batches.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

DIMENSIONS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # the mesh's order, outermost first
TRAINED = ("pp", "dp_replicate", "dp_shard", "tp")  # the dimensions training can lay out here (cp is refused)
PP_SCHEDULES = ("GPipe", "1F1B")


@dataclass
class ParallelismConfig:
    """How many processes each kind of parallelism spans; the product must equal the process count.

    Args:
        dp_replicate_size: data-parallel replicas (each holds whole, or ``dp_shard``-sharded, weights).
        dp_shard_size: processes the weights, gradients and optimizer state are sharded over (FSDP).
        tp_size: processes each layer of the tensor-parallel plan is split over.
        cp_size: context parallelism (sequence split across processes): not available on this setup.
        pp_size: pipeline stages: the model is cut into this many consecutive stages, one per process
            of a pipeline (train with ``accelerator.forward_backward``; see ``trainer.strategies.pipeline_parallel``).
        pp_schedule: how the stages interleave micro-batches: ``"1F1B"`` (one forward, one backward in
            turn: fewer activations held) or ``"GPipe"`` (every forward, then every backward).
        pp_microbatches: micro-batches each batch is cut into; by default ``pp_size``. More keep the
            stages busier; each must still be a whole batch dimension.
        pp_split_points: ``"auto"`` (the model's repeated blocks cut evenly) or the names of the modules
            each later stage begins with, e.g. ``["model.layers.16"]``.
        tp_plan: the tensor-parallel plan, ``{"<module name pattern>": "colwise" | "rowwise" | ParallelStyle}``;
            by default the model's own (``config.base_model_tp_plan`` of transformers models).
    """

    dp_replicate_size: int = 1
    dp_shard_size: int = 1
    tp_size: int = 1
    cp_size: int = 1
    pp_size: int = 1
    pp_schedule: str = "1F1B"
    pp_microbatches: int | None = None
    pp_split_points: str | list[str] = "auto"
    tp_plan: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in (f"{dimension}_size" for dimension in DIMENSIONS):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ParallelismConfig({name}={value!r}): use a whole number >= 1.")
        if self.cp_size > 1:
            raise ValueError(f"ParallelismConfig(cp_size={self.cp_size}): context parallelism is not available here "
                             "(it needs torch's context-parallel attention on CUDA devices). Use cp_size=1.")
        if self.pp_schedule.lower() not in {name.lower() for name in PP_SCHEDULES}:
            close = difflib.get_close_matches(self.pp_schedule, PP_SCHEDULES, n=1, cutoff=0.3)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"ParallelismConfig(pp_schedule={self.pp_schedule!r}) is not a pipeline schedule.{hint} "
                             f"Choose one of {', '.join(PP_SCHEDULES)}.")
        if self.pp_microbatches is not None and (not isinstance(self.pp_microbatches, int) or self.pp_microbatches < 1):
            raise ValueError(f"ParallelismConfig(pp_microbatches={self.pp_microbatches!r}): use a whole number >= 1.")
        if self.pp_size > 1 and self.tp_size > 1:
            raise ValueError(f"ParallelismConfig(pp_size={self.pp_size}, tp_size={self.tp_size}): pipeline stages are "
                             "traced graphs, which a tensor-parallel plan cannot split. Combine pp_size with dp_shard_size "
                             "and dp_replicate_size, or tp_size with those, not pp_size with tp_size.")

    @property
    def sizes(self) -> dict[str, int]:
        """Every dimension's size, by name, in the mesh's order."""
        return {name: getattr(self, f"{name}_size") for name in DIMENSIONS}

    @property
    def total_size(self) -> int:
        """The number of processes the layout needs."""
        total = 1
        for size in self.sizes.values():
            total *= size
        return total

    @property
    def dp_size(self) -> int:
        """The data-parallel processes: how many different batches each step reads."""
        return self.dp_replicate_size * self.dp_shard_size

    # -- Accelerate's names for the same facts (scripts and libraries read them) ------------------------
    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate_size > 1

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard_size > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp_size > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp_size > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp_size > 1

    @property
    def sp_enabled(self) -> bool:
        """Sequence parallelism (DeepSpeed Ulysses) is not available here: always False."""
        return False

    @property
    def data_parallel_size(self) -> int:
        return self.dp_size

    @property
    def non_data_parallel_size(self) -> int:
        """The processes that read the same batch: context x tensor parallel."""
        return self.cp_size * self.tp_size

    def _used(self, *names: str) -> list[str]:
        """Those of ``names`` whose size is above 1, in the order given."""
        return [name for name in names if self.sizes[name] > 1]

    @property
    def dp_dim_names(self) -> list[str]:
        """The used dimensions that read different batches."""
        return self._used("dp_replicate", "dp_shard")

    @property
    def non_dp_dim_names(self) -> list[str]:
        """The used dimensions whose processes read the same batch."""
        return self._used("tp", "cp")

    @property
    def dp_shard_cp_dim_names(self) -> list[str]:
        return self._used("dp_shard", "cp")

    @property
    def dp_cp_dim_names(self) -> list[str]:
        """The used dimensions the loss is averaged over."""
        return self._used("dp_replicate", "dp_shard", "cp")

    @property
    def active_mesh_dims(self) -> list[str]:
        return self.dp_dim_names + self.non_dp_dim_names

    def to_json(self) -> dict[str, Any]:
        """The settings as a dict of plain values (the tensor-parallel plan's styles by name)."""
        return {name: (getattr(self, name) if name != "tp_plan" or self.tp_plan is None
                       else {key: str(style) for key, style in self.tp_plan.items()})
                for name in self.__dataclass_fields__}

    @property
    def mesh_dims(self) -> tuple[str, ...]:
        """The names of the mesh's dimensions: the kinds used (size above 1), outermost first.

        ``dp_shard`` stays (of size 1) beside ``dp_replicate``: replicated data parallelism is a
        2-D (replicate x shard) FSDP mesh.
        """
        sizes = self.sizes
        return tuple(name for name, size in sizes.items()
                     if size > 1 or (name == "dp_shard" and sizes["dp_replicate"] > 1))

    def dp_rank(self, process_index: int) -> int:
        """Which data-parallel shard of the data process ``process_index`` reads (row-major mesh order)."""
        inner = self.cp_size * self.tp_size
        return (process_index // inner) % self.dp_size

    def check_processes(self, num_processes: int) -> None:
        """Raise unless the layout spans exactly ``num_processes`` processes."""
        if self.total_size != num_processes:
            used = " x ".join(f"{name}={size}" for name, size in self.sizes.items() if size > 1) or "1"
            raise ValueError(f"ParallelismConfig: {used} spans {self.total_size} process(es), but this run has "
                             f"{num_processes}. Launch {self.total_size} processes, or choose sizes whose product "
                             f"is {num_processes}.")

    def build_device_mesh(self, device_type: str) -> Any:
        """The ``DeviceMesh`` of the used dimensions (one dimension ``dp_shard`` of size 1 when none is used)."""
        from torch.distributed.device_mesh import init_device_mesh

        names = self.mesh_dims or ("dp_shard",)
        return init_device_mesh(device_type, tuple(self.sizes[name] for name in names), mesh_dim_names=names)
