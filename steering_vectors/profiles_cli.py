"""`rahf profiles`: list, show, validate, copy and convert profile files; fit one on a running server.

Knows the command line; the work is done by `profile`, `gguf_io` and `models` (and, for `fit`, by the
server's `POST /v1/profiles/{name}/fit`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .core.errors import ProfileValueError, SteeringError
from .core.profile import POSITION_MODES, Profile


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

    p = actions.add_parser(
        "copy", help="write a copy of a profile with another name, position mode or default strength",
        description="The tensors (and a condition) are copied unchanged; provenance.copied_from records the "
                    "source file's sha256 and what changed. A new position mode steers other tokens, so the "
                    "copy drops the source's generation result (provenance.generation).")
    p.add_argument("file", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--name", default=None, help="profile name (default: the output file's stem)")
    p.add_argument("--position", choices=POSITION_MODES, default=None, help="position mode (default: the source's)")
    p.add_argument("--strength", type=float, default=None, help="default strength (default: the source's)")
    p.add_argument("--decoding", action="append", default=[], metavar="FIELD=VALUE",
                   help="a decoding default for the rows the profile steers, where a request sets none (today "
                        "repetition_penalty=1.15, say); FIELD=none removes one; repeatable. A change drops the "
                        "generation result, measured with the source's decoding")
    p.set_defaults(handler=_copy)

    p = actions.add_parser("export-gguf", help="write a profile as a GGUF control vector (llama.cpp, repeng)")
    p.add_argument("file", type=Path)
    p.add_argument("out", type=Path)
    p.set_defaults(handler=_export)

    p = actions.add_parser("import-gguf", help="turn a GGUF control vector into a profile file")
    p.add_argument("file", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--name", default=None, help="profile name (default: the output file's stem)")
    p.set_defaults(handler=_import)

    p = actions.add_parser(
        "fit", help="build a profile from a few contrastive examples on a running server (forward passes only)",
        description="EXAMPLES is a JSON file holding a fit request body ({\"examples\": [...]} or "
                    "{\"instructions\": {...}, \"prompts\": [...]}), or a JSONL file with one example per line "
                    "({\"positive\", \"negative\"} or {\"prompt\", \"positive\", \"negative\"}). The admin key, "
                    "when the server has keys, comes from $RAHF_ADMIN_KEY.")
    p.add_argument("name", help="the profile's name in the server's store")
    p.add_argument("examples", type=Path)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (with its root path, if any)")
    p.add_argument("--method", choices=("caa", "pca", "mean"), default=None, help="default: caa")
    p.add_argument("--layers", default=None, help="comma-separated layers (default: a middle band)")
    p.add_argument("--strength", type=float, default=None, help="the profile's default strength (default 1)")
    p.add_argument("--position", choices=POSITION_MODES, default=None, help="the profile's position mode (default all)")
    p.add_argument("--description", default=None)
    p.add_argument("--timeout", type=float, default=600.0)
    p.set_defaults(handler=_fit)

    p = actions.add_parser(
        "condition", help="fit a condition (a probe on the prompt) and attach it to a profile",
        description="FIRE and NO_FIRE are preference data (a folder with train.jsonl, or a .jsonl file: the "
                    "prompts of its pairs) or .txt files (one user message a line). The condition's layer, "
                    "what it reads and its threshold are chosen on a held-out part of each set; the report "
                    "(JSON) has the confusion matrix and the whole grid. Forward passes only.")
    p.add_argument("file", type=Path, help="the profile to attach the condition to")
    p.add_argument("--fire", required=True, help="prompts the condition should fire on")
    p.add_argument("--no-fire", required=True, help="prompts it should not fire on")
    p.add_argument("--out", type=Path, required=True, help="where to write the profile with its condition")
    p.add_argument("--report", type=Path, default=None, help="where to write the fit report (default: print)")
    p.add_argument("--model", default=None, help="local model directory (default: embedded SmolLM2)")
    p.add_argument("--layers", default=None, help="candidate layers, e.g. 2-20 or 4,8,12 (default: all)")
    p.add_argument("--max-prompts", type=int, default=400, help="prompts of each set (default 400)")
    p.add_argument("--held-out", type=float, default=0.3, help="share of each set held out (default 0.3)")
    p.add_argument("--max-false-fire", type=float, default=0.02,
                   help="largest held-out fire rate on NO_FIRE prompts the threshold may have (default 0.02)")
    p.add_argument("--method", choices=("logistic", "mean-difference"), default="logistic",
                   help="logistic regression (dot-product score; default) or difference of means (cosine, CAST's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_condition)


def _load_any(path: Path, name: str | None = None) -> Profile:
    from .core.gguf_io import is_gguf, read_profile

    data = path.read_bytes()
    return read_profile(data, name=name or (path.stem if is_gguf(data) else None), source=str(path))


def _guard(func):  # noqa: ANN001, ANN202 - turns library errors into one line and exit code 1
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except BrokenPipeError:
            raise  # the reader of our output left (`| head`): cli.main ends quietly
        except (SteeringError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return run


@_guard
def _list(args: argparse.Namespace) -> int:
    for path in sorted(args.directory.glob("*.safetensors")):
        try:
            profile = Profile.load(path)
            ranks = sorted(set(profile.ranks().values()))
            low_rank = f" low-rank={','.join(map(str, ranks))}" if ranks else ""
            condition = " condition" if profile.condition is not None else ""
            decoding = "".join(f" {key}={value:g}" for key, value in profile.decoding.items())
            print(f"{profile.name:24s} layers={profile.layers} method={profile.method} "
                  f"strength={profile.default_strength:g}{low_rank}{condition}{decoding}")
        except SteeringError as exc:
            print(f"{path.name:24s} INVALID: {exc}")
    return 0


@_guard
def _show(args: argparse.Namespace) -> int:
    print(json.dumps(_load_any(args.file).summary(), indent=2))
    return 0


@_guard
def _validate(args: argparse.Namespace) -> int:
    from .core.models import load_model

    profile = _load_any(args.file)
    loaded = load_model(args.model)
    profile.validate_for(loaded.fingerprint)
    print(f"ok: {profile.name} fits {loaded.name}")
    return 0


@_guard
def _export(args: argparse.Namespace) -> int:
    from .core.gguf_io import write_control_vector
    from .core.profile import atomic_write

    atomic_write(args.out, write_control_vector(_load_any(args.file)))
    print(f"wrote {args.out}")
    return 0


@_guard
def _copy(args: argparse.Namespace) -> int:
    import dataclasses
    import hashlib

    source = Profile.load(args.file)
    name = args.name or args.out.stem
    changes = {"name": [source.name, name]} if name != source.name else {}
    copy = source.renamed(name)
    if args.position is not None and args.position != source.position_mode:
        changes["position_mode"] = [source.position_mode, args.position]
        copy = dataclasses.replace(copy, position_mode=args.position)
    if args.strength is not None and args.strength != source.default_strength:
        changes["default_strength"] = [source.default_strength, args.strength]
        copy = dataclasses.replace(copy, default_strength=args.strength)
    decoding = dict(source.decoding)
    for item in args.decoding:
        key, sep, value = item.partition("=")
        if not sep:
            raise ProfileValueError(f"--decoding {item!r}: expected FIELD=VALUE (or FIELD=none)")
        if value.strip().lower() == "none":
            decoding.pop(key.strip(), None)
        else:
            try:
                decoding[key.strip()] = float(value)
            except ValueError:
                raise ProfileValueError(f"--decoding {item!r}: {value!r} is not a number") from None
    if decoding != source.decoding:
        changes["decoding"] = [source.decoding, decoding]
        copy = dataclasses.replace(copy, decoding=decoding)  # checked as a loaded file's are
    provenance = dict(source.provenance)
    if "position_mode" in changes or "decoding" in changes:
        provenance.pop("generation", None)  # measured with the source's position mode and decoding
    sha256 = hashlib.sha256(args.file.read_bytes()).hexdigest()
    copy.provenance = {**provenance, "copied_from": {"file": args.file.name, "sha256": sha256, "changes": changes}}
    copy.save(args.out)
    print(f"wrote {args.out}" + (f" ({', '.join(f'{k} {a} -> {b}' for k, (a, b) in changes.items())})"
                                 if changes else ""))  # fmt: skip
    return 0


@_guard
def _import(args: argparse.Namespace) -> int:
    profile = _load_any(args.file, name=args.name or args.out.stem)
    profile.renamed(args.name or args.out.stem).save(args.out)
    print(f"wrote {args.out}")
    return 0


def fit_request(path: Path, args: argparse.Namespace) -> dict:
    """The request body from an examples file (JSON body or JSONL examples) and the options given."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        body: dict = {"examples": [json.loads(line) for line in text.splitlines() if line.strip()]}
    else:
        loaded = json.loads(text)
        body = {"examples": loaded} if isinstance(loaded, list) else dict(loaded)
    options = {"method": args.method, "default_strength": args.strength, "position_mode": args.position,
               "description": args.description}
    body.update({k: v for k, v in options.items() if v is not None})
    if args.layers:
        body["layers"] = [int(x) for x in args.layers.split(",") if x.strip()]
    return body


