"""`mugv <command> ...`: one module per subcommand, each exposing `register(subparsers)`.

A subcommand module's `register` adds its parser and sets `func` (called with the parsed
args, returning an exit code). Modules are imported only when the CLI runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand modules under mugv.cli, in help order
COMMANDS = ["info", "data", "prep"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mugv", description="Train MUG-V video DiTs on Megatron-Core.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"mugv.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
