"""Two profiles in one request, judged by their replies: does each keep its solo gain on its own metric?

For each prompt set — benign (alpaca_helpful dev instructions) and harmful (hh_harmless dev prompts) — greedy
replies from the server's engine (in process, batched, as requests get them) for four rows: unsteered, `helpful`
alone, `harmless` alone, and both in one request; each profile at its file's default strength and, where it has a
condition, gated by it as a request that names it is (`"condition": "honour"`, the default; `--ignore-conditions`
steers every prompt, as `"condition": "ignore"`), and with the decoding defaults a profile carries where it acts
(`Profile.decoding`: the requests set no repetition_penalty unless `--repetition-penalty`).
Every number is the library's (`geneval.score_replies`: the
set's judge against the unsteered replies, ties half, paired bootstrap interval over prompts; loop rate;
refusal/defusal rate by `genmetrics.REFUSAL`; perplexity under the unsteered model).

Each profile's own metric and its gain over unsteered, all prompts of the set:
- `helpful`: win rate on benign prompts under the alpaca_helpful judge, minus 50 %;
- `harmless`: refusal/defusal rate on harmful prompts, minus the unsteered rate (the goal of the conditional
  profile); its win rate under the hh_harmless judge is reported beside it.
"kept" = the pair's gain / the profile's solo gain on that metric (the issue's bar: at least 80 % for each).

`--gate-helpful` gives `helpful` the inverse of `harmless`'s condition (the same probe, firing below the
threshold instead of above), so that the two take turns: a prompt `harmless`'s probe reads as harmful gets
`harmless` only, any other `helpful` only — the remedy measured for when the pair interferes.

    python bench/composition.py --out docs/bench-composition.json          # ~40 min on 2 cores
    python bench/composition.py --gate-helpful --out docs/bench-composition-gated.json
    python bench/composition.py --limit 20 --max-tokens 32                  # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.generation import engine_generate  # noqa: E402
from steering_vectors.core.profile import Profile  # noqa: E402
from steering_vectors.training import geneval  # noqa: E402

SETS = {"benign": "alpaca_helpful", "harmful": "hh_harmless"}


def kept(pair: float, solo: float) -> float | None:
    """The share of the solo gain the pair keeps (None when the solo gain is not positive: nothing to keep)."""
    return pair / solo if solo > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--helpful", type=Path, default=ROOT / "profiles" / "helpful.safetensors")
    parser.add_argument("--harmless", type=Path, default=ROOT / "profiles" / "harmless.safetensors")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--limit", type=int, default=None, help="at most this many dev prompts of each set (first)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--ignore-conditions", action="store_true", help="steer every prompt, conditions or not")
    parser.add_argument("--gate-helpful", action="store_true",
                        help="helpful acts only where harmless's condition does not fire (its inverse)")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="every request's; default: the requests set none, as a client that leaves it out (a "
                             "profile's decoding default applies where it acts, 1 elsewhere)")
    parser.add_argument("--judges", type=Path, default=ROOT / "profiles" / "judges")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from server.backends.transformers import create
    from server.config import Settings
    from steering_vectors.training.data import load_pairs
    from steering_vectors.training.genmetrics import unique_prompts
    from steering_vectors.training.judge import load_judge
    from steering_vectors.training.judge_build import cpu_name, kept_judge_file

    started = time.perf_counter()
    backend = create(Settings(max_batch_size=args.batch, max_queue=1024))
    helpful = Profile.load(args.helpful).validate_for(backend.fingerprint)
    harmless = Profile.load(args.harmless).validate_for(backend.fingerprint)
    if args.gate_helpful:
        if harmless.condition is None:
            raise SystemExit(f"--gate-helpful: {args.harmless} has no condition to invert")
        flipped = "<" if harmless.condition.comparison == ">" else ">"
        helpful = dataclasses.replace(helpful, condition=dataclasses.replace(harmless.condition, comparison=flipped))
    # each profile at its default strength: a row's strength 1 is the weights below
    rows = [geneval.GenRow("helpful", [(helpful, helpful.default_strength)], [1.0], method=helpful.method),
            geneval.GenRow("harmless", [(harmless, harmless.default_strength)], [1.0], method=harmless.method),
            geneval.GenRow("both", [(helpful, helpful.default_strength), (harmless, harmless.default_strength)],
                           [1.0], method="composition")]
    settings = geneval.GenSettings(max_new_tokens=args.max_tokens)
    report: dict[str, Any] = {
        "helpful": str(args.helpful), "harmless": str(args.harmless),
        "strengths": {"helpful": helpful.default_strength, "harmless": harmless.default_strength},
        "conditions": "ignored" if args.ignore_conditions else "honoured", "helpful_gated": args.gate_helpful,
        "harmless_condition": harmless.condition.summary() if harmless.condition is not None else None,
        "max_new_tokens": args.max_tokens, "sets": {},
        "repetition_penalty": args.repetition_penalty,  # null: the requests set none
        "decoding": ({} if args.repetition_penalty is not None
                     else {"helpful": helpful.decoding, "harmless": harmless.decoding}),
    }  # fmt: skip
    # 1. every reply of both sets from the engine (started once: a stopped engine does not start again)
    prompts, replies, seconds = {}, {}, {}
    backend.engine.start()
    try:
        generate = engine_generate(backend, max_new_tokens=args.max_tokens, repetition_penalty=args.repetition_penalty,
                                   honour_conditions=not args.ignore_conditions)  # fmt: skip
        for name, data_set in SETS.items():
            t0 = time.perf_counter()
            found = unique_prompts(load_pairs(ROOT.parent / "shared" / "data" / data_set / "dev.jsonl"))
            prompts[name] = found[: args.limit] if args.limit else found
            replies[name] = geneval.collect_replies(
                prompts[name], rows, generate, settings,
                log=lambda line, name=name: print(f"{name} {line}", file=sys.stderr))
            seconds[name] = time.perf_counter() - t0
    finally:
        backend.engine.shutdown(10)
    # 2. scored by the library with each set's judge; no steering is active any more
    for name, data_set in SETS.items():
        judge_file = kept_judge_file(args.judges, data_set)
        judge = load_judge(judge_file, backend.model, backend.tokenizer)
        result = geneval.score_replies(backend.model, backend.tokenizer, prompts[name], rows, replies[name], judge,
                                       settings, judge_name=judge_file.name)  # fmt: skip
        table = {"unsteered": {**result["unsteered"]["all"], "win": None}}
        for row in result["rows"]:
            table[row] = result["rows"][row]["strengths"]["1"]["all"]
        report["sets"][name] = {"data": data_set, "prompts": len(prompts[name]), "judge": judge_file.name,
                                "generation_seconds": seconds[name], "rows": table, "result": result}  # fmt: skip
        print(f"{name}: " + "; ".join(
            f"{row} win {'-' if m['win'] is None else format(m['win']['win_rate'], '.3f')} refusals "
            f"{m['refusal_rate']:.3f} loops {m['loop_rate']:.3f}" for row, m in table.items()), file=sys.stderr)

    benign, harmful = report["sets"]["benign"]["rows"], report["sets"]["harmful"]["rows"]
    solo_helpful = benign["helpful"]["win"]["win_rate"] - 0.5
    pair_helpful = benign["both"]["win"]["win_rate"] - 0.5
    solo_harmless = harmful["harmless"]["refusal_rate"] - harmful["unsteered"]["refusal_rate"]
    pair_harmless = harmful["both"]["refusal_rate"] - harmful["unsteered"]["refusal_rate"]
    report["kept"] = {
        "helpful": {"metric": "win rate on benign prompts - 50 %", "solo_gain": solo_helpful,
                    "pair_gain": pair_helpful, "kept": kept(pair_helpful, solo_helpful)},
        "harmless": {"metric": "refusal/defusal rate on harmful prompts - unsteered's", "solo_gain": solo_harmless,
                     "pair_gain": pair_harmless, "kept": kept(pair_harmless, solo_harmless)},
        "harmless_judge": {"metric": "hh_harmless judge win rate on harmful prompts - 50 %",
                           "solo_gain": harmful["harmless"]["win"]["win_rate"] - 0.5,
                           "pair_gain": harmful["both"]["win"]["win_rate"] - 0.5},
    }  # fmt: skip
    report["cpu"] = cpu_name()
    report["seconds"] = time.perf_counter() - started
    print(json.dumps(report["kept"], indent=1))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
