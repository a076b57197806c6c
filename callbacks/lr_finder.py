"""LearningRateFinder: the learning-rate range test at the start of ``fit``, and the curve it draws."""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from .base import Callback
from .batch_size_finder import resumed

if TYPE_CHECKING:
    from trainer.tuning import TuningView

    from .protocols import TrainerView

MODES = ("exponential", "linear")
_GROUP_RATES = ("lr", "initial_lr", "max_lr", "min_lr")  # what optimizers and schedulers keep in a param group
_SCHEDULER_RATES = ("base_lrs", "max_lrs", "_last_lr")  # what schedulers keep themselves
_NO_MATPLOTLIB = "Plotting the learning-rate curve needs matplotlib: pip install matplotlib (or pass plot_path=False)."


@dataclass
class LRFinderResult:
    """The learning rates tried, the smoothed loss after each, and the suggestion drawn from them."""

    mode: str
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed
    raw_losses: list[float] = field(default_factory=list)
    diverged: bool = False  # the test stopped early: the loss rose past early_stop_threshold times its best

    def suggestion_index(self, skip_begin: int | None = None, skip_end: int = 1) -> int | None:
        """The index of the steepest descent of the smoothed loss (None when too few points are left).

        The first ``skip_begin`` points (default: a tenth of the test, at most 10) and the last
        ``skip_end`` are left out: the smoothing has not settled at the start, and the last point
        is where the loss diverged.
        """
        begin = min(10, len(self.lrs) // 10) if skip_begin is None else skip_begin
        indices = [i for i in range(begin, len(self.lrs) - skip_end) if math.isfinite(self.losses[i])]
        if len(indices) < 2:
            return None
        position = np.array([self.lrs[i] for i in indices])
        if self.mode == "exponential":
            position = np.log10(position)
        slopes = np.gradient(np.array([self.losses[i] for i in indices]), position)
        return indices[int(np.argmin(slopes))]

    def suggestion(self, skip_begin: int | None = None, skip_end: int = 1) -> float | None:
        """The learning rate where the smoothed loss falls fastest (see ``suggestion_index``)."""
        index = self.suggestion_index(skip_begin, skip_end)
        return None if index is None else self.lrs[index]

    def plot(self, path: str | os.PathLike, suggestion: float | None = None) -> Path:
        """Draw the smoothed loss against the learning rate into the PNG file ``path``, the suggestion marked.

        The point where the loss diverged, if the test stopped there, is left out: it would dwarf the rest.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError(_NO_MATPLOTLIB) from error
        figure = Figure(figsize=(6, 4), layout="constrained")
        FigureCanvasAgg(figure)  # the Agg canvas draws it: pyplot and its global backend stay untouched
        axes = figure.add_subplot()
        shown = len(self.lrs) - 1 if self.diverged else len(self.lrs)  # the diverging point would flatten the rest
        finite = [(lr, loss) for lr, loss in zip(self.lrs[:shown], self.losses[:shown]) if math.isfinite(loss)]
        axes.plot([lr for lr, _ in finite], [loss for _, loss in finite])
        if self.mode == "exponential":
            axes.set_xscale("log")
        if suggestion is not None:
            index = self.lrs.index(suggestion)
            axes.plot([suggestion], [self.losses[index]], "o", color="red", label=f"suggestion {suggestion:.3g}")
            axes.legend()
        axes.set_xlabel("learning rate")
        axes.set_ylabel("loss (smoothed)")
        axes.set_title("Learning-rate range test")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, format="png", dpi=100)
        return target


def _base_rate(group: dict[str, Any]) -> float:
    """A parameter group's base learning rate: where its schedule started (``initial_lr``), else its ``lr``."""
    return float(group.get("initial_lr", group["lr"]))


def _assign(container: dict[str, Any], key: str, value: float) -> None:
    if torch.is_tensor(container[key]):  # a tensor learning rate (capturable optimizers) is updated in place
        container[key].fill_(value)
    else:
        container[key] = value


def set_base_learning_rate(trainer: TuningView, lr: float) -> None:
    """Make ``lr`` the first parameter group's base learning rate; every other rate keeps its ratio to it.

    Every learning rate that the optimizer's parameter groups hold (``lr``, ``initial_lr``,
    ``max_lr``, ``min_lr``) and the scheduler keeps (``base_lrs``, ``max_lrs``, its last rates)
    is multiplied by ``lr / base``, so a schedule keeps its shape around the new base.
    """
    groups = trainer.optimizer.param_groups
    base = _base_rate(groups[0])

    def scaled(value: Any) -> float:
        return lr * (float(value) / base) if base else lr

    for group in groups:
        for key in _GROUP_RATES:
            if key in group:
                _assign(group, key, scaled(group[key]))
    scheduler = getattr(trainer.scheduler, "scheduler", trainer.scheduler)
    for name in _SCHEDULER_RATES:
        rates = getattr(scheduler, name, None)
        if isinstance(rates, list):
            setattr(scheduler, name, [scaled(rate) for rate in rates])


class LearningRateFinder(Callback):
    """The learning-rate range test: train with a growing learning rate, and suggest where the loss falls fastest.

    When ``fit`` starts, ``num_training_steps`` optimizer steps run with the learning rate growing
    from ``min_lr`` to ``max_lr`` (evenly in its logarithm, or evenly), recording the loss after
    each, smoothed (an exponential average, ``smoothing`` 0.98, bias-corrected). The test stops
    early when the smoothed loss passes ``early_stop_threshold`` times its lowest value. The
    suggestion is the learning rate at the steepest descent of the smoothed loss (against the
    logarithm of the learning rate in exponential mode), leaving out the first points (a tenth
    of them, at most 10) and the last one. Then the model, optimizer, scheduler, loss scale,
    random states and logged metrics are put back exactly: the test leaves no trace. The
    suggestion is logged as ``lr_find/suggestion`` and printed; the curve is drawn into a PNG; with
    ``update_attr`` the optimizer trains with it (``set_base_learning_rate``).

    The optimizer's parameter groups keep their ratios: the test moves the first group's learning
    rate and scales the others with it. The scheduler does not step during the test.

    Args:
        min_lr: the first learning rate tried.
        max_lr: the last learning rate tried.
        num_training_steps: optimizer steps in the test (one learning rate each).
        mode: ``"exponential"`` (evenly spaced logarithms) or ``"linear"``.
        early_stop_threshold: stop when the smoothed loss exceeds this many times its lowest
            value (None: run every step).
        update_attr: train with the suggestion (the optimizer's base learning rate becomes it).
        plot_path: where the PNG of the curve goes (default: ``output_dir/lr_find.png``);
            ``False`` draws none (then matplotlib is not needed).
    """

    smoothing = 0.98  # the weight of the past in the loss's exponential average

    def __init__(self, min_lr: float = 1e-8, max_lr: float = 1.0, num_training_steps: int = 100,
                 mode: str = "exponential", early_stop_threshold: float | None = 4.0, update_attr: bool = True,
                 plot_path: str | os.PathLike | bool | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"LearningRateFinder(mode={mode!r}): use one of {list(MODES)}.")
        for name, value in (("min_lr", min_lr), ("max_lr", max_lr)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"LearningRateFinder({name}={value!r}): use a finite number.")
        if not (0 <= min_lr < max_lr) or (mode == "exponential" and min_lr == 0):
            raise ValueError(f"LearningRateFinder(min_lr={min_lr!r}, max_lr={max_lr!r}): use 0 < min_lr < max_lr "
                             "(min_lr may be 0 with mode='linear').")
        if isinstance(num_training_steps, bool) or not isinstance(num_training_steps, int) or num_training_steps < 3:
            raise ValueError(f"LearningRateFinder(num_training_steps={num_training_steps!r}): use a whole number >= 3.")
        if early_stop_threshold is not None and (isinstance(early_stop_threshold, bool)
                                                 or not isinstance(early_stop_threshold, (int, float))
                                                 or not early_stop_threshold > 1):
            raise ValueError(f"LearningRateFinder(early_stop_threshold={early_stop_threshold!r}): use a number > 1 "
                             "(how many times its lowest value the loss may reach), or None to run every step.")
        if plot_path is True or not (plot_path is None or plot_path is False or isinstance(plot_path, (str, os.PathLike))):
            raise ValueError(f"LearningRateFinder(plot_path={plot_path!r}): use a file path, None (output_dir/lr_find.png) "
                             "or False (no plot).")
        self.min_lr, self.max_lr, self.num_training_steps = float(min_lr), float(max_lr), num_training_steps
        self.mode, self.early_stop_threshold, self.update_attr = mode, early_stop_threshold, bool(update_attr)
        self.plot_path = plot_path
        self.result: LRFinderResult | None = None  # the last test's curve
        self.suggested_lr: float | None = None

    def learning_rates(self) -> list[float]:
        """The learning rate of each step of the test, from ``min_lr`` to ``max_lr``."""
        last = self.num_training_steps - 1
        if self.mode == "exponential":
            return [self.min_lr * (self.max_lr / self.min_lr) ** (step / last) for step in range(self.num_training_steps)]
        return [self.min_lr + (self.max_lr - self.min_lr) * step / last for step in range(self.num_training_steps)]

    def check_fit(self, trainer: TrainerView) -> None:
        """Called when ``fit`` begins: refuse to start when the curve is to be drawn and matplotlib is missing."""
        if self.plot_path is not False and importlib.util.find_spec("matplotlib") is None:
            raise ImportError(_NO_MATPLOTLIB)

    def on_fit_start(self, trainer: TrainerView) -> None:
        """Called when ``fit`` begins, before the first epoch: run the test (not when the run resumes).

        A resumed run keeps the learning rate its checkpoint holds (the one a test set, if it ran).
        """
        if not resumed(trainer):
            self.lr_find(trainer)

    def lr_find(self, trainer: Any) -> LRFinderResult:
        """Run the test now (``fit`` calls it at its start) and return its result; see the class description."""
        from trainer.tuning import TrainingSnapshot, training_steps

        view = cast("TuningView", trainer)
        groups = view.optimizer.param_groups
        base = _base_rate(groups[0])
        ratios = [_base_rate(group) / base if base else 1.0 for group in groups]
        result = LRFinderResult(self.mode)
        snapshot = TrainingSnapshot(view)
        steps = training_steps(view)
        try:
            self._run(view, steps, groups, ratios, result)
        finally:
            steps.close()
            snapshot.restore()
        suggestion = result.suggestion()
        if view.accelerator.num_processes > 1:  # every process trains with the main process's suggestion
            suggestion = view.accelerator.strategy.broadcast_object(suggestion)
        self.result, self.suggested_lr = result, suggestion
        self._report(view, result, suggestion)
        return result

    def _run(self, trainer: TuningView, steps: Any, groups: list[dict[str, Any]], ratios: list[float],
             result: LRFinderResult) -> None:
        average, lowest = 0.0, math.inf
        for index, lr in enumerate(self.learning_rates()):
            for group, ratio in zip(groups, ratios, strict=True):
                _assign(group, "lr", lr * ratio)
            loss = next(steps)
            average = self.smoothing * average + (1 - self.smoothing) * loss
            smoothed = average / (1 - self.smoothing ** (index + 1))
            result.lrs.append(lr)
            result.raw_losses.append(loss)
            result.losses.append(smoothed)
            threshold = self.early_stop_threshold
            stop = not math.isfinite(smoothed) or (threshold is not None and index > 0 and smoothed > threshold * lowest)
            lowest = min(lowest, smoothed)
            if trainer.accelerator.num_processes > 1:
                stop = bool(trainer.accelerator.strategy.broadcast_object(stop))
            if stop:
                result.diverged = True
                return

    def _report(self, trainer: TuningView, result: LRFinderResult, suggestion: float | None) -> None:
        lines = [f"LearningRateFinder: {len(result.lrs)} steps from {result.lrs[0]:.3g} to {result.lrs[-1]:.3g}"
                 f"{' (stopped: the loss diverged)' if result.diverged else ''}"]
        if suggestion is None:
            warnings.warn("LearningRateFinder: too few finite losses to suggest a learning rate; the optimizer keeps its "
                          "own. Raise num_training_steps, or lower max_lr if the loss diverged early.", RuntimeWarning,
                          stacklevel=3)
        else:
            trainer.log("lr_find/suggestion", suggestion)
            if self.update_attr:
                set_base_learning_rate(trainer, suggestion)
            lines.append(f"suggested learning rate: {suggestion:.3g}"
                         f"{' (the optimizer now uses it)' if self.update_attr else ''}")
        plot_path = self.plot_path
        if plot_path is not False and trainer.is_main_process:
            path = trainer.output_dir / "lr_find.png" if plot_path is None or plot_path is True else Path(plot_path)
            lines.append(f"curve: {result.plot(path, suggestion)}")
        if trainer.is_main_process:
            print("; ".join(lines) + ".", flush=True)
