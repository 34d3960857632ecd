"""The `rahf` command: `serve`, `train`, `eval` and `profiles`.

Knows argument parsing and hands each subcommand to the module that does the work; the library's own
errors (bad data, model or profile) and missing files end the command with a one-line message. `serve`
belongs to the server package, which is imported only when that subcommand runs its parser
registration; the library itself never imports server code.

`train`, `compare` and `eval` need the `train` extra (peft for the LoRA runs, matplotlib for the reports),
which a serving install leaves out; without it they stop at once with the command that installs it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# The commands that train or write reports, and the modules of the `train` extra (pyproject.toml) they use.
TRAIN_COMMANDS = frozenset({"train", "compare", "eval"})
TRAIN_MODULES = ("peft", "matplotlib")
TRAIN_INSTALL = "pip install 'rahf-steering[train]'"


def missing_train_modules() -> list[str]:
    """The modules of the `train` extra that do not import here (absent, or installed broken)."""
    missing = []
    for name in TRAIN_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rahf",
        description="Learn RAHF preference profiles and serve an LLM that applies them per request.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from server import cli as server_cli  # light module: imports FastAPI only when serving

    server_cli.register(sub)

    from .training import pipeline_cli

    pipeline_cli.register(sub)

    from . import profiles_cli

    profiles_cli.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .core.errors import SteeringError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in TRAIN_COMMANDS:
        missing = missing_train_modules()
        if missing:
            print(
                f"rahf {args.command}: error: the training dependencies are not installed (missing: "
                f"{', '.join(missing)}); install them with: {TRAIN_INSTALL}"
                "  (in a checkout: pip install -e '.[train]')",
                file=sys.stderr,
            )
            return 2
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # `rahf profiles show F | head`: the reader left; end as a Unix tool does, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 128 + 13  # killed by SIGPIPE
    except SteeringError as exc:  # bad data, model or profile: say what, no traceback
        print(f"rahf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        print(f"rahf {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