def _fit(args: argparse.Namespace) -> int:
    import os
    import urllib.error
    import urllib.parse
    import urllib.request

    try:
        body = fit_request(args.examples, args)
    except (OSError, ValueError) as exc:
        print(f"error: cannot read {args.examples}: {exc}", file=sys.stderr)
        return 1
    headers = {"Content-Type": "application/json"}
    key = os.environ.get("RAHF_ADMIN_KEY", "").strip()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    url = f"{args.url.rstrip('/')}/v1/profiles/{urllib.parse.quote(args.name, safe='')}/fit"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout) as response:  # noqa: S310 - a URL the user gave
            summary = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())["error"]
            where = f" ({error['param']})" if error.get("param") else ""
            print(f"error: {exc.code}{where}: {error['message']}", file=sys.stderr)
        except (ValueError, KeyError, TypeError):
            print(f"error: {exc.code} {exc.reason}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: cannot reach {args.url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


def read_prompts(
    source: str, limit: int, *, seed: int = 0, exclude: Sequence[Sequence[dict[str, str]]] = ()
) -> list[list[dict[str, str]]]:
    """The conversations of `source` (module `condition` help), without repeats and without those in `exclude`,
    `limit` of them at most (a seeded sample)."""
    import random

    from .training.conditions import unique_prompts
    from .training.data import load_pairs, resolve_split

    path = Path(source)
    if path.suffix == ".txt":
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        conversations = [[{"role": "user", "content": line}] for line in lines]
    else:
        file = resolve_split(path, "train") if path.is_dir() else path
        conversations = [pair.messages for pair in load_pairs(file)]
    left_out = {json.dumps(list(messages), sort_keys=True) for messages in exclude}
    prompts = [p for p in unique_prompts(conversations) if json.dumps(p, sort_keys=True) not in left_out]
    if len(prompts) > limit:
        prompts = random.Random(seed).sample(prompts, limit)
    return prompts


def _layer_list(text: str | None, count: int) -> list[int]:
    if not text:
        return list(range(count))
    layers: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        layers.extend(range(int(first), int(last) + 1) if last else [int(first)])
    bad = [layer for layer in layers if not 0 <= layer < count]
    if bad:
        raise SteeringError(f"layers {bad} are outside the model's 0..{count - 1}")
    return sorted(set(layers))


@_guard
def _condition(args: argparse.Namespace) -> int:
    import dataclasses

    from tqdm import tqdm

    from .core.models import load_model
    from .training.conditions import fit_condition, prompt_states, render_prompt

    profile = _load_any(args.file)
    loaded = load_model(args.model)
    profile.validate_for(loaded.fingerprint)
    layers = _layer_list(args.layers, loaded.fingerprint.num_layers)
    states = {}
    for side, source in (("fire", args.fire), ("no-fire", args.no_fire)):
        prompts = [render_prompt(loaded.tokenizer, m) for m in read_prompts(source, args.max_prompts, seed=args.seed)]
        with tqdm(total=len(prompts), desc=f"prompt states ({side})", unit="prompt", file=sys.stderr) as bar:
            states[side] = prompt_states(loaded.model, prompts, layers,
                                         progress=lambda done, total, bar=bar: bar.update(done - bar.n))
    fit = fit_condition(states["fire"], states["no-fire"], held_out=args.held_out,
                        max_false_fire=args.max_false_fire, seed=args.seed, method=args.method)
    provenance = {**profile.provenance, "condition": {
        "fire": args.fire, "no_fire": args.no_fire, "max_prompts": args.max_prompts, "held_out": args.held_out,
        "max_false_fire": args.max_false_fire, "seed": args.seed, "method": args.method,
        "held_out_confusion": fit.held_out}}
    attached = dataclasses.replace(profile, condition=fit.condition, provenance=provenance,
                                   offsets=dict(profile.offsets), low_rank=dict(profile.low_rank),
                                   lora=dict(profile.lora))
    attached.save(args.out)
    report = json.dumps(fit.report(), indent=2)
    if args.report is not None:
        args.report.write_text(report + "\n", encoding="utf-8")
    else:
        print(report)
    held = fit.held_out
    print(f"condition: layer {fit.condition.layer}, {fit.condition.reads}, {fit.condition.kind} score > "
          f"{fit.condition.threshold:.4f}; "
          f"held out: fires on {held['tp']}/{held['tp'] + held['fn']} should-fire, {held['fp']}/"
          f"{held['fp'] + held['tn']} should-not; wrote {args.out}", file=sys.stderr)
    return 0
