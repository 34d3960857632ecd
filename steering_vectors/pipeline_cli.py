"""`rahf train` and `rahf eval` (placeholder until the training pipeline lands)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    for name in ("train", "eval"):
        parser = sub.add_parser(name, help=f"{name} (not built yet)")
        parser.set_defaults(handler=lambda args, name=name: f"rahf {name}: not built yet")
