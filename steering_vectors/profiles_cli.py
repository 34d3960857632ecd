"""`rahf profiles`: list, show, validate and convert profile files.

Knows the command line; the work is done by `profile`, `gguf_io` and `models`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import SteeringError
from .profile import Profile


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("profiles", help="list, show, validate and convert profile files")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    p = actions.add_parser("list", help="list the profiles in a directory")
    p.add_argument("directory", type=Path)
    p.set_defaults(handler=_list)

    p = actions.add_parser("show", help="print a profile's metadata and offset norms as JSON")
    p.add_argument("file", type=Path)
    p.set_defaults(handler=_show)

    p = actions.add_parser("validate", help="check a profile against a model (default: the embedded model)")
    p.add_argument("file", type=Path)
    p.add_argument("--model", default=None, help="local model directory (default: embedded SmolLM2)")
    p.set_defaults(handler=_validate)

    p = actions.add_parser("export-gguf", help="write a profile as a GGUF control vector (llama.cpp, repeng)")
    p.add_argument("file", type=Path)
    p.add_argument("out", type=Path)
    p.set_defaults(handler=_export)

    p = actions.add_parser("import-gguf", help="turn a GGUF control vector into a profile file")
    p.add_argument("file", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--name", default=None, help="profile name (default: the output file's stem)")
    p.set_defaults(handler=_import)


def _load_any(path: Path, name: str | None = None) -> Profile:
    from .gguf_io import is_gguf, read_profile

    data = path.read_bytes()
    return read_profile(data, name=name or (path.stem if is_gguf(data) else None), source=str(path))


def _guard(func):  # noqa: ANN001, ANN202 - turns library errors into one line and exit code 1
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (SteeringError, OSError) as exc:
            print(f"error: {exc}")
            return 1

    return run


@_guard
def _list(args: argparse.Namespace) -> int:
    for path in sorted(args.directory.glob("*.safetensors")):
        try:
            profile = Profile.load(path)
            ranks = sorted(set(profile.ranks().values()))
            low_rank = f" low-rank={','.join(map(str, ranks))}" if ranks else ""
            print(f"{profile.name:24s} layers={profile.layers} method={profile.method} "
                  f"strength={profile.default_strength:g}{low_rank}")
        except SteeringError as exc:
            print(f"{path.name:24s} INVALID: {exc}")
    return 0


@_guard
def _show(args: argparse.Namespace) -> int:
    print(json.dumps(_load_any(args.file).summary(), indent=2))
    return 0


@_guard
def _validate(args: argparse.Namespace) -> int:
    from .models import load_model

    profile = _load_any(args.file)
    loaded = load_model(args.model)
    profile.validate_for(loaded.fingerprint)
    print(f"ok: {profile.name} fits {loaded.name}")
    return 0


@_guard
def _export(args: argparse.Namespace) -> int:
    from .gguf_io import write_control_vector
    from .profile import atomic_write

    atomic_write(args.out, write_control_vector(_load_any(args.file)))
    print(f"wrote {args.out}")
    return 0


@_guard
def _import(args: argparse.Namespace) -> int:
    profile = _load_any(args.file, name=args.name or args.out.stem)
    profile.renamed(args.name or args.out.stem).save(args.out)
    print(f"wrote {args.out}")
    return 0
