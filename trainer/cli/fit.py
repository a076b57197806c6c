"""``trainer fit``: build a Trainer from a YAML config and ``--section.key`` overrides, then train it.

::

    trainer fit my_project.train:MyTrainer --config fit.yaml --trainer.max_epochs 2
    python -m trainer.cli.fit ...                                  # the same, without the console script
    trainer launch --num_processes 2 --cpu -m trainer.cli.fit ...  # on several processes

The sections and their types come from the signatures (``fit_parser``), through jsonargparse, an
optional dependency (``pip install 'trainer-kit[cli]'``); the objects are built in a fixed order
after the seed (``fit_build``); every checkpoint stores the resolved config as ``fit_config.json``
(``fit_config``). A mistake in the config or the flags is one line ``trainer fit: ...`` and exit
status 2, before anything is built.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from trainer.cli.errors import CliError, report

COMMAND = "fit"
NEEDS_JSONARGPARSE = "needs jsonargparse: pip install 'trainer-kit[cli]'"


def register(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``trainer fit``; its arguments all go to the jsonargparse parser (``prefix_chars`` keeps argparse off them)."""
    parser = commands.add_parser(COMMAND, help="build a Trainer from a YAML config (and --section.key overrides) and "
                                               "train it", prefix_chars="+", add_help=False)
    parser.add_argument("fit_args", nargs=argparse.REMAINDER)
    parser.set_defaults(func=run)
    return parser


@dataclass
class FitRun:
    """What ``build`` made: the Trainer, its resolved config (as the JSON checkpoints store), and ``resume``."""

    trainer: Any
    config_json: str
    resume: str | None


def _require_jsonargparse() -> None:
    if importlib.util.find_spec("jsonargparse") is None:
        raise CliError(NEEDS_JSONARGPARSE)


def build(argv: Sequence[str]) -> FitRun | None:
    """Parse ``argv`` (what follows ``trainer fit``) and build the Trainer; None when ``--help``/``--print_config`` printed.

    A mistake raises ``CliError`` before the model or the data is built.
    """
    _require_jsonargparse()
    from trainer.cli import fit_build, fit_imports, fit_parser

    fit_imports.make_cwd_importable()
    spec, args = fit_parser.choose_trainer_class(argv)
    trainer_class = fit_imports.load_trainer_class(spec)
    parser = fit_parser.build_parser(trainer_class, spec)
    config = fit_parser.parse(parser, args)
    if config is None:
        return None
    if config.trainer_class != spec:  # e.g. a --config given inline as text named another class
        raise CliError(f"trainer_class is {config.trainer_class!r} in the config but {spec!r} was built; give the "
                       "class as the first argument.")
    config_json = fit_parser.dump_json(parser, config)
    trainer = fit_build.build_trainer(parser, config, trainer_class, config_json)
    return FitRun(trainer, config_json, config.resume)


def fit(argv: Sequence[str]) -> int:
    """``trainer fit`` without the error printing: build, then ``trainer.fit(resume=...)``; the exit status."""
    run = build(argv)
    if run is not None:
        run.trainer.fit(resume=run.resume)
    return 0


def run(args: argparse.Namespace) -> int:
    """The ``trainer fit`` command of ``trainer.cli.main``."""
    return fit(args.fit_args)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m trainer.cli.fit``: as ``trainer fit``, with its one-line errors and exit status 2."""
    try:
        return fit(sys.argv[1:] if argv is None else argv)
    except CliError as error:
        return report(COMMAND, error)
    except KeyboardInterrupt:
        print(f"trainer {COMMAND}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
