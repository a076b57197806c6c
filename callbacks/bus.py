"""The callback bus: one ordered list, one dispatch per event; metric computers first, checkpointing last."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .base import EVENTS, Callback

if TYPE_CHECKING:
    from .protocols import TrainerView


def _overrides(callback: Any, event: str) -> bool:
    """Whether ``callback`` handles ``event``: it defines the method and, if it says, wants the event."""
    method = getattr(type(callback), event, None)
    if method is None or method is getattr(Callback, event, None):
        return False
    wants = getattr(callback, "handles", None)
    return wants is None or bool(wants(event))


class CallbackBus:
    """Calls ``event`` on every callback that defines it, in list order, checkpointing callbacks last.

    Which callbacks handle which event is worked out once, so an event nobody listens to costs
    one dictionary lookup in the training loop.
    """

    def __init__(self, callbacks: Iterable[Any] = ()) -> None:
        callbacks = list(callbacks)
        for callback in callbacks:
            for name in dir(type(callback)):
                if name.startswith("on_") and name not in EVENTS:
                    close = difflib.get_close_matches(name, EVENTS, n=1)
                    hint = f" Did you mean {close[0]!r}?" if close else ""
                    raise ValueError(
                        f"{type(callback).__name__}.{name} is not a Trainer event, so it would never run.{hint} "
                        f"Events: {', '.join(EVENTS)}."
                    )
        # sorted() is stable: list order is kept within each group. Callbacks that compute metrics
        # go first (others read their results), checkpointing callbacks last.
        self.callbacks = sorted(callbacks, key=lambda cb: (not getattr(cb, "computes_metrics", False),
                                                           bool(getattr(cb, "checkpoints", False))))
        self.handlers = {event: [getattr(cb, event) for cb in self.callbacks if _overrides(cb, event)]
                         for event in EVENTS}
        # The events some callback handles: the training loop skips the others' dispatch at every step.
        self.listened = frozenset(event for event, handlers in self.handlers.items() if handlers)
        keys = [self.state_key(cb) for cb in self.callbacks]
        duplicates = sorted({key for key in keys if keys.count(key) > 1})
        if duplicates:
            raise ValueError(
                f"Two callbacks save their state under the same key {duplicates}: give one of them a "
                "different state_key (a property returning a unique string)."
            )

    @staticmethod
    def state_key(callback: Any) -> str:
        return getattr(callback, "state_key", type(callback).__qualname__)

    def caller(self, trainer: TrainerView) -> Callable[..., None]:
        """The dispatch for ``trainer``: ``call(event, *args)`` runs ``event`` on every callback that handles it,
        in order, with ``trainer`` and the event's arguments (one function call per event: it runs at every step)."""
        handlers = self.handlers

        def call(event: str, *args: Any) -> None:
            for handler in handlers[event]:
                handler(trainer, *args)

        return call

    def check_fit(self, trainer: TrainerView) -> None:
        """Ask every callback whether it can act in this run (``Callback.check_fit``); the first refusal raises."""
        for callback in self.callbacks:
            check = getattr(callback, "check_fit", None)
            if check is not None:
                check(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {self.state_key(cb): cb.state_dict() for cb in self.callbacks if hasattr(cb, "state_dict")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for callback in self.callbacks:
            key = self.state_key(callback)
            if key in state and hasattr(callback, "load_state_dict"):
                callback.load_state_dict(state[key])

    def find(self, kind: type) -> list[Any]:
        return [cb for cb in self.callbacks if isinstance(cb, kind)]
