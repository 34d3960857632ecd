"""`rahf serve`: parse flags and run the server (placeholder until the HTTP server lands)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("serve", help="serve a model with steering profiles over an OpenAI-compatible API")
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--model", default=None, help="local model directory (default: embedded SmolLM2)")
    parser.add_argument("--profile-dir", default=None)
    parser.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    raise SystemExit("rahf serve: the HTTP server is not built yet")
