"""``TorchDynamoPlugin``: ``torch.compile`` for the prepared models (``Accelerator(dynamo_backend=...)``).

The model is compiled in place (``nn.Module.compile``): its class, its ``state_dict`` keys and
what ``unwrap_model`` returns stay as they were, so checkpoints carry no ``_orig_mod.`` prefix.
Defaults come from the launch (``dynamo_config`` in the YAML, ``--dynamo_backend``), carried to
the processes as ``TRAINER_DYNAMO_CONFIG``.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from trainer.launch_environment import DYNAMO
from trainer.utils.enums import DynamoBackend
from trainer.utils.kwargs_handlers import KwargsHandler


def _launch_settings() -> dict[str, Any]:
    text = os.environ.get(DYNAMO)
    return dict(json.loads(text)) if text else {}


def dynamo_backend(value: Any) -> DynamoBackend:
    """A backend name (any case, or the enum) as a ``DynamoBackend``, or one error with the names."""
    if isinstance(value, DynamoBackend):
        return value
    name = str(value).upper()
    if name in DynamoBackend.__members__:
        return DynamoBackend[name]
    names = [member.value.lower() for member in DynamoBackend]
    close = difflib.get_close_matches(str(value).lower(), names, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"dynamo_backend={value!r} is not a torch.compile backend here ({', '.join(names)}).{hint}")


@dataclass
class TorchDynamoPlugin(KwargsHandler):
    """How ``prepare`` compiles models with ``torch.compile``.

    Args:
        backend: the compile backend (``"inductor"``, ``"aot_eager"``, ``"eager"``...; ``"no"``: no compiling).
        mode: ``torch.compile``'s mode (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``...).
        fullgraph: fail on graph breaks instead of falling back to Python.
        dynamic: compile for dynamic shapes (None: torch decides).
        options: backend options (a dict).
        disable: turn compiling off.
        use_regional_compilation: compile each block of the model's ``nn.ModuleList``s instead of the
            whole model (repeated blocks are compiled once; faster to compile).
    """

    backend: Any = None
    mode: str | None = None
    fullgraph: bool | None = None
    dynamic: bool | None = None
    options: Any = None
    disable: bool = False
    use_regional_compilation: bool | None = None

    def __post_init__(self) -> None:
        launched = _launch_settings()
        if self.backend is None:
            self.backend = launched.get("dynamo_backend", "no")
        self.backend = dynamo_backend(self.backend)
        for field_name, key in (("mode", "dynamo_mode"), ("fullgraph", "dynamo_use_fullgraph"),
                                ("dynamic", "dynamo_use_dynamic"),
                                ("use_regional_compilation", "dynamo_use_regional_compilation")):
            if getattr(self, field_name) is None and key in launched:
                setattr(self, field_name, launched[key])

    @property
    def enabled(self) -> bool:
        return self.backend != DynamoBackend.NO and not self.disable

    def to_compile_kwargs(self) -> dict[str, Any]:
        """``torch.compile``'s arguments."""
        kwargs: dict[str, Any] = {"backend": self.backend.value.lower(), "fullgraph": bool(self.fullgraph),
                                  "dynamic": self.dynamic}
        if self.mode is not None:
            kwargs["mode"] = self.mode
        if self.options is not None:
            kwargs["options"] = self.options
        return kwargs

    def compile(self, model: nn.Module) -> nn.Module:
        """Compile ``model`` in place (each ``nn.ModuleList`` block with regional compilation) and return it."""
        if not self.enabled:
            return model
        kwargs = self.to_compile_kwargs()
        if self.use_regional_compilation:
            blocks = [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]
            if not blocks:
                raise ValueError("use_regional_compilation=True compiles the blocks of the model's nn.ModuleLists, and "
                                 f"{type(model).__name__} has none; compile the whole model instead.")
            for block in blocks:
                block.compile(**kwargs)
        else:
            model.compile(**kwargs)
        return model
