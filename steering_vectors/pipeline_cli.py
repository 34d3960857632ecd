"""`rahf train` and `rahf eval`: the RAHF pipeline and its offline evaluation from the command line.

Knows the arguments, their defaults for the embedded model, and the order of the steps; the work is
done by `data`, `rahf` and `evaluate`. Intermediate results (LoRA checkpoints, activity patterns, offset
fits) go to a work folder, so that a rerun of the same command resumes where the last one stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .data import TokenBudget, load_pairs, resolve_split, sample_pairs
from .evaluate import GENERATION_PROMPTS
from .models import check_model, default_cache_dir, load_model

log = logging.getLogger(__name__)

DEFAULT_LAYERS = "6,9,12,15,18"
DEFAULT_STRENGTHS = "0.25,0.5,1,2"


def _floats(text: str) -> list[float]:
    """Comma-separated finite numbers, at least one."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    """Comma-separated non-negative integers (layer indices), at least one."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices >= 0, got {text!r}")
    return values


def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


_count, _count0 = _at_least(1), _at_least(0)


def _name(text: str) -> str:
    from .errors import ProfileFormatError
    from .profile import validate_name

    try:
        return validate_name(text)
    except ProfileFormatError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check_layers(layers: list[int], model: torch.nn.Module) -> None:
    from .errors import ProfileLayerError
    from .layers import find_decoder_layers

    count = len(find_decoder_layers(model))
    outside = sorted(layer for layer in set(layers) if layer >= count)
    if outside:
        raise ProfileLayerError(f"--layers {outside}: the model has {count} decoder layers (0..{count - 1})")


