"""Turn a parsed ``trainer fit`` config into a Trainer, in a fixed order so that the weights are reproducible.

The order, which the same run written in Python follows too::

    set_seed(trainer.seed)
    model = <model>                      # right after seeding: its initial weights depend only on the seed
    train_data, eval_data = <data.train_data>, <data.eval_data>
    callbacks, strategy, ... = the objects of the trainer section
    trainer = TrainerClass(model, train_data=..., eval_data=..., **trainer section, callbacks=[..., FitConfigCallback])

An ``optimizer`` section (and ``lr_scheduler``) replaces the class's ``configure_optimizers``: the
optimizer is made from the prepared model's parameters inside the Trainer, as
``configure_optimizers`` would make it, so it also works where a strategy replaces the parameters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from jsonargparse import ArgumentParser, Namespace

from trainer.cli.errors import CliError
from trainer.cli.fit_config import FitConfigCallback
from trainer.random_state import set_seed


def instantiate(parser: ArgumentParser, config: Namespace, key: str) -> Any:
    """The object(s) of one section of ``config`` (``key``: ``"model"``, ``"data.train_data"``...), and only those."""
    part = Namespace()
    part[key] = config[key]
    make = getattr(parser, "instantiate", None) or parser.instantiate_classes  # instantiate: jsonargparse >= 4.49
    return make(part)[key]


def _section(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    return value.as_dict() if isinstance(value, Namespace) else dict(value)


def with_optimizers(trainer_class: type[Any], optimizer: Callable[..., Any] | None,
                    scheduler: Callable[..., Any] | None) -> type[Any]:
    """``trainer_class``, or a subclass whose ``configure_optimizers`` makes the configured optimizer (and scheduler)."""
    if optimizer is None:
        if scheduler is not None:
            raise CliError("lr_scheduler needs an optimizer section to schedule (e.g. --optimizer AdamW); without one the "
                           "Trainer's configure_optimizers makes the optimizer, and returns its scheduler itself.")
        return trainer_class

    def configure_optimizers(self: Any) -> Any:
        made = optimizer(self.model.parameters())
        return made if scheduler is None else (made, scheduler(made))

    configure_optimizers.__doc__ = "The optimizer (and scheduler) of the trainer fit config's optimizer section."
    return type(trainer_class.__name__, (trainer_class,), {
        "configure_optimizers": configure_optimizers, "__module__": trainer_class.__module__,
        "__qualname__": trainer_class.__qualname__, "__doc__": trainer_class.__doc__})


def _accepts(trainer_class: type[Any], name: str) -> bool:
    parameters = inspect.signature(trainer_class).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def build_trainer(parser: ArgumentParser, config: Namespace, trainer_class: type[Any], config_json: str) -> Any:
    """The Trainer ``config`` describes, built in the order above, with ``FitConfigCallback(config_json)`` added."""
    if not _accepts(trainer_class, "callbacks"):
        raise CliError(f"{trainer_class.__name__}.__init__ takes no callbacks argument: pass **kwargs on to "
                       "Trainer.__init__, so that trainer fit can add the callback that stores the config in checkpoints.")
    seed = config.get("trainer.seed")
    if seed is not None:
        set_seed(seed)
    model = instantiate(parser, config, "model")
    data = {name: instantiate(parser, config, f"data.{name}") for name in ("train_data", "eval_data")}
    settings = _section(instantiate(parser, config, "trainer"))
    callbacks = [*(settings.pop("callbacks", None) or []), FitConfigCallback(config_json)]
    built_class = with_optimizers(trainer_class, instantiate(parser, config, "optimizer"),
                                  instantiate(parser, config, "lr_scheduler"))
    given = {name: value for name, value in data.items() if value is not None}
    try:
        return built_class(model, **given, **settings, callbacks=callbacks)
    except ValueError as error:  # the Trainer's own checks of its arguments (batch_size >= 1, ...)
        raise CliError(f"{trainer_class.__name__}: {error}") from None
