"""`rahf train` and `rahf eval`: the RAHF pipeline and its offline evaluation from the command line.

Knows the arguments, their defaults for the embedded model, and the order of the steps; the work is
done by `data`, `rahf` and `evaluate`. Intermediate results (LoRA checkpoints, activity patterns, offset
fits) go to a work folder, so that a rerun of the same command resumes where the last one stopped.
"""

from __future__ import annotations

import argparse
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


def _penalty(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.01 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"expected a repetition penalty from 0.01 to 100 (1: off), got {text!r}")
    return value


def _add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gen-tokens", type=_count, default=96,
                        help="new tokens of each side-by-side generation (default 96: long enough to show loops)")
    parser.add_argument("--gen-repetition-penalty", type=_penalty, default=1.0,
                        help="repetition_penalty of those generations, as the server applies it (default 1: off)")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


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


TRAIN_EPILOG = """
which method makes which file:
  <out>/<name>.safetensors           the first fit of --fit (default 'rahf': RAHF step 3, offsets plus
                                     low-rank terms fitted to the step-1 model's states moved along the
                                     activity pattern, h_good + alpha * v)
  <out>/baselines/<name>-<fit>.safetensors
                                     the other fits: 'mean' (alpha * mean pattern), 'caa' (mean base-model
                                     difference chosen - rejected), 'pca' (RepE first principal direction),
                                     'pref' (our own preference-loss fit; not RAHF, needs no step 1 or 2),
                                     'lora' (RAHF step 3 in the paper's own form: a LoRA adapter on q/v,
                                     r 8, trained towards h_good + alpha * v and saved as per-row LoRA
                                     terms, format version 3; first in --fit to make it <name>)
every file records its method and settings (rahf profiles show FILE).
"""


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of one training run (`pipeline.RunConfig`), shared by `train` and `compare`."""
    parser.add_argument("--model", default=None, help="local model directory (default: embedded SmolLM2)")
    parser.add_argument("--method", choices=("scit", "dual"), default="dual", help="step 1 variant")
    parser.add_argument("--layers", type=_ints, default=_ints(DEFAULT_LAYERS), help="target decoder layers")
    parser.add_argument("--alpha", type=float, default=1.0, help="pattern scale in the alignment target")
    parser.add_argument("--max-pairs", type=_count, default=1024, help="training pairs (seeded sample)")
    parser.add_argument(
        "--held-out",
        type=_fraction,
        default=0.1,
        help="share of the training file's prompts held out from every fit step (calibration, step-1 gap)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-tokens", type=_count, default=96, help="prompt token budget")
    parser.add_argument("--response-tokens", type=_count, default=64, help="reply token budget of steps 1-3")
    parser.add_argument(
        "--eval-response-tokens", type=_count, default=256, help="reply token budget of calibration and --eval"
    )
    parser.add_argument("--epochs", type=_count, default=1, help="epochs of the LoRA step")
    parser.add_argument("--batch-pairs", type=_count, default=2, help="pairs per LoRA step")
    parser.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate")
    parser.add_argument("--fit-steps", type=_count, default=128, help="Adam steps of the 'rahf' fit")
    parser.add_argument("--fit-batch", type=_count, default=8, help="replies per step of the 'rahf' fit")
    parser.add_argument("--fit-lr", type=float, default=None, help="'rahf' fit learning rate (default: scaled)")
    parser.add_argument(
        "--rank", type=_count0, default=8, help="rank of the input-dependent low-rank term per layer in the 'rahf' fit"
    )
    parser.add_argument("--kl", type=float, default=0.0, help="weight of the prompt-token KL in the 'rahf' fit")
    parser.add_argument(
        "--l2", type=float, default=1e-3, help="weight of the low-rank factors' squared norms in the 'rahf' fit"
    )
    parser.add_argument(
        "--fit-down-lr", type=float, default=1e-3, help="learning rate of the unit-norm 'down' factors in 'rahf'"
    )
    parser.add_argument(
        "--fit-init",
        choices=("zeros", "shift"),
        default="shift",
        help="start of the 'rahf' offsets: zeros, or the closed-form mean shift from base states to the target",
    )
    parser.add_argument("--pref-steps", type=_count, default=32, help="Adam steps of the 'pref' fit")
    parser.add_argument("--pref-batch", type=_count, default=8, help="pairs per step of the 'pref' fit")
    parser.add_argument("--pref-lr", type=float, default=0.01, help="learning rate of the 'pref' fit")
    parser.add_argument(
        "--pref-rank",
        type=_count0,
        default=0,
        help="rank of an input-dependent low-rank term per layer in the 'pref' fit (0: constant offsets only)",
    )
    parser.add_argument("--pref-beta", type=float, default=10.0, help="beta of the 'pref' preference loss")
    parser.add_argument(
        "--pref-l2", type=float, default=0.01, help="weight of the squared norms of offsets and factors in 'pref'"
    )
    parser.add_argument(
        "--pref-kl", type=float, default=0.0, help="weight of the prompt-token KL in the 'pref' loss"
    )
    parser.add_argument("--position-mode", choices=("all", "generated"), default="all")
    parser.add_argument(
        "--calib-pairs", type=_count, default=64, help="held-out training pairs to tune the default strength"
    )
    parser.add_argument(
        "--gap-pairs", type=_count0, default=64, help="held-out pairs for step 1's likelihood gap (0: skip)"
    )
    parser.add_argument("--strengths", type=_floats, default=_floats(DEFAULT_STRENGTHS), help="strength grid")
    parser.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16 autocast; auto: on where the CPU has bf16 units (AVX-512 BF16, AMX), off elsewhere",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="stage folders and checkpoints (default: <cache>/runs)"
    )
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N")


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="learn preference profiles with RAHF (and closed-form baselines)",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--data", required=True, help="folder with train.jsonl/dev.jsonl, or one JSONL file")
    train.add_argument("--name", required=True, type=_name, help="profile name (file <out>/<name>.safetensors)")
    train.add_argument("--out", type=Path, default=Path("profiles"), help="folder for the profile files")
    _add_run_options(train)
    train.add_argument(
        "--fit", type=_fits, default=_fits("all"), help="any of rahf,lora,mean,caa,pca,pref; 'all' = rahf,mean,caa,pca"
    )
    train.add_argument("--eval", action="store_true", help="evaluate on the dev split afterwards")
    train.add_argument("--eval-pairs", type=_count, default=1000, help="dev pairs (seeded sample) for --eval")
    train.add_argument("--gen-prompts", type=_count0, default=3, help="fixed prompts for side-by-side generations")
    _add_generation_options(train)
    train.add_argument("--threads", type=_count, default=None)
    train.set_defaults(handler=run_train)

    from . import compare

    compare.register(sub, _add_run_options, _floats, _count)

    ev = sub.add_parser("eval", help="evaluate profiles on held-out preference pairs")
    ev.add_argument("profiles", nargs="+", type=Path, help="profile files")
    ev.add_argument("--data", required=True, help="folder with dev.jsonl, or one JSONL file")
    ev.add_argument("--split", default="dev")
    ev.add_argument("--out", type=Path, required=True, help="report folder")
    ev.add_argument("--title", default="Profile evaluation")
    ev.add_argument("--model", default=None)
    ev.add_argument("--max-pairs", type=_count, default=1000)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--strengths", type=_floats, default=_floats(DEFAULT_STRENGTHS))
    ev.add_argument("--prompt-tokens", type=_count, default=96)
    ev.add_argument("--response-tokens", type=_count, default=256, help="reply tokens scored per reply")
    ev.add_argument("--bf16", choices=("auto", "on", "off"), default="auto", help="bf16 autocast")
    ev.add_argument("--gen-prompts", type=_count0, default=3, help="fixed prompts for side-by-side generations")
    _add_generation_options(ev)
    ev.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N")
    ev.add_argument("--threads", type=_count, default=None)
    ev.set_defaults(handler=run_eval)


def _setup(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)


def _command_line() -> str:
    return "rahf " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def run_train(args: argparse.Namespace) -> int:
    from .evaluate import neutral_text, perplexity, write_report
    from .pipeline import Run, RunConfig, Stages, resolve_bf16

    _setup(args)
    started = time.perf_counter()
    bf16 = resolve_bf16(args.bf16, args.device)
    stages = Stages(args.work_dir or default_cache_dir() / "runs")
    log.info("stage folders under %s (a rerun resumes from them); bf16 autocast %s", stages.root, bf16)

    # 1. model and data: the fit pairs, and calibration pairs held out from every fit step
    check_model(args.model)
    data_file = resolve_split(args.data, "train")
    config = RunConfig.from_args(args, data_file, bf16)
    load_pairs(data_file)  # malformed data fails here, before the model loads
    from .pipeline import split_training_pairs

    split_training_pairs(  # and too few prompts to hold some out
        data_file, max_pairs=config.max_pairs, calib_pairs=config.calib_pairs, held_out=config.held_out,
        seed=config.seed,
    )
    loaded = load_model(args.model, device=args.device)
    _check_layers(args.layers, loaded.model)
    run = Run(config, loaded, stages, command=_command_line())
    log.info(
        "%d training pairs and %d held-out calibration pairs from %s (%d / %d pairs in the two parts)",
        len(run.split.pairs), len(run.split.calib), data_file, run.split.pool, run.split.held,
    )

    # 2. steps 1-3 for each fit (steps 1 and 2 only when a fit uses patterns; 'pref' needs only the pairs)
    timings: dict[str, float] = {}
    results = {}
    t0 = time.perf_counter()
    for fit in args.fit:
        results[fit] = run.fit(fit)
        for key, value in results[fit].seconds.items():
            timings[key if key != "fit_s" else f"fit_{fit}_s"] = value
    timings["fit_total_s"] = time.perf_counter() - t0

    # 3. default strengths, tuned on held-out training pairs within the fluency cap; then the files
    t0 = time.perf_counter()
    text = neutral_text()
    base_ppl = perplexity(loaded.model, loaded.tokenizer, text, bf16=bf16)
    written = []
    for fit, result in results.items():
        headline = fit == args.fit[0]
        profile = run.profile(fit, args.name if headline else f"{args.name}-{fit}", result)
        run.calibrate(profile, args.strengths, base_ppl, text)
        target = (args.out if headline else args.out / "baselines") / f"{profile.name}.safetensors"
        profile.save(target)
        written.append((target, profile))
        log.info("wrote %s (default strength %g)", target, profile.default_strength)
    timings["calibrate_s"] = time.perf_counter() - t0
    timings["train_total_s"] = time.perf_counter() - started
    gaps = [p.provenance.get("instruct_gap") for _, p in written if p.provenance.get("instruct_gap")]
    summary: dict[str, Any] = {
        "profiles": [str(path) for path, _ in written],
        "timings": timings,
        "instruct_gap": gaps[0] if gaps else None,
    }

    # 4. optional evaluation on the dev split
    if args.eval:
        from .evaluate import evaluate_profiles
        from .profile import Profile

        t0 = time.perf_counter()
        dev = sample_pairs(load_pairs(resolve_split(args.data, "dev")), args.eval_pairs, seed=args.seed)
        profiles = [Profile.load(path) for path, _ in written]
        results_eval = evaluate_profiles(
            loaded.model, loaded.tokenizer, dev, profiles, args.strengths, budget=config.eval_budget, bf16=bf16,
            prompts=GENERATION_PROMPTS[: args.gen_prompts], max_new_tokens=args.gen_tokens,
            repetition_penalty=args.gen_repetition_penalty,
        )
        timings["eval_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - started
        results_eval["timings"] = timings
        results_eval["command"] = _command_line()
        report = write_report(
            results_eval,
            args.out / f"{args.name}-report",
            f"Profile '{args.name}' on {Path(args.data).name} (dev)",
            command=_command_line(),
        )
        summary["report"] = str(report)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_profiles, write_report
    from .pipeline import resolve_bf16
    from .profile import Profile

    _setup(args)
    check_model(args.model)
    unchecked = [Profile.load(p) for p in args.profiles]  # unreadable files and bad data fail before the model loads
    all_pairs = load_pairs(resolve_split(args.data, args.split))
    loaded = load_model(args.model, device=args.device)
    profiles = [profile.validate_for(loaded.fingerprint) for profile in unchecked]
    pairs = sample_pairs(all_pairs, args.max_pairs, seed=args.seed)
    budget = TokenBudget(args.prompt_tokens, args.response_tokens)
    bf16 = resolve_bf16(args.bf16, args.device)
    results = evaluate_profiles(
        loaded.model, loaded.tokenizer, pairs, profiles, args.strengths, budget=budget, bf16=bf16,
        prompts=GENERATION_PROMPTS[: args.gen_prompts], max_new_tokens=args.gen_tokens,
        repetition_penalty=args.gen_repetition_penalty,
    )
    results["command"] = _command_line()
    report = write_report(results, args.out, args.title, command=_command_line())
    print(json.dumps({"report": str(report), "baseline": results["baseline"]}, indent=2))
    return 0
