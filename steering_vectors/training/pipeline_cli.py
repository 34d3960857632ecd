"""`rahf train` and `rahf eval`: the RAHF pipeline and its offline evaluation from the command line.

Knows the arguments, their defaults for the embedded model, and the order of the steps; the work is
done by `data`, the RAHF steps (`instruct`, `collect`, `fit`; `pref`) and `evaluate`, through
`pipeline`'s stages; the argument types and run options it shares with `compare` are `cli_options`'.
Intermediate results (LoRA checkpoints, activity patterns, offset fits) go to a work folder, so that a
rerun of the same command resumes where the last one stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.models import check_model, default_cache_dir, load_model
from .cli_options import (
    DEFAULT_STRENGTHS,
    add_generation_eval_options,
    add_generation_options,
    add_run_options,
    check_layers,
    command_line,
    parse_count,
    parse_count0,
    parse_fits,
    parse_floats,
    parse_name,
    setup,
)
from .data import TokenBudget, load_pairs, resolve_split, sample_pairs
from .evaluate import GENERATION_PROMPTS

if TYPE_CHECKING:
    from ..core.profile import Profile

log = logging.getLogger(__name__)

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


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train",
        help="learn preference profiles with RAHF (and closed-form baselines)",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--data", required=True, help="folder with train.jsonl/dev.jsonl, or one JSONL file")
    train.add_argument("--name", required=True, type=parse_name, help="profile name (file <out>/<name>.safetensors)")
    train.add_argument("--out", type=Path, default=Path("profiles"), help="folder for the profile files")
    add_run_options(train)
    train.add_argument(
        "--fit", type=parse_fits, default=parse_fits("all"),
        help="any of rahf,lora,mean,caa,pca,pref; 'all' = rahf,mean,caa,pca",
    )
    train.add_argument("--eval", action="store_true", help="evaluate on the dev split afterwards")
    train.add_argument("--eval-pairs", type=parse_count, default=1000, help="dev pairs (seeded sample) for --eval")
    train.add_argument("--gen-prompts", type=parse_count0, default=3, help="fixed prompts for side-by-side generations")
    add_generation_options(train)
    train.add_argument("--threads", type=parse_count, default=None)
    train.set_defaults(handler=run_train)

    from . import compare

    compare.register(sub)

    ev = sub.add_parser("eval", help="evaluate profiles on held-out preference pairs")
    ev.add_argument("profiles", nargs="+", type=Path, help="profile files")
    ev.add_argument("--data", required=True, help="folder with dev.jsonl, or one JSONL file")
    ev.add_argument("--split", default="dev")
    ev.add_argument("--out", type=Path, required=True, help="report folder")
    ev.add_argument("--title", default="Profile evaluation")
    ev.add_argument("--model", default=None)
    ev.add_argument("--max-pairs", type=parse_count, default=1000)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--strengths", type=parse_floats, default=parse_floats(DEFAULT_STRENGTHS))
    ev.add_argument("--prompt-tokens", type=parse_count, default=96)
    ev.add_argument("--response-tokens", type=parse_count, default=256, help="reply tokens scored per reply")
    ev.add_argument("--bf16", choices=("auto", "on", "off"), default="auto", help="bf16 autocast")
    ev.add_argument("--gen-prompts", type=parse_count0, default=3, help="fixed prompts for side-by-side generations")
    add_generation_options(ev)
    add_generation_eval_options(ev)
    ev.add_argument("--gen-annotate", type=Path, default=None, metavar="DIR",
                    help="with --generation: write each profile, with its generation result in its provenance "
                         "('generation'; tensors unchanged), to DIR under its file name")
    ev.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N")
    ev.add_argument("--threads", type=parse_count, default=None)
    ev.set_defaults(handler=run_eval)


def run_train(args: argparse.Namespace) -> int:
    from .evaluate import neutral_text, perplexity, write_report
    from .pipeline import Run, RunConfig, Stages, resolve_bf16

    setup(args)
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
    check_layers(args.layers, loaded.model)
    run = Run(config, loaded, stages, command=command_line())
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
        from ..core.profile import Profile
        from .evaluate import evaluate_profiles

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
        results_eval["command"] = command_line()
        report = write_report(
            results_eval,
            args.out / f"{args.name}-report",
            f"Profile '{args.name}' on {Path(args.data).name} (dev)",
            command=command_line(),
        )
        summary["report"] = str(report)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..core.profile import Profile
    from .evaluate import evaluate_profiles, write_report
    from .pipeline import resolve_bf16

    setup(args)
    check_model(args.model)
    unchecked = [Profile.load(p) for p in args.profiles]  # unreadable files and bad data fail before the model loads
    _check_annotate(args)
    judge_path = None
    if args.generation:
        from .geneval import judge_file_for

        judge_path = judge_file_for(args.judge, args.judges, args.data)  # a missing judge fails before any work
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
    if args.generation:
        from .geneval import GenRow, evaluate_from_args
        from .genmetrics import unique_prompts

        grid = args.gen_strengths or args.strengths
        rows = [GenRow.of_profile(profile, grid) for profile in profiles]
        if args.gen_compose and len(profiles) > 1:
            rows.append(GenRow("+".join(p.name for p in profiles), [(p, p.default_strength) for p in profiles],
                               [1.0], method="composition of " + ", ".join(p.method for p in profiles)))  # fmt: skip
        results["generation_eval"] = evaluate_from_args(
            args, loaded.model, loaded.tokenizer, unique_prompts(all_pairs), rows, bf16, judge_path
        )
        if args.gen_annotate is not None:
            _annotate(args, profiles, results["generation_eval"], judge_path)
    results["command"] = command_line()
    extra: list[str] = []
    if args.generation:
        from .geneval import generation_lines, plot_generation

        plot_generation(results["generation_eval"], args.out / "generation.png")
        extra = [*generation_lines(results["generation_eval"]), "", "![win rate and loop rate vs strength]"
                 "(generation.png)", ""]  # fmt: skip
    report = write_report(results, args.out, args.title, command=command_line(), extra=extra)
    print(json.dumps({"report": str(report), "baseline": results["baseline"]}, indent=2))
    return 0


def _check_annotate(args: argparse.Namespace) -> None:
    """--gen-annotate needs --generation and writes copies, never over a profile it reads."""
    from ..core.errors import SteeringError

    if args.gen_annotate is None:
        return
    if not args.generation:
        raise SteeringError("--gen-annotate needs --generation (it stores the generation result)")
    inputs = {Path(p).resolve() for p in args.profiles}
    if any((args.gen_annotate / Path(p).name).resolve() in inputs for p in args.profiles):
        raise SteeringError(f"--gen-annotate {args.gen_annotate}: would write over an input profile; give "
                            "another folder")


def _annotate(args: argparse.Namespace, profiles: list[Profile], result: dict[str, Any], judge_path: Path) -> None:
    """--gen-annotate: each profile under its file name in the folder, with its row's result."""
    from .geneval import data_set_name, generation_record
    from .pipeline import file_sha256

    for path, profile in zip(args.profiles, profiles, strict=True):
        record = generation_record(result, profile.name, data_set=data_set_name(args.data), replies="library",
                                   judge_sha256=file_sha256(judge_path), source=str(args.out / "report.json"))
        out = profile.with_generation(record).save(args.gen_annotate / Path(path).name)
        log.info("wrote %s with its generation result (chosen strength %g)", out, record.chosen_strength)
