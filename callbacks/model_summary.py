"""ModelSummary: a table of the model's modules and parameter counts, printed when ``fit`` begins."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

from torch import nn

from .base import Callback

if TYPE_CHECKING:
    from .protocols import TrainerView


class _Unwrapping(Protocol):
    def unwrap_model(self, model: nn.Module, keep_fp32_wrapper: bool = True) -> nn.Module: ...


def bare_model(trainer: TrainerView) -> nn.Module:
    """The user's module inside ``trainer.model``, without the strategy's wrapper (DDP, compile...)."""
    accelerator = cast(_Unwrapping, trainer.accelerator)
    return accelerator.unwrap_model(trainer.model)


def _numel(tensor: Any) -> int:
    """Elements of a parameter, whole however it is placed (a DeepSpeed ZeRO-3 partition keeps ``ds_numel``)."""
    return int(getattr(tensor, "ds_numel", 0) or tensor.numel())


def _human(count: float) -> str:
    """1234 -> ``1.2 K``; counts under a thousand are written out."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return str(int(count))


def summarize(model: nn.Module, max_depth: int = 1) -> str:
    """The summary table of ``model``: one row per module down to ``max_depth`` (-1: all), then the totals.

    One pass over the parameters (a parameter shared by several modules counts once, under its
    first name) and one over the modules: cheap even for models of thousands of modules.
    """
    _check_depth(max_depth)
    totals: dict[str, list[int]] = {}  # module name -> [parameters, trainable]
    trainable = frozen = size = 0
    for name, parameter in model.named_parameters():
        count = _numel(parameter)
        size += count * parameter.element_size()
        if parameter.requires_grad:
            trainable += count
        else:
            frozen += count
        parts = name.split(".")[:-1]
        depth = len(parts) if max_depth < 0 else min(len(parts), max_depth)
        for end in range(1, depth + 1):
            row = totals.setdefault(".".join(parts[:end]), [0, 0])
            row[0] += count
            row[1] += count if parameter.requires_grad else 0
    rows = [("", "Name", "Type", "Params", "Trainable")]
    for name, module in model.named_modules():
        depth = name.count(".") + 1
        if not name or (max_depth >= 0 and depth > max_depth):
            continue
        params, train = totals.get(name, (0, 0))
        rows.append((str(len(rows) - 1), name, type(module).__name__, _human(params), _human(train)))
    widths = [max(len(row[column]) for row in rows) for column in range(5)]
    lines = [" | ".join(cell.rjust(w) if column in (0, 3, 4) else cell.ljust(w)
                        for column, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    rule = "-" * max(len(line) for line in lines)
    footer = [(_human(trainable), "Trainable params"), (_human(frozen), "Frozen params"),
              (_human(trainable + frozen), "Total params"), (f"{size / 1e6:.3f}", "Total size of the parameters (MB)")]
    pad = max(len(value) for value, _ in footer)
    body = [lines[0], rule, *lines[1:], rule] if len(lines) > 1 else [rule]
    return "\n".join([*body, *(f"{value.ljust(pad)}  {label}" for value, label in footer)])


def _check_depth(max_depth: Any) -> None:
    if not isinstance(max_depth, int) or isinstance(max_depth, bool) or max_depth < -1:
        raise ValueError(f"ModelSummary(max_depth={max_depth!r}): use a whole number >= 0 (0 prints the totals "
                         "only), or -1 for every module.")


class ModelSummary(Callback):
    """Print a table of the model's modules, their parameter counts and the totals when ``fit`` begins.

    Args:
        max_depth: how deep into the module tree the table goes: 1 lists the model's direct
            children, 0 only the totals, -1 every module.

    Printed on the main process only. ``summarize(model, max_depth)`` in this module gives the
    same text for any module.
    """

    def __init__(self, max_depth: int = 1) -> None:
        _check_depth(max_depth)
        self.max_depth = max_depth
        self.text: str | None = None  # the last summary printed

    def on_fit_start(self, trainer: TrainerView) -> None:
        """``fit`` begins: print the summary of the model (without its strategy wrapper) on the main process."""
        if trainer.is_main_process:
            self.text = summarize(bare_model(trainer), self.max_depth)
            print(self.text, flush=True)