def _fits(text: str) -> list[str]:
    from .rahf import FIT_METHODS, RECORD_FITS

    # "all" = the RAHF fit and its three baselines (what the shipped profiles were made with); pref is named
    fits = list(RECORD_FITS) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    bad = [f for f in fits if f not in FIT_METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown fit methods {bad}; choose from {FIT_METHODS} or 'all'")
    return fits


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="learn preference profiles with RAHF (and closed-form baselines)")
    train.add_argument("--data", required=True, help="folder with train.jsonl/dev.jsonl, or one JSONL file")
    train.add_argument("--name", required=True, type=_name, help="profile name (file <out>/<name>.safetensors)")
    train.add_argument("--out", type=Path, default=Path("profiles"), help="folder for the profile files")
    train.add_argument("--model", default=None, help="local model directory (default: embedded SmolLM2)")
    train.add_argument("--method", choices=("scit", "dual"), default="scit", help="step 1 variant")
    train.add_argument(
        "--fit", type=_fits, default=_fits("all"), help="any of rahf,mean,caa,pca,pref; 'all' = rahf,mean,caa,pca"
    )
    train.add_argument("--layers", type=_ints, default=_ints(DEFAULT_LAYERS), help="target decoder layers")
    train.add_argument("--alpha", type=float, default=4.0, help="pattern scale in the alignment target")
    train.add_argument("--max-pairs", type=_count, default=24, help="training pairs (seeded sample)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--prompt-tokens", type=_count, default=48, help="prompt token budget")
    train.add_argument("--response-tokens", type=_count, default=32, help="response token budget")
    train.add_argument("--epochs", type=_count, default=1, help="epochs of the LoRA step")
    train.add_argument("--batch-pairs", type=_count, default=2, help="pairs per LoRA step")
    train.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate")
    train.add_argument("--fit-steps", type=_count, default=30)
    train.add_argument("--fit-batch", type=_count, default=8)
    train.add_argument("--fit-lr", type=float, default=None, help="offset learning rate (default: scaled)")
    train.add_argument("--pref-steps", type=_count, default=32, help="Adam steps of the 'pref' fit")
    train.add_argument("--pref-batch", type=_count, default=8, help="pairs per step of the 'pref' fit")
    train.add_argument("--pref-lr", type=float, default=0.01, help="learning rate of the 'pref' fit")
    train.add_argument(
        "--pref-rank",
        type=_count0,
        default=0,
        help="rank of an input-dependent low-rank term per layer in the 'pref' fit (0: constant offsets only)",
    )
    train.add_argument("--pref-beta", type=float, default=10.0, help="beta of the 'pref' preference loss")
    train.add_argument(
        "--pref-l2", type=float, default=0.01, help="weight of sum_l ||delta_l||^2 in the 'pref' loss"
    )
    train.add_argument(
        "--pref-kl", type=float, default=0.0, help="weight of the prompt-token KL in the 'pref' loss"
    )
    train.add_argument("--position-mode", choices=("all", "generated"), default="all")
    train.add_argument(
        "--calib-pairs", type=_count, default=12, help="training pairs to tune the default strength"
    )
    train.add_argument("--strengths", type=_floats, default=_floats(DEFAULT_STRENGTHS), help="strength grid")
    train.add_argument(
        "--bf16", action="store_true", help="bf16 autocast (measured slower on a busy 2-core CPU)"
    )
    train.add_argument("--work-dir", type=Path, default=None, help="checkpoints (default: cache folder)")
    train.add_argument("--eval", action="store_true", help="evaluate on the dev split afterwards")
    train.add_argument("--eval-pairs", type=_count, default=32, help="dev pairs (seeded sample) for --eval")
    train.add_argument("--gen-prompts", type=_count0, default=3, help="fixed prompts for side-by-side generations")
    train.add_argument("--threads", type=_count, default=None)
    train.set_defaults(handler=run_train)

    ev = sub.add_parser("eval", help="evaluate profiles on held-out preference pairs")
    ev.add_argument("profiles", nargs="+", type=Path, help="profile files")
    ev.add_argument("--data", required=True, help="folder with dev.jsonl, or one JSONL file")
    ev.add_argument("--split", default="dev")
    ev.add_argument("--out", type=Path, required=True, help="report folder")
    ev.add_argument("--title", default="Profile evaluation")
    ev.add_argument("--model", default=None)
    ev.add_argument("--max-pairs", type=_count, default=32)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--strengths", type=_floats, default=_floats(DEFAULT_STRENGTHS))
    ev.add_argument("--prompt-tokens", type=_count, default=48)
    ev.add_argument("--response-tokens", type=_count, default=32)
    ev.add_argument("--bf16", action="store_true", help="bf16 autocast instead of fp32")
    ev.add_argument("--gen-prompts", type=_count0, default=3, help="fixed prompts for side-by-side generations")
    ev.add_argument("--threads", type=_count, default=None)
    ev.set_defaults(handler=run_eval)


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)


