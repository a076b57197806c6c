"""``Trainer``: owns the training loop; customised by subclassing, extended by callbacks.

The loop in ``fit`` reads top to bottom: epochs, batches, one micro-step each, validation when
due, checkpoints and logging through callbacks. It never names a backend: placement and
synchronisation are the Strategy's, dtypes the Precision policy's, and when to step the
accumulation policy's, all reached through the Accelerator.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.accelerator import Accelerator
from trainer.callbacks import Callback, ModelCheckpoint, ModelSummary, ProgressBar, Timer, Tracker
from trainer.callbacks.bus import CallbackBus
from trainer.callbacks.trackers import TrackersArgument, default_trackers, make_trackers
from trainer.checkpoint_state import TrainerCheckpointState
from trainer.fit_checks import fit_session, refuse_empty
from trainer.graceful_stop import DEFAULT_SIGNALS, StopSignals
from trainer.metrics import LogRecord
from trainer.nonfinite import NonFiniteGuard
from trainer.parallelism import ParallelismConfig
from trainer.progress import TrainerProgress
from trainer.random_state import set_seed
from trainer.run_limits import DataLimits
from trainer.scheduling import SchedulePlan
from trainer.step_outputs import call_model, loss_of, loss_record, mean_loss, optimizers_of, unpack_loss
from trainer.strategies import Strategy
from trainer.trainer_arguments import as_duration, check_numbers, compile_plugin, epochs_to_train, refuse_unknown
from trainer.trainer_checkpoints import TrainerCheckpoints, finish_pending_save
from trainer.trainer_data import build_dataloader, pad_token_id
from trainer.trainer_evaluation import TrainerEvaluation, named_sets
from trainer.trainer_logging import TrainerLogging


class Trainer(TrainerCheckpoints, TrainerLogging, TrainerEvaluation):
    """Train, validate and predict with a model.

    Args:
        model: the ``nn.Module``. A model whose output has ``.loss`` (a transformers model) trains
            without overriding ``training_step``.
        optimizer: the optimizer; by default ``configure_optimizers`` makes it.
        scheduler: a learning-rate scheduler stepped after each optimizer step; by default the one
            ``configure_optimizers`` returns, if any.
        train_data: a torch Dataset, a ``datasets.Dataset`` or a DataLoader to train on.
        eval_data: the same kinds, to validate on; or ``{"name": data, ...}`` for several sets, whose
            metrics are logged as ``<metric>/<name>``.
        batch_size: samples per process and micro-batch for the DataLoaders built here.
        eval_batch_size: the validation and prediction batch size (default: ``batch_size``).
        collate_fn: how samples become a batch. By default tokenised examples (dicts with
            ``input_ids``) are padded per batch, other samples stacked.
        tokenizer: gives the pad token for tokenised examples (else the model's ``config.pad_token_id``).
        num_workers: DataLoader worker processes.
        shuffle: shuffle the training data each epoch (seeded: a resumed run draws the same order).
        max_epochs: epochs to train (default: 1, or no limit when ``max_steps`` is given).
        max_steps: optimizer steps to train; training ends when either limit is reached.
        max_time: a time budget (``"DD:HH:MM:SS"``, a timedelta, a dict, seconds): training stops after
            the optimizer step that spends it.
        limit_train_batches: training batches per epoch (a whole number) or a fraction of them.
        limit_eval_batches: validation batches per set (a whole number) or a fraction of them.
        overfit_batches: train and validate on these first training batches only (unshuffled).
        fast_dev_run: ``True`` or n: n training and validation batches, no checkpoints, no trackers.
        load_best_at_end: after ``fit``, load the weights of the best checkpoint of the monitored
            ModelCheckpoint.
        compile: ``True`` or a dict of ``torch.compile`` arguments: compile the model in place
            (checkpoint keys stay the model's own).
        strategy: ``"auto"`` reads what ``trainer launch`` set; a name or a Strategy (see ``Accelerator``).
        parallelism: a ``ParallelismConfig`` (data-parallel replicate x shard, tensor-parallel sizes):
            the model is laid out on its ``DeviceMesh`` (``Accelerator(parallelism_config=...)``).
        precision: ``"auto"`` reads what ``trainer launch`` set; ``"bf16"``, ``"fp16"``, ``"no"``...
        accumulate: micro-batches per optimizer step (default: what ``trainer launch`` set, else 1).
        accumulation_normalize: ``"mean"``, or ``"tokens"`` for losses summed over tokens
            (``training_step`` then returns ``{"loss", "num_tokens"}``).
        grad_clip: max total gradient norm, or None.
        on_nonfinite: a NaN or infinite loss (or gradient norm, when clipping): ``"error"`` stops the
            run before the weights take the step, ``"skip"`` drops the step, ``"warn"`` steps anyway.
        eval_every_n_steps: validate every this many optimizer steps (if ``eval_data`` is given).
        eval_every_n_epochs: validate at the end of every this many epochs (if ``eval_data`` is given).
        log_every_n_steps: how often the training loss is logged.
        seed: seeds python, numpy and torch before anything random happens.
        output_dir: where checkpoints go (``output_dir/checkpoints``) and local trackers write.
        callbacks: extra callbacks; a ProgressBar and a ModelCheckpoint are added unless present.
        trackers: experiment trackers: names (``"mlflow"``, ``"wandb"``, ...) or Tracker instances.
            None (the default) records locally with no server: CSV, plus MLflow in a sqlite store
            under ``output_dir`` when mlflow is installed (``TRAINER_TRACKERS`` overrides); ``[]``
            records nothing.
        project: the project the trackers file the run under.
        run_name: the run's name in the trackers.
        hparams: extra run configuration stored with the run (the Trainer's own settings and a
            transformers model's ``config`` are stored too).
        progress_bar: add a ProgressBar unless ``callbacks`` holds one.
        model_summary: add a ModelSummary (the table of modules and parameters, printed when
            ``fit`` begins) unless ``callbacks`` holds one.
        checkpoint: add a ModelCheckpoint unless ``callbacks`` holds one.
        cpu: run on the CPU even where an accelerator is present.
        stop_signals: signals that make ``fit`` stop at the next optimizer step, save a checkpoint,
            point ``latest`` at it and exit with 128 + the signal's number (``()``: none).
        preemption_signal: a cluster's warning before preemption (``"SIGUSR1"`` for ``sbatch
            --signal=USR1@90``): the same, and under SLURM the job is requeued.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        *,
        train_data: Any = None,
        eval_data: Any = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        collate_fn: Callable | None = None,
        tokenizer: Any = None,
        num_workers: int = 0,
        shuffle: bool = True,
        max_epochs: int | None = None,
        max_steps: int | None = None,
        max_time: Any = None,
        limit_train_batches: int | float | None = None,
        limit_eval_batches: int | float | None = None,
        overfit_batches: int | float = 0,
        fast_dev_run: bool | int = False,
        compile: bool | Mapping[str, Any] = False,
        load_best_at_end: bool = False,
        strategy: str | Strategy = "auto",
        parallelism: ParallelismConfig | None = None,
        precision: str = "auto",
        accumulate: int | None = None,
        accumulation_normalize: str = "mean",
        grad_clip: float | None = None,
        on_nonfinite: str = "error",
        eval_every_n_steps: int | None = None,
        eval_every_n_epochs: int | None = 1,
        log_every_n_steps: int = 10,
        seed: int = 0,
        output_dir: str | os.PathLike = "outputs",
        callbacks: list[Callback] | None = None,
        trackers: TrackersArgument = None,
        project: str = "trainer",
        run_name: str | None = None,
        hparams: Mapping[str, Any] | None = None,
        progress_bar: bool = True,
        model_summary: bool = True,
        checkpoint: bool = True,
        cpu: bool = False,
        stop_signals: tuple[str | int, ...] = DEFAULT_SIGNALS,
        preemption_signal: str | int | None = None,
        **unknown: Any,
    ) -> None:
        refuse_unknown(Trainer.__init__, unknown)
        check_numbers(batch_size=batch_size, max_epochs=max_epochs, log_every_n_steps=log_every_n_steps,
                      eval_every_n_steps=eval_every_n_steps, eval_every_n_epochs=eval_every_n_epochs,
                      max_steps=max_steps, grad_clip=grad_clip)
        limits = DataLimits.from_arguments(fast_dev_run, limit_train_batches, limit_eval_batches, overfit_batches)
        duration = as_duration(max_time)
        self._stop = StopSignals(stop_signals, preemption_signal)
        if limits.fast_dev_run:  # a quick check of the code: no checkpoints, no records
            trackers, checkpoint, max_epochs, max_steps, duration = [], False, 1, None, None
            callbacks = [cb for cb in callbacks or [] if not isinstance(cb, (ModelCheckpoint, Tracker))]
        trackers = make_trackers(default_trackers() if trackers is None else trackers)  # a missing package fails here
        set_seed(seed)
        self.accelerator = Accelerator(
            mixed_precision=None if precision == "auto" else precision, gradient_accumulation_steps=accumulate,
            accumulation_normalize=accumulation_normalize, strategy=None if strategy == "auto" else strategy, cpu=cpu,
            dynamo_plugin=compile_plugin(compile), parallelism_config=parallelism)
        self.max_epochs, self.max_steps = epochs_to_train(max_epochs, max_steps), max_steps
        self.load_best_at_end = load_best_at_end
        self.grad_clip = grad_clip
        self.eval_every_n_steps, self.eval_every_n_epochs = eval_every_n_steps, eval_every_n_epochs
        self.log_every_n_steps = log_every_n_steps
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.progress = TrainerProgress()
        self.metrics: dict[str, float] = {}
        self._logged = LogRecord()
        self.should_stop = False
        self.project, self.run_name, self.hparams = project, run_name, dict(hparams or {})
        self._settings = {"batch_size": batch_size, "max_epochs": max_epochs, "max_steps": max_steps,
                          "accumulate": self.accelerator.gradient_accumulation_steps, "grad_clip": grad_clip,
                          "precision": self.accelerator.mixed_precision, "seed": seed,
                          "num_processes": self.accelerator.num_processes}
        self._stop.by_agreement = self.accelerator.num_processes > 1
        self._nonfinite = NonFiniteGuard(on_nonfinite, self._agree_at_step if self._stop.by_agreement else None)
        self._scaled = self.accelerator.scaler is not None  # fp16 loss scaling: the scaler judges the gradients
        timer = [Timer(duration)] if duration is not None else []
        self.callbacks = CallbackBus(self._default_callbacks([*(callbacks or []), *timer, *trackers], progress_bar,
                                                             model_summary, checkpoint))
        # call(event, *args): run the event on every callback that handles it, in the bus's order, this trainer first
        self.call = self.callbacks.caller(self)

        self.model = self.accelerator.prepare(model)
        build: dict[str, Any] = {"collate_fn": collate_fn, "num_workers": num_workers,
                                 "pad_token_id": pad_token_id(model, tokenizer)}
        eval_sets = named_sets(train_data if limits.overfit else eval_data)
        for name, data in (("train_data", train_data), *((f"eval_data[{n!r}]" if n else "eval_data", d)
                                                         for n, d in eval_sets.items())):
            refuse_empty(data, name)
        if limits.overfit:  # the same first training batches, in order, to train and to validate on
            shuffle = False
        self.train_loader = self._prepare_data(train_data, batch_size, shuffle, **build)
        self._train_source = (train_data, shuffle, build, limits)  # what rebuild_train_loader builds from
        self.eval_loaders = {name: self._prepare_data(data, eval_batch_size or batch_size, False, **build)
                             for name, data in eval_sets.items()}
        self.eval_loader = next(iter(self.eval_loaders.values()), None)  # the first (or only) set
        limits.apply(self.train_loader, limits.train, "limit_train_batches")
        for loader in self.eval_loaders.values():
            limits.apply(loader, limits.eval, "limit_eval_batches")
        self._predict_build = {"batch_size": eval_batch_size or batch_size, **build}
        # After the loaders: configure_optimizers may size a schedule with estimated_stepping_batches.
        self.optimizer, self.scheduler = self._optimizers(optimizer, scheduler)
        self.accelerator.register_for_checkpointing(TrainerCheckpointState(self))
        self.fitting = False  # True inside fit(): callbacks that only act while training check it
        self._group_losses: list[float | torch.Tensor] = []  # this accumulation group's micro-batch losses (loss_record)

    # -- the parts a subclass overrides ------------------------------------------------------------
    def training_step(self, batch: Any) -> Any:
        """The loss of one micro-batch (or a dict with ``loss``). Default: the model's ``.loss``."""
        return loss_of(self.forward(batch))

    def validation_step(self, batch: Any) -> Mapping[str, Any]:
        """A dict of scalar metrics for one batch. Default: ``{"val_loss": loss}``."""
        return {"val_loss": loss_of(self.forward(batch))}

    def predict_step(self, batch: Any) -> Any:
        """What ``predict`` returns for one batch. Default: the model's output."""
        return self.forward(batch)

    def configure_optimizers(self) -> Any:
        """An optimizer, or ``(optimizer, scheduler)``. Default: AdamW with lr 1e-3."""
        return torch.optim.AdamW(self.model.parameters(), lr=1e-3)

    def forward(self, batch: Any) -> Any:
        """Call the model on a batch: a dict as keyword arguments, a tuple or list as positional ones.

        Dict keys the model's ``forward`` does not take (a ``text`` column left in a dataset) are
        left out, as a transformers model would otherwise refuse the call.
        """
        if isinstance(batch, Mapping):
            accepted = self._accepted_keys()
            batch = batch if accepted is None else {k: v for k, v in batch.items() if k in accepted}
        return call_model(self.model, self.accelerator.unwrap_model(self.model), batch)

    def _accepted_keys(self) -> frozenset[str] | None:
        """The keyword arguments the model's forward takes (None: it takes any)."""
        if not hasattr(self, "_forward_keys"):
            parameters = inspect.signature(self.accelerator.unwrap_model(self.model).forward).parameters.values()
            any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
            self._forward_keys = None if any_keyword else frozenset(p.name for p in parameters)
        return self._forward_keys

    # -- public surface ------------------------------------------------------------------------------
    @property
    def global_step(self) -> int:
        return self.progress.global_step

    @property
    def current_epoch(self) -> int:
        return self.progress.epoch

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def validates(self) -> bool:
        """Whether ``fit`` validates: there is validation data and a schedule to run it."""
        return self.eval_loader is not None and (self.eval_every_n_steps or self.eval_every_n_epochs) is not None

    @property
    def estimated_stepping_batches(self) -> int:
        """How many optimizer steps ``fit`` takes: to size a schedule (the Trainer steps it once per optimizer step).

        The smaller of ``max_steps`` and the batches this process sees per epoch, grouped by the
        accumulation steps, times ``max_epochs``.
        """
        by_epochs = None
        if self.max_epochs is not None and self.train_loader is not None and hasattr(self.train_loader, "__len__"):
            by_epochs = math.ceil(len(self.train_loader) / self.accelerator.gradient_accumulation_steps) * self.max_epochs
        limits = [steps for steps in (self.max_steps, by_epochs) if steps is not None]
        if not limits:
            raise ValueError("estimated_stepping_batches needs max_steps, or train_data whose length is known.")
        return min(limits)

    # -- fit ------------------------------------------------------------------------------------------
    def fit(self, resume: str | os.PathLike | None = None) -> dict[str, float]:
        """Train until ``max_epochs``/``max_steps`` or until a callback sets ``should_stop``.

        ``resume="latest"`` continues from the newest complete checkpoint in ``output_dir`` (and
        starts afresh when there is none); a path resumes from that checkpoint.
        """
        with fit_session(self), self._stop:  # checks first; one run per output folder; signals stop at a step
            if resume is not None:
                self._resume(resume)
            self.fitting = True
            try:
                self.call("on_fit_start")
                while not self._finished():
                    self._train_epoch()
                self.accelerator.wait_for_checkpoint()  # an asynchronous save is in place (or raises) before the end
                if self.load_best_at_end:
                    self.load_weights("best")
                self.call("on_fit_end")
            except BaseException as exception:
                finish_pending_save(self.accelerator, exception)
                self.call("on_exception", exception)
                raise
            finally:
                self.fitting = False
        return dict(self.metrics)

    def _train_epoch(self) -> None:
        progress, accelerator = self.progress, self.accelerator
        self.model.train()
        self.train_loader.set_epoch(progress.epoch)
        if progress.batch_in_epoch == 0:
            self.call("on_train_epoch_start")
            batches = self.train_loader
        else:  # resuming inside this epoch: its first batches are skipped, not loaded
            batches = accelerator.skip_first_batches(self.train_loader, progress.batch_in_epoch)
        accumulation = accelerator.accumulation
        listened = self.callbacks.listened  # events no callback handles are not dispatched
        for batch in batches:
            batch_idx = progress.batch_in_epoch
            if "on_train_batch_start" in listened:
                self.call("on_train_batch_start", batch, batch_idx)
            outputs = self._training_micro_step(batch)
            progress.batch_in_epoch += 1
            self.call("on_train_batch_end", outputs, batch, batch_idx)
            if accumulation.sync_gradients:  # an optimizer step ended here
                if self._validation_due_after_step():
                    self.validate()
                if (signum := self._stop.requested()) is not None:
                    self.stop_on_signal(signum)  # saves a checkpoint, then raises TrainingInterrupted
            if (self.should_stop or self._reached_max_steps()) and not self.train_loader.end_of_dataloader:
                return  # stopped inside the epoch: its end (validation, on_train_epoch_end) does not run
        self._end_epoch()

    def _training_micro_step(self, batch: Any) -> Any:
        accelerator, progress, listened = self.accelerator, self.progress, self.callbacks.listened
        with accelerator.accumulate(self.model):
            outputs = self.training_step(batch)
            loss, num_tokens = unpack_loss(outputs)
            self._group_losses.append(loss_record(loss))  # checked before the step, logged after it
            if "on_before_backward" in listened:
                self.call("on_before_backward", loss)
            accelerator.backward(loss, num_tokens=num_tokens)
            if "on_after_backward" in listened:
                self.call("on_after_backward")
            if accelerator.accumulation.sync_gradients:
                norm = accelerator.clip_grad_norm_(self.model.parameters(), self.grad_clip) if self.grad_clip else None
                if self._nonfinite.step_allowed(self._group_losses, None if self._scaled else norm,
                                                progress.global_step + 1, self._recovery_hint):
                    if "on_before_optimizer_step" in listened:
                        self.call("on_before_optimizer_step", self.optimizer)
                    self.optimizer.step()
                    self._schedule.after_optimizer_step(progress.global_step + 1, self.metrics)
                else:
                    self.optimizer.step_was_skipped = True  # as after an fp16 overflow: EMA leaves it out
                    self._group_losses.clear()  # a skipped step's losses are not logged
                self.optimizer.zero_grad()
                progress.global_step += 1
                if progress.global_step % self.log_every_n_steps == 0:
                    self._log_training_loss()
                self._group_losses.clear()
        return outputs

    def _end_epoch(self) -> None:
        if self._validation_due_after_epoch():
            self.validate()
        self._schedule.after_epoch(self.progress.epoch, self.metrics)  # before on_train_epoch_end's checkpoint
        self.progress.epoch_end_done = True
        self.call("on_train_epoch_end")
        self.progress.start_next_epoch()

    def rebuild_train_loader(self, batch_size: int) -> None:
        """Build the training loader again from ``train_data`` with ``batch_size`` (``BatchSizeFinder`` calls it).

        The new loader takes the old one's place among the loaders checkpoints hold, and keeps its
        epoch, its shuffle seed and ``limit_train_batches``; the run's configuration records the size.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"rebuild_train_loader(batch_size={batch_size!r}): use a whole number >= 1.")
        data, shuffle, build, limits = self._train_source
        if isinstance(data, torch.utils.data.DataLoader):
            raise ValueError("rebuild_train_loader: train_data is a DataLoader, whose batch size is its own: pass "
                             "its Dataset as train_data (and batch_size) so the loader can be rebuilt.")
        old = self.train_loader
        new = self._prepare_data(data, batch_size, shuffle, register=False, **build)
        new.load_state_dict(old.state_dict(), resume=False)
        limits.apply(new, limits.train, "limit_train_batches")
        registered = self.accelerator._dataloaders  # the new loader takes the old one's place in checkpoints
        registered[registered.index(old)] = new
        self.train_loader = new
        self._settings["batch_size"] = batch_size

    # -- small helpers ------------------------------------------------------------------------------------
    def _finished(self) -> bool:
        return (self.should_stop or (self.max_epochs is not None and self.progress.epoch >= self.max_epochs)
                or self._reached_max_steps())

    def _reached_max_steps(self) -> bool:
        return self.max_steps is not None and self.progress.global_step >= self.max_steps

    def _validation_due_after_step(self) -> bool:
        """After an optimizer step: whether validation is due at this step."""
        n = self.eval_every_n_steps
        return (self.eval_loader is not None and n is not None and self.progress.global_step % n == 0
                and self.progress.validated_at != self.progress.position)

    def _validation_due_after_epoch(self) -> bool:
        n = self.eval_every_n_epochs
        return (self.eval_loader is not None and n is not None and (self.progress.epoch + 1) % n == 0
                and self.progress.validated_at != self.progress.position)

    def _log_training_loss(self) -> None:
        # The group's losses (loss_record): the non-finite check read them before the step; their
        # mean is logged on logged steps (none when the step was skipped).
        if self._group_losses:
            self.log("train_loss", mean_loss(self._group_losses))

    def _optimizers(self, optimizer: Any, scheduler: Any) -> tuple[Any, Any]:
        optimizer, scheduler, when = optimizers_of(optimizer if optimizer is not None else self.configure_optimizers(),
                                                   scheduler)
        optimizer = self.accelerator.prepare(optimizer)
        # One scheduler step per optimizer step: the Trainer's schedules are sized in optimizer steps
        # (estimated_stepping_batches), whatever the number of processes.
        prepared = self.accelerator.prepare_scheduler(scheduler, steps_per_update=1) if scheduler is not None else None
        self._schedule = SchedulePlan(prepared, **when)
        return optimizer, prepared

    def _prepare_data(self, data: Any, batch_size: int, shuffle: bool, private_rng: bool = False,
                      register: bool = True, **build: Any) -> Any:
        """A prepared loader; ``register=False`` for one-off loaders that checkpoints must not count."""
        if data is None:
            return None
        loader = build_dataloader(data, batch_size, shuffle, private_rng=private_rng, **build)
        return self.accelerator.prepare_data_loader(loader, register=register)

    @staticmethod
    def _default_callbacks(callbacks: list[Callback], progress_bar: bool, model_summary: bool,
                           checkpoint: bool) -> list[Callback]:
        if progress_bar and not any(isinstance(cb, ProgressBar) for cb in callbacks):
            callbacks.insert(0, ProgressBar())
        if model_summary and not any(isinstance(cb, ModelSummary) for cb in callbacks):
            callbacks.insert(0, ModelSummary())
        if checkpoint and not any(isinstance(cb, ModelCheckpoint) for cb in callbacks):
            callbacks.append(ModelCheckpoint())
        return callbacks
