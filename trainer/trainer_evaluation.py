"""The Trainer's evaluation: ``validate`` (one or several named sets), ``test`` and ``predict``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.inference.inferencer import Inferencer
from trainer.inference.outputs import save_outputs
from trainer.metrics import MetricAccumulator
from trainer.operations import find_batch_size
from trainer.random_state import forked_rng

if TYPE_CHECKING:
    from trainer.accelerator import Accelerator
    from trainer.progress import TrainerProgress


def named_sets(data: Any) -> dict[str, Any]:
    """``{"name": data, ...}`` as given (a dict of datasets or loaders), else ``{"": data}``; None gives none."""
    if data is None:
        return {}
    if isinstance(data, Mapping) and data and not any(torch.is_tensor(v) for v in data.values()):
        if not all(isinstance(name, str) and name for name in data):
            raise ValueError(f"Named evaluation sets need non-empty string names, got {list(data)}.")
        return dict(data)
    return {"": data}


class TrainerEvaluation:
    """Mixed into ``Trainer``: running the model without gradients over validation, test and prediction data."""

    accelerator: Accelerator
    model: torch.nn.Module
    progress: TrainerProgress
    eval_loaders: dict[str, Any]
    _predict_build: dict[str, Any]

    call: Callable[..., None]  # the Trainer's event dispatch: call(event, *args)

    def log_dict(self, values: Mapping[str, Any], sync: bool = False) -> None:
        raise NotImplementedError

    def validation_step(self, batch: Any) -> Mapping[str, Any]:
        raise NotImplementedError

    def predict_step(self, batch: Any) -> Any:
        raise NotImplementedError

    def test_step(self, batch: Any) -> Mapping[str, Any]:
        """A dict of scalar metrics for one test batch. Default: ``validation_step``."""
        return self.validation_step(batch)

    def load_weights(self, ckpt: str | os.PathLike) -> Path:
        raise NotImplementedError

    def _prepare_data(self, data: Any, batch_size: int, shuffle: bool, private_rng: bool = False,
                      register: bool = True, **build: Any) -> Any:
        raise NotImplementedError

    @property
    def is_main_process(self) -> bool:
        raise NotImplementedError

    def validate(self, eval_data: Any = None) -> dict[str, float]:
        """Run ``validation_step`` over the validation set(s); metrics are reduced once per set, at the end.

        With several named sets (``eval_data={"a": ..., "b": ...}``) each metric is logged as
        ``<metric>/<name>`` (``val_loss/a``).
        """
        loaders = self.eval_loaders if eval_data is None else self._one_off_loaders(eval_data)
        if not loaders:
            raise ValueError("validate() needs eval_data: pass it to the Trainer or to validate().")
        was_training = self.model.training
        self.call("on_validation_start")
        self.model.eval()
        metrics = self._evaluate(loaders, self.validation_step, "on_validation_batch_end")
        self.log_dict(metrics)
        if eval_data is None:  # the run's own validation happened here (other data does not count)
            self.progress.validated_at = self.progress.position
        self.call("on_validation_end", metrics)
        self.model.train(was_training)
        return metrics

    def test(self, data: Any, ckpt: str | os.PathLike | None = None) -> dict[str, float]:
        """Run ``test_step`` over ``data`` (one set, or named sets as for ``eval_data``); return its metrics.

        ``ckpt`` picks the weights first: ``"best"`` (the best checkpoint of a monitored
        ModelCheckpoint), ``"last"`` (the newest checkpoint), a checkpoint folder, or None (the
        weights as they are). Metric names starting with ``val_`` start with ``test_`` instead.
        """
        if ckpt is not None:
            self.load_weights(ckpt)
        loaders = self._one_off_loaders(data)
        was_training = self.model.training
        self.call("on_test_start")
        self.model.eval()
        raw = self._evaluate(loaders, self.test_step, "on_test_batch_end")
        metrics = {("test_" + name[4:] if name.startswith("val_") else name): value for name, value in raw.items()}
        self.log_dict(metrics)
        self.call("on_test_end", metrics)
        self.model.train(was_training)
        return metrics

    def _one_off_loaders(self, data: Any) -> dict[str, Any]:
        """Loaders over ``data`` (named sets, or one), not registered for checkpoints."""
        return {name: self._prepare_data(part, shuffle=False, private_rng=True, register=False, **self._predict_build)
                for name, part in named_sets(data).items()}

    def _evaluate(self, loaders: Mapping[str, Any], step: Callable[[Any], Mapping[str, Any]],
                  batch_event: str) -> dict[str, float]:
        """``step`` over each loader without gradients; the metrics of each, reduced, suffixed by its name."""
        metrics: dict[str, float] = {}
        # Evaluation must not move training's random stream (shuffling, dropout): whatever it draws,
        # from the loader or from the step, comes from a copy of the RNG state.
        with torch.no_grad(), forked_rng(self.accelerator.device):
            for name, loader in loaders.items():
                totals = MetricAccumulator()
                for batch_idx, batch in enumerate(loader):
                    outputs = step(batch)
                    totals.update(outputs, find_batch_size(batch) or 1)
                    self.call(batch_event, outputs, batch, batch_idx)
                metrics.update({f"{key}/{name}" if name else key: value
                                for key, value in totals.compute(self.accelerator.strategy).items()})
        return metrics

    def predict(self, data: Any, stream: bool = False, *, device_map: Any = None,
                max_memory: Mapping[Any, int | str] | None = None, offload_folder: str | os.PathLike | None = None,
                no_split_module_classes: list[str] | None = None, prefetch: int = 1,
                output_dir: str | os.PathLike | None = None) -> list[Any] | Iterator[Any]:
        """``predict_step`` over ``data`` in batches, without gradients.

        Returns the list of per-batch outputs, or with ``stream=True`` an iterator that yields them
        as they are computed. ``output_dir`` writes each batch's outputs to
        ``batch_<i>.safetensors`` there and returns the file paths (for outputs too large to hold).

        With ``device_map`` (``"auto"``, a dict ...) the model runs through an ``Inferencer``: its
        weights spread over accelerators, CPU and disk within ``max_memory``, offloaded layers
        written to ``offload_folder`` and read back ``prefetch`` layers ahead; afterwards the
        weights are back where they were, so training can go on.
        """
        loader = self._prepare_data(data, shuffle=False, private_rng=True, register=False, **self._predict_build)
        if device_map is None:
            iterator = self._predict_batches(loader, output_dir)
        else:
            if self.accelerator.num_processes > 1:
                raise ValueError("predict(device_map=...) runs one process's model over devices and disk; run it in one "
                                 "process (each process would otherwise offload its own copy), or leave device_map out.")
            inferencer = Inferencer(self.accelerator.unwrap_model(self.model), device_map=device_map, max_memory=max_memory,
                                    no_split_module_classes=no_split_module_classes, offload_folder=offload_folder,
                                    prefetch=prefetch, keep_weights=True)
            iterator = inferencer.closing_after(self._predict_batches(loader, output_dir))
        return iterator if stream else list(iterator)

    def _predict_batches(self, loader: Any, output_dir: str | os.PathLike | None = None) -> Iterator[Any]:
        was_training = self.model.training
        self.model.eval()
        self.call("on_predict_start")
        try:
            for batch_idx, batch in enumerate(loader):
                # no_grad per batch, not around the yield: the caller's code between batches keeps
                # its own grad mode.
                with torch.no_grad():
                    outputs = self.predict_step(batch)
                if self.accelerator.use_distributed:  # every process returns all predictions, in order
                    outputs = self.accelerator.gather_for_metrics(outputs)
                self.call("on_predict_batch_end", outputs, batch, batch_idx)
                if output_dir is not None:
                    written = save_outputs(outputs, output_dir, batch_idx) if self.is_main_process else None
                    yield written
                else:
                    yield outputs
            self.call("on_predict_end")
        finally:
            self.model.train(was_training)
