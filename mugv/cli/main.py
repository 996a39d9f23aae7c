"""`mugv <command> ...`: one module per subcommand, each exposing `register(subparsers)`.

A subcommand module's `register` adds its parser and sets `func` (called with the parsed
args, returning an exit code). Modules are imported only when the CLI runs. Logging and the
known third-party warning filters are configured here, once per process (mugv.utils.logging).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand modules under mugv.cli, in help order
COMMANDS = ["info", "demo", "config", "train", "curriculum", "data", "curate", "prep", "checkpoint", "convert",
            "sample"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mugv", description="Train MUG-V video DiTs on Megatron-Core.")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"mugv.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mugv.utils.logging import configure_logging

    configure_logging()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also follow options: `mugv train cfg.yaml --nproc 2 a.b=1`
        bad = [e for e in extra if e.startswith("-") or "=" not in e]
        if bad or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(bad or extra)}")
        args.overrides = [*args.overrides, *extra]
    from mugv.config import ConfigError
    from mugv.utils.runlock import RunLockError

    try:
        return int(args.func(args) or 0)
    except ConfigError as err:
        print(f"mugv {args.command}: config error: {err}", file=sys.stderr)
        return 2
    except RunLockError as err:  # another run holds the run directory
        print(f"mugv {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
