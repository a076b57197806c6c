"""The Callback base class, the events a Trainer emits, and the order in which it emits them.

Override the events you need; each receives the trainer first (a ``TrainerView``: ``trainer.model``,
``trainer.global_step``, ``trainer.log``, ``trainer.should_stop``...). ``EVENT_ORDER`` below is the
loop of ``trainer/trainer.py`` written out as pseudocode, events and all; the documentation's
Trainer page shows the same text.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .protocols import TrainerView

EVENTS = (
    "on_fit_start", "on_train_epoch_start", "on_train_batch_start", "on_before_backward",
    "on_after_backward", "on_before_optimizer_step", "on_train_batch_end", "on_log", "on_validation_start",
    "on_validation_batch_end", "on_validation_end", "on_train_epoch_end", "on_save_checkpoint",
    "on_load_checkpoint", "on_test_start", "on_test_batch_end", "on_test_end", "on_predict_start",
    "on_predict_batch_end", "on_predict_end",
    "on_exception", "on_fit_end",
)

EVENT_ORDER = """\
fit(resume=None)
    check: train_data has batches; callback.check_fit for each callback (e.g. EarlyStopping needs
           validation); output and checkpoint folders writable, with room for a checkpoint;
           take the output folder's lock (another live run there is refused)
    if resume is not None:                            # "latest" or a checkpoint path
        load_state(checkpoint)                        # weights, optimizer, scheduler, loaders, scaler,
                                                      # accumulation (gradients too), loop position,
                                                      # callback states, metrics, RNG states last
        if the checkpoint was taken in on_train_epoch_end:
            epoch += 1; batch_in_epoch = 0           # so the next epoch starts afresh
        on_load_checkpoint(checkpoint_dir)
    try:
        on_fit_start
        while not (should_stop or epoch >= max_epochs or global_step >= max_steps):
            model.train(); train_loader.set_epoch(epoch)
            if batch_in_epoch == 0:
                on_train_epoch_start                  # not when resuming inside this epoch
            for batch in the epoch's batches, from batch_in_epoch on (earlier ones are skipped unread):
                batch_idx = batch_in_epoch
                on_train_batch_start(batch, batch_idx)
                with accelerator.accumulate(model):   # one micro-step
                    outputs = training_step(batch)
                    note whether the loss is finite       # no synchronisation here
                    on_before_backward(loss)
                    accelerator.backward(loss, num_tokens)
                    on_after_backward
                    if sync_gradients:                # the last micro-batch of a group: a boundary
                        if grad_clip is not None:
                            norm = accelerator.clip_grad_norm_(parameters, grad_clip)
                        if the group's losses (and norm) are finite on every process, or on_nonfinite="warn":
                            on_before_optimizer_step(optimizer)
                            optimizer.step()
                            scheduler.step()          # if there is one
                        elif on_nonfinite == "error": raise NonFiniteLossError   # "skip": no step
                        optimizer.zero_grad()
                        global_step += 1              # every log_every_n_steps: log("train_loss") -> on_log(values)
                batch_in_epoch += 1
                on_train_batch_end(outputs, batch, batch_idx)
                if eval_data and sync_gradients and eval_every_n_steps
                        and global_step % eval_every_n_steps == 0
                        and this position was not validated yet:
                    validate()
                if sync_gradients and a stop signal arrived (on any process):
                    save_checkpoint; raise TrainingInterrupted  # exit code 128 + the signal
                if (should_stop or global_step >= max_steps) and batches are left in the epoch:
                    leave the epoch now                # its end (below) does not run
            # the epoch's batches are exhausted (or it stopped at its last batch)
            if eval_data and eval_every_n_epochs and (epoch + 1) % eval_every_n_epochs == 0
                    and this position was not validated yet:  # e.g. by a step validation just now
                validate()
            on_train_epoch_end
            epoch += 1; batch_in_epoch = 0
        if load_best_at_end: load the best checkpoint's weights
        on_fit_end
    except BaseException as exception:                # KeyboardInterrupt included
        on_exception(exception)
        raise
    finally:
        release the output folder's lock

validate(eval_data=None)                              # from fit, or called directly
    loaders = the eval loader(s), or one-off loaders over eval_data (not registered for checkpoints)
    on_validation_start
    model.eval()
    with torch.no_grad(), torch.random.fork_rng():    # what validation draws leaves training's RNG alone
        for name, loader in loaders:                  # one set, or named ones: eval_data={"a": ..., "b": ...}
            for batch_idx, batch in enumerate(loader):
                outputs = validation_step(batch)
                on_validation_batch_end(outputs, batch, batch_idx)
            the set's metrics = sample-weighted means, one all-reduce; named "<metric>/<name>" for named sets
    trainer.metrics.update(metrics)
    on_validation_end(metrics)
    model back to its previous mode

test(data, ckpt=None)
    load the weights of ckpt ("best", "last", a checkpoint folder), if given
    on_test_start
    as validate, with test_step (default: validation_step) and on_test_batch_end; val_* metrics become test_*
    on_test_end(metrics)

predict(data, stream=False)
    loader = a one-off loader over data (not registered for checkpoints)
    model.eval()
    on_predict_start
    try:
        for batch_idx, batch in enumerate(loader):
            with torch.no_grad():
                outputs = predict_step(batch)
            if several processes:
                outputs = accelerator.gather_for_metrics(outputs)   # every process gets all, in order
            on_predict_batch_end(outputs, batch, batch_idx)
            (yield outputs)                           # the caller's code runs in its own grad mode
        on_predict_end
    finally:                                          # also when a stream is closed early
        model back to its previous mode

