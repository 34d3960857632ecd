"""`rahf profiles`: inspect and convert profile files (filled in with the GGUF control-vector support)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("profiles", help="inspect and convert profile files")
    parser.set_defaults(handler=lambda args: 0)
