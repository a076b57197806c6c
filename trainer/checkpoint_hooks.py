"""Functions ``save_state`` and ``load_state`` call before they write or read the models' weights.

Accelerate's ``register_save_state_pre_hook`` and ``register_load_state_pre_hook``, as training
scripts use them to save a model their own way (``save_pretrained`` into a subfolder, an EMA copy
beside it) and to load it back:

* a save hook, ``hook(models, weights, output_dir)``, gets the prepared models, the weights that
  are about to be written (each model's ``state_dict``; an empty list under a strategy that writes
  its own sharded files, whose weights it does not hand out) and the folder being written, which
  becomes the checkpoint once the save completes. Files it writes there are part of the
  checkpoint (in its manifest, put in place with the rest). Weights it removes from ``weights``
  are not written; those left are written in order as ``model.safetensors``,
  ``model_1.safetensors``...
* a load hook, ``hook(models, input_dir)``, gets the models that would be loaded from those files
  (none under a strategy with files of its own) and the checkpoint's folder, after its files were
  checked against the manifest. Models it removes from ``models`` are not loaded; those left are
  loaded in order from those files.

Hooks run in the order registered, on every process; ``handle.remove()`` unregisters one.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.hooks import RemovableHandle

SaveHook = Callable[[list[Any], list[dict[str, Any]], str], None]
LoadHook = Callable[[list[Any], str], None]


class StateHooks:
    """The hooks registered on one Accelerator, in order."""

    def __init__(self) -> None:
        self.save: OrderedDict[int, SaveHook] = OrderedDict()
        self.load: OrderedDict[int, LoadHook] = OrderedDict()

    @staticmethod
    def register(hooks: OrderedDict[int, Any], hook: Any, kind: str) -> RemovableHandle:
        if not callable(hook):
            raise TypeError(f"register_{kind}_state_pre_hook takes a function, got {type(hook).__name__}.")
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        return handle

    def run_save(self, models: list[Any], weights: list[dict[str, Any]], folder: Path) -> list[str]:
        """Call the save hooks; return the names of the entries they added to ``folder`` (sorted)."""
        before = set(os.listdir(folder))
        for hook in list(self.save.values()):
            hook(models, weights, str(folder))
        return sorted(set(os.listdir(folder)) - before)

    def run_load(self, models: list[Any], folder: Path) -> None:
        """Call the load hooks; they may remove from ``models`` those they loaded themselves."""
        for hook in list(self.load.values()):
            hook(models, str(folder))
