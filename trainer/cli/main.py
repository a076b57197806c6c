"""``trainer <command>``: one entry point, one module per command."""

from __future__ import annotations

import argparse
import sys

from trainer.cli import config_cmd, env, estimate_memory, launch, merge_weights


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainer", description="Train and run PyTorch models anywhere.")
    commands = parser.add_subparsers(dest="command", metavar="<command>")
    config_cmd.register(commands)
    env.register(commands)
    estimate_memory.register(commands)
    launch.register(commands)
    launch.register_test(commands)
    merge_weights.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
