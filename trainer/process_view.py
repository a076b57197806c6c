"""What a process knows about the job, and the helpers that run code on some processes only.

``PartialState`` holds the layout; ``ProcessView`` is the part of the Accelerator that answers
from it, so a script that only holds an Accelerator has PartialState's whole surface.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from trainer.state import PartialState


class ProcessView:
    """This process's place in the job (``state`` is the process-wide ``PartialState``)."""

    state: PartialState

    @property
    def process_index(self) -> int:
        """This process's rank over all machines."""
        return self.state.process_index

    @property
    def local_process_index(self) -> int:
        """This process's rank on its machine."""
        return self.state.local_process_index

    @property
    def num_processes(self) -> int:
        """How many processes the job runs."""
        return self.state.num_processes

    @property
    def is_main_process(self) -> bool:
        """Whether this is process 0."""
        return self.state.is_main_process

    @property
    def is_local_main_process(self) -> bool:
        """Whether this is process 0 of its machine."""
        return self.state.is_local_main_process

    @property
    def is_last_process(self) -> bool:
        """Whether this is the last process."""
        return self.state.is_last_process

    @property
    def use_distributed(self) -> bool:
        """Whether the job runs more than one process."""
        return self.state.use_distributed

    def set_trigger(self) -> None:
        """Raise this process's flag (e.g. its loss went NaN): ``check_trigger`` then answers True on every process."""
        self._trigger = True

    def check_trigger(self) -> bool:
        """Whether any process called ``set_trigger`` since the last check (the same answer on every process).

        A collective: every process must call it. The flags are lowered again when it answers True.
        """
        flag = torch.tensor(int(getattr(self, "_trigger", False)), device=self.state.device)
        if self.state.use_distributed:
            torch.distributed.all_reduce(flag)
        if flag.item() >= 1:
            self._trigger = False
            return True
        return False

    def wait_for_everyone(self) -> None:
        """Block until every process reaches this line."""
        self.state.wait_for_everyone()

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print``, on the main process of each machine only."""
        self.state.print(*args, **kwargs)

    def main_process_first(self) -> AbstractContextManager[None]:
        """A block that the main process runs first, then the others (e.g. preparing a dataset)."""
        return self.state.main_process_first()

    def local_main_process_first(self) -> AbstractContextManager[None]:
        """A block that each machine's main process runs first, then the others on that machine."""
        return self.state.local_main_process_first()

    def split_between_processes(self, inputs: Any, apply_padding: bool = False) -> Any:
        """A context giving this process its share of ``inputs`` (a list, tensor, dict or dataset)."""
        return self.state.split_between_processes(inputs, apply_padding=apply_padding)

    def on_main_process(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """A decorator: ``function`` runs on the main process only."""
        return self.state.on_main_process(function)

    def on_local_main_process(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """A decorator: ``function`` runs on each machine's main process only."""
        return self.state.on_local_main_process(function)

    def on_last_process(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """A decorator: ``function`` runs on the last process only."""
        return self.state.on_last_process(function)

    def on_local_process(self, function: Callable[..., Any] | None = None, local_process_index: int | None = None) -> Any:
        """A decorator: ``function`` runs on the process of each machine with local index ``local_process_index`` only."""
        return self.state.on_local_process(function, local_process_index=local_process_index)

    def on_process(self, function: Callable[..., Any] | None = None, process_index: int | None = None) -> Any:
        """A decorator: ``function`` runs on process ``process_index`` only."""
        return self.state.on_process(function, process_index=process_index)