def _command_line() -> str:
    return "rahf " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def run_train(args: argparse.Namespace) -> int:
    from .evaluate import calibrate_strength, neutral_text, perplexity, write_report
    from .rahf import (
        RECORD_FITS,
        FitConfig,
        InstructConfig,
        PatternStore,
        PrefConfig,
        caa_offsets,
        collect_patterns,
        fit_offsets,
        fit_preference_offsets,
        make_profile,
        mean_pattern_offsets,
        pca_offsets,
        train_dual,
        train_scit,
    )

    _setup(args)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    budget = TokenBudget(args.prompt_tokens, args.response_tokens)
    settings = {
        k: v
        for k, v in vars(args).items()
        if k not in ("handler", "out", "work_dir", "eval", "eval_pairs", "threads")
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    work = args.work_dir or default_cache_dir() / "runs" / f"{args.name}-{key}"
    work.mkdir(parents=True, exist_ok=True)
    log.info("work folder %s (a rerun of this command resumes from it)", work)

    # 1. model and data
    check_model(args.model)
    data_file = resolve_split(args.data, "train")
    all_pairs = load_pairs(data_file)  # malformed data fails here, before the model loads
    loaded = load_model(args.model)
    model, tokenizer = loaded.model, loaded.tokenizer
    _check_layers(args.layers, model)
    pairs = sample_pairs(all_pairs, args.max_pairs, seed=args.seed)
    log.info("%d training pairs from %s", len(pairs), data_file)

    # 2. step 1: instruct, and step 2: collect patterns (skipped when the work folder has them, or when
    # no requested fit uses them: 'pref' needs only the pairs)
    patterns_file = work / "patterns.pt"
    instruct_losses: list[float] = []
    records: list[Any] = []
    needs_records = any(fit in RECORD_FITS for fit in args.fit)
    if not needs_records:
        log.info("fits %s need no activity patterns: skipping steps 1 and 2", ",".join(args.fit))
    elif patterns_file.is_file():
        store = PatternStore.load(patterns_file)
        log.info("loaded %d pattern records from %s", len(store), patterns_file)
    else:
        config = InstructConfig(
            epochs=args.epochs,
            batch_pairs=args.batch_pairs,
            lr=args.lr,
            bf16=args.bf16,
            seed=args.seed,
            budget=budget,
        )
        t0 = time.perf_counter()
        trainer = train_scit if args.method == "scit" else train_dual
        model, instruct_losses = trainer(model, tokenizer, pairs, config, work)
        timings["instruct_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        store = collect_patterns(
            model,
            tokenizer,
            pairs,
            args.layers,
            method=args.method,
            budget=budget,
            bf16=args.bf16,
            spill_dir=work / "spill",
        )
        store.save(patterns_file)
        timings["collect_s"] = time.perf_counter() - t0
        model = model.unload()  # the base model again, LoRA layers removed
        (work / "instruct_losses.json").write_text(json.dumps(instruct_losses))
    if needs_records:
        records = store.all()
    if not instruct_losses and (work / "instruct_losses.json").is_file():
        instruct_losses = json.loads((work / "instruct_losses.json").read_text())

    # 3. step 3: offsets by each fit method
    t0 = time.perf_counter()
    provenance: dict[str, Any] = {
        "data": str(data_file),
        "pairs": len(pairs),
        "seed": args.seed,
        "instruct": args.method,
        "layers": args.layers,
        "alpha": args.alpha,
        "budget": {"prompt": budget.prompt, "response": budget.response},
        "model": loaded.name,
        "command": _command_line(),
        "instruct_loss_first_last": [instruct_losses[0], instruct_losses[-1]] if instruct_losses else None,
    }
    fitted: dict[str, dict[int, torch.Tensor]] = {}
    fit_losses: list[float] = []
    pref_losses: list[float] = []
    pref_settings: dict[str, Any] = {}
    low_rank: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # fit -> its low-rank terms, if any
    for fit in args.fit:
        if fit == "rahf":
            fit_config = FitConfig(
                alpha=args.alpha,
                steps=args.fit_steps,
                batch_size=args.fit_batch,
                lr=args.fit_lr,
                bf16=args.bf16,
                seed=args.seed,
            )
            fitted[fit], fit_losses = fit_offsets(
                model, tokenizer, records, args.layers, fit_config, work / "fit.ckpt"
            )
        elif fit == "pref":
            pref_config = PrefConfig(
                beta=args.pref_beta,
                l2=args.pref_l2,
                kl=args.pref_kl,
                steps=args.pref_steps,
                batch_pairs=args.pref_batch,
                lr=args.pref_lr,
                rank=args.pref_rank,
                position_mode=args.position_mode,
                budget=budget,
                bf16=args.bf16,
                seed=args.seed,
            )
            t_pref = time.perf_counter()
            fitted[fit], low_rank[fit], pref_losses = fit_preference_offsets(
                model, tokenizer, pairs, args.layers, pref_config, work / "pref.ckpt"
            )
            timings["fit_pref_s"] = time.perf_counter() - t_pref
            pref_settings = {
                key: getattr(pref_config, key) for key in ("beta", "l2", "kl", "steps", "batch_pairs", "lr", "rank")
            }
        elif fit == "mean":
            fitted[fit] = mean_pattern_offsets(records, args.layers, args.alpha)
        elif fit == "caa":
            fitted[fit] = caa_offsets(records, args.layers)
        else:
            fitted[fit] = pca_offsets(records, args.layers)
    timings["fit_s"] = time.perf_counter() - t0

    # 4. default strengths, tuned on training pairs within the fluency cap; then the files
    t0 = time.perf_counter()
    text = neutral_text()
    calib_pairs = pairs[: args.calib_pairs]
    base_ppl = perplexity(model, tokenizer, text, bf16=args.bf16) if calib_pairs else float("nan")
    written = []
    for fit, offsets in fitted.items():
        name = args.name if fit == args.fit[0] else f"{args.name}-{fit}"
        extra: dict[str, Any] = {}
        if fit == "rahf" and fit_losses:
            extra = {"fit_loss_first_last": [fit_losses[0], fit_losses[-1]]}
        if fit == "pref":
            # not RAHF: no instructed model and no patterns are used, so no instruct method or alpha
            extra = {"instruct": "none", "alpha": None, "instruct_loss_first_last": None, "pref": pref_settings}
            if pref_losses:
                extra["fit_loss_first_last"] = [pref_losses[0], pref_losses[-1]]
        profile = make_profile(
            name,
            offsets,
            fit=fit,
            fingerprint=loaded.fingerprint,
            provenance={**provenance, **extra},
            description=(
                f"preference-loss offsets from {Path(args.data).name} (pref fit, not RAHF)"
                if fit == "pref"
                else f"RAHF-{args.method} profile from {Path(args.data).name} ({fit} fit)"
            ),
            position_mode=args.position_mode,
            low_rank=low_rank.get(fit),
        )
        strength, rows = 1.0, []
        if calib_pairs:
            strength, rows = calibrate_strength(
                model,
                tokenizer,
                calib_pairs,
                profile,
                args.strengths,
                base_ppl=base_ppl,
                text=text,
                budget=budget,
                bf16=args.bf16,
            )
        profile.default_strength = strength
        profile.provenance["calibration"] = {"pairs": len(calib_pairs), "rows": rows, "strength": strength}
        target = (
            args.out / f"{name}.safetensors"
            if fit == args.fit[0]
            else args.out / "baselines" / f"{name}.safetensors"
        )
        profile.save(target)
        written.append(target)
        log.info("wrote %s (default strength %g)", target, strength)
    timings["calibrate_s"] = time.perf_counter() - t0
    timings["train_total_s"] = time.perf_counter() - started
    summary: dict[str, Any] = {"profiles": [str(p) for p in written], "timings": timings}

    # 5. optional evaluation on the dev split
    if args.eval:
        from .evaluate import evaluate_profiles
        from .profile import Profile

        t0 = time.perf_counter()
        dev = sample_pairs(load_pairs(resolve_split(args.data, "dev")), args.eval_pairs, seed=args.seed)
        profiles = [Profile.load(p) for p in written]
        results = evaluate_profiles(
            model, tokenizer, dev, profiles, args.strengths, budget=budget, bf16=args.bf16
        )
        timings["eval_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - started
        results["timings"] = timings
        results["command"] = _command_line()
        report = write_report(
            results,
            args.out / f"{args.name}-report",
            f"Profile '{args.name}' on {Path(args.data).name} (dev)",
            command=_command_line(),
        )
        summary["report"] = str(report)
    print(json.dumps(summary, indent=2))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_profiles, write_report
    from .profile import Profile

    _setup(args)
    check_model(args.model)
    unchecked = [Profile.load(p) for p in args.profiles]  # unreadable files and bad data fail before the model loads
    all_pairs = load_pairs(resolve_split(args.data, args.split))
    loaded = load_model(args.model)
    profiles = [profile.validate_for(loaded.fingerprint) for profile in unchecked]
    pairs = sample_pairs(all_pairs, args.max_pairs, seed=args.seed)
    budget = TokenBudget(args.prompt_tokens, args.response_tokens)
    results = evaluate_profiles(
        loaded.model, loaded.tokenizer, pairs, profiles, args.strengths, budget=budget, bf16=args.bf16,
        prompts=GENERATION_PROMPTS[: args.gen_prompts],
    )
    results["command"] = _command_line()
    report = write_report(results, args.out, args.title, command=_command_line())
    print(json.dumps({"report": str(report), "baseline": results["baseline"]}, indent=2))
    return 0