save_checkpoint(path)                                 # ModelCheckpoint calls it; so may you
    write the whole state into a scratch directory beside path
    on_save_checkpoint(scratch_dir)                   # every process; add files of your own
    rename the scratch directory to path; write path's name to the file latest beside it
                                                      # (only when the weights are all finite)
"""


class Callback:
    """Base class: every event is a no-op here, and the bus skips events a callback does not override.

    The bus calls the callbacks in list order, those that compute metrics (``computes_metrics``)
    first and those that write checkpoints (``checkpoints``) last, so a checkpoint taken at an
    event holds the state every other callback reached at that event. Events return nothing; a
    callback stops training by setting ``trainer.should_stop``.

    A callback with state implements ``state_dict`` / ``load_state_dict``; what it returns
    (numbers, strings, lists, dicts, tensors) is saved in checkpoints and handed back on resume.
    """

    checkpoints = False  # True: runs after all others (it writes checkpoints)
    computes_metrics = False  # True: runs before the others, which may read the metrics it adds

    @property
    def state_key(self) -> str:
        """The name this callback's state is saved under (unique per class by default; two instances need two)."""
        return type(self).__qualname__

    def handles(self, event: str) -> bool:
        """Whether this instance wants ``event``: asked once per event when the bus is built.

        Override to leave out events that the instance's settings make no-ops, so they cost nothing
        in the training loop (e.g. a checkpoint callback that never saves on steps).
        """
        return True

    def state_dict(self) -> dict[str, Any]:
        """What to save in each checkpoint (numbers, strings, lists, dicts, tensors); called when one is written."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned: called when a checkpoint is loaded, before ``on_load_checkpoint``."""

    def check_fit(self, trainer: TrainerView) -> None:
        """Called once when ``fit`` begins, before a checkpoint is loaded or any event runs.

        Raise an error (naming the setting to change) if this callback can never do its job in
        this run, e.g. it watches a validation metric and the run never validates. Return nothing.
        """

    def on_fit_start(self, trainer: TrainerView) -> None:
        """``fit`` begins (after a resume's checkpoint is loaded), before the first epoch."""

    def on_train_epoch_start(self, trainer: TrainerView) -> None:
        """An epoch begins (not when a resume continues inside one)."""

    def on_train_batch_start(self, trainer: TrainerView, batch: Any, batch_idx: int) -> None:
        """A training micro-batch is about to run; ``batch_idx`` counts the epoch's batches from 0."""

    def on_before_backward(self, trainer: TrainerView, loss: Any) -> None:
        """``training_step`` returned ``loss``; backward comes next."""

    def on_after_backward(self, trainer: TrainerView) -> None:
        """Backward ran; on a micro-step inside an accumulation group the gradients are partial sums."""

    def on_before_optimizer_step(self, trainer: TrainerView, optimizer: Any) -> None:
        """At an accumulation boundary, after clipping, just before ``optimizer.step()``: the gradients are final."""

    def on_train_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None:
        """A training micro-batch is done (``outputs`` is what ``training_step`` returned)."""

    def on_log(self, trainer: TrainerView, values: dict[str, float]) -> None:
        """``trainer.log`` or ``log_dict`` recorded ``values`` (name to number) at ``trainer.global_step``.

        Called wherever the values are logged (the Trainer logs ``train_loss`` every
        ``log_every_n_steps`` optimizer steps), on the process that logged them.
        """

    def on_validation_start(self, trainer: TrainerView) -> None:
        """``validate`` begins, from ``fit`` or called directly."""

    def on_validation_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None:
        """A validation batch is done (``outputs`` is what ``validation_step`` returned)."""

    def on_validation_end(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        """``validate`` reduced its ``metrics`` over every process; they are in ``trainer.metrics`` too."""

    def on_train_epoch_end(self, trainer: TrainerView) -> None:
        """An epoch's batches are done (after its validation, if one was due)."""

    def on_save_checkpoint(self, trainer: TrainerView, checkpoint_dir: Path) -> None:
        """A checkpoint is being written into ``checkpoint_dir`` (a scratch folder, renamed into place after):
        add files of your own there. Called on every process."""

    def on_load_checkpoint(self, trainer: TrainerView, checkpoint_dir: Path) -> None:
        """``fit(resume=...)`` loaded the checkpoint in ``checkpoint_dir``, before ``on_fit_start``."""

    def on_test_start(self, trainer: TrainerView) -> None:
        """``test`` begins, before its first batch."""

    def on_test_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After ``test_step`` on one batch; ``outputs`` is what it returned."""

    def on_test_end(self, trainer: TrainerView, metrics: dict[str, float]) -> None:
        """``test`` ends; ``metrics`` are its reduced metrics (``test_...``)."""

    def on_predict_start(self, trainer: TrainerView) -> None:
        """``predict`` begins."""

    def on_predict_batch_end(self, trainer: TrainerView, outputs: Any, batch: Any, batch_idx: int) -> None:
        """A prediction batch is done (``outputs`` gathered from every process when there are several)."""

    def on_predict_end(self, trainer: TrainerView) -> None:
        """``predict`` went through all its data (not when a stream is closed early)."""

    def on_exception(self, trainer: TrainerView, exception: BaseException) -> None:
        """``fit`` is ending with ``exception`` (KeyboardInterrupt included), which is raised again afterwards."""

    def on_fit_end(self, trainer: TrainerView) -> None:
        """``fit`` finished: max_epochs or max_steps reached, or a callback set ``should_stop``."""
