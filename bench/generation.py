"""Profiles judged by their replies, made by the server's engine: greedy replies to a set's dev prompts at
several strengths, scored by the library's generation evaluation (`geneval.score_replies`, docs/judge.md): win
rate against the unsteered replies under the set's judge (profiles/judges; ties half, bootstrap interval),
loop rate, distinct-2, length, refusal rate and perplexity under the unsteered model; the strength chosen on
half A of the dev prompts (`genmetrics.choose_strength_half_split`: best win rate with loop rate no higher than
unsteered's and perplexity at most +10 %) and reported on half B.

    python bench/generation.py --profile profiles/helpful.safetensors --set alpaca_helpful \\
        --strengths 0.5 1 2 --out docs/bench-generation-helpful.json

Replies come from the server's own engine (the transformers backend, in process, batched, greedy; with
`--samples K` also K seeded sampled sets), so they are what a request gets: each profile steers in its own position
mode and, where `--repetition-penalty` is not given, with its decoding defaults (`Profile.decoding`), as for a
request that sets none; a profile's condition is not read (it steers every prompt) unless `--honour-conditions`.
The grid is `--strengths` plus the file's default strength (`geneval.GenRow.of_profile`);
prompts: each dev prompt once (`genmetrics.unique_prompts`). Only the replies are made here; every number is
`geneval.score_replies`', as in `rahf eval --generation`, whose replies come from `model.generate` instead.

The profile carries its result (`--annotate`): a copy of the profile file with the section
`provenance.generation` (`steering_vectors.core.generation_record`: set, judge and its sha256, prompts of each
half, the chosen strength and, per strength on half B, win rate [95 % CI], loop and refusal rates, perplexity,
beside the unsteered row); the tensors are unchanged (so is the steering), the file's digest is new. From a
fresh run, or from the JSON of an earlier one (no model loaded):

    python bench/generation.py --profile profiles/harmless.safetensors --set hh_harmless --strengths 0.25 0.5 1 \\
        --out docs/bench-generation-harmless.json --annotate profiles/harmless.safetensors
    python bench/generation.py --profile profiles/helpful.safetensors \\
        --from-json docs/bench-generation-helpful.json --annotate profiles/helpful.safetensors

`--annotate` may name the profile itself (rewritten in place, atomically). With `--adopt-strength` the file's
default strength becomes the one half A chose (as AxBench chooses it), recorded with the one it replaced in
`provenance.default_strength_choice`; a choice of 0 leaves the default as it is. `--from-json` checks that the JSON
measured this profile: its row has the profile's name and method, and, in files written since the section
exists, the same tensors (`tensors_sha256`).

The JSON (`--out`) is `score_replies`' result (`prompts`, `half_a`, `half_b`, `judge`, `settings`,
`unsteered`, `rows` with one row named after the profile: `method`, `chosen_strength`, `file_default`,
`unsteered_half_a`, `strengths` keyed "0.5", "1", ... each with `half_a`, `half_b`, `all`, `examples`) plus
`profile`, `set`, `replies` ("engine"), `repetition_penalty` (every request's; null: they set none),
`profile_decoding` (the profile's decoding defaults the steered requests took: {} when `--repetition-penalty` set
it), `conditions` ("ignored" or "honoured"), `judge_sha256`, `tensors_sha256`, `cpu` and `seconds`; files
without `profile_decoding` and `conditions` set the penalty on every request and ignored conditions.
Files written before (docs/bench-generation-{helpful,helpful-pref,harmless,harmless-pref}.json, by
d1d4c00) have the older layout that tabulated here: `strengths` keyed "0.0", "0.5", ... (the unsteered row
among them), `chosen_strength`, `method`, `profile_default_strength` and `max_tokens` at the top, examples
apart; the same numbers. `--from-json` reads both; for an old file the judge's sha256 is that of the file of
that name in `--judges` (profiles/judges has not changed since those runs).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steering_vectors.core.profile import Profile  # noqa: E402
from steering_vectors.training import geneval  # noqa: E402
from steering_vectors.training.genmetrics import Prompt  # noqa: E402
from steering_vectors.training.pipeline import file_sha256  # noqa: E402


def engine_generate(backend: Any, *, max_new_tokens: int, repetition_penalty: float | None = 1.0,
                    honour_conditions: bool = False, settings: geneval.GenSettings | None = None) -> geneval.Generate:
    """Replies from `backend`'s engine (started), all prompts of a call batched as the engine batches concurrent
    requests, each profile in its position mode: greedy, or sampled with a seed (`settings`' temperature and top_p;
    every prompt's request takes that seed). No system messages.
    `repetition_penalty` None: the requests set none, as a client that leaves it out: a profile's decoding default
    applies on the rows it steers (`Profile.decoding`), the unsteered rows get 1 (off); a number: every row's.
    `honour_conditions`: a profile with a condition steers only the prompts its condition fires on, as a request
    naming it gets (bench/composition.py); otherwise every profile steers every prompt."""
    from server.backends.base import GenerationRequest, SamplingParams
    from steering_vectors.core.hooks import RowSteering
    from steering_vectors.training.conditions import render_prompt

    engine, tokenizer = backend.engine, backend.tokenizer
    settings = settings or geneval.GenSettings(max_new_tokens=max_new_tokens)
    greedy = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=backend.stop_token_ids,
                            repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty)  # fmt: skip
    open_sampling = frozenset({"repetition_penalty"} if repetition_penalty is None else ())
    calls = 0

    async def one(rid: str, prompt: list[int], params: SamplingParams, steering: RowSteering | None) -> list[int]:
        out: list[int] = []
        request = GenerationRequest(rid, prompt, params, steering=steering, open_sampling=open_sampling)
        async for event in engine.generate(request):
            out += event.token_ids
        return out

    def generate(prompts: Sequence[Prompt], entries: list[tuple[Profile, float]], system: str | None,
                 seed: int | None) -> list[str]:  # fmt: skip
        nonlocal calls
        if system is not None:
            raise ValueError("the engine bench makes replies to the dev prompts without a system message")
        params = greedy if seed is None else dataclasses.replace(
            greedy, temperature=settings.temperature, top_p=settings.top_p, seed=seed)
        calls += 1
        gated = [(p, w) for p, w in entries if honour_conditions and p.condition is not None]
        always = [(p, w) for p, w in entries if not (honour_conditions and p.condition is not None)]
        steering = (RowSteering.from_profiles(always, model=backend.fingerprint, conditional=gated)
                    if entries else None)  # fmt: skip
        ids = [render_prompt(tokenizer, list(p)) for p in prompts]

        async def every() -> list[list[int]]:
            return await asyncio.gather(*(one(f"g{calls}-{i}", p, params, steering) for i, p in enumerate(ids)))

        return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in asyncio.run(every())]

    return generate


def measure(
    backend: Any, profile: Profile, prompts: Sequence[Prompt], strengths: Sequence[float], judge_file: Path, *,
    max_new_tokens: int = 96, repetition_penalty: float | None = 1.0, samples: int = 0,
    honour_conditions: bool = False, log: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """`geneval.score_replies`' result for one profile, its replies made by `backend`'s engine (`engine_generate`:
    `repetition_penalty` None leaves it to the profile's decoding default); `samples` seeded sampled sets beside the
    greedy one."""
    from steering_vectors.training.judge import load_judge

    settings = geneval.GenSettings(max_new_tokens=max_new_tokens, samples=samples)
    rows = [geneval.GenRow.of_profile(profile, strengths)]
    # 1. replies at every strength, from the engine
    backend.engine.start()
    try:
        generate = engine_generate(backend, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty,
                                   honour_conditions=honour_conditions, settings=settings)  # fmt: skip
        replies = geneval.collect_replies(prompts, rows, generate, settings, log=log)
    finally:
        backend.engine.shutdown(10)
    # 2. scored by the library; the engine has stopped, so no steering is active for the judge and the perplexity
    judge = load_judge(judge_file, backend.model, backend.tokenizer)
    return geneval.score_replies(backend.model, backend.tokenizer, prompts, rows, replies, judge, settings,
                                 judge_name=judge_file.name)  # fmt: skip


def library_layout(report: dict[str, Any]) -> dict[str, Any]:
    """`report` in `score_replies`' layout: as it is when written since that layout, else converted from the
    layout of the files written before (see the module docstring); the numbers are not touched."""
    if "rows" in report:
        return report
    by_strength = {float(s): entry for s, entry in report["strengths"].items()}
    base = by_strength.pop(0.0)
    return {
        "prompts": report["prompts"], "half_a": report["half_a"], "half_b": report["half_b"], "judge": report["judge"],
        "settings": {"max_new_tokens": report["max_tokens"], "samples": 0},
        "unsteered": {"half_b": base["half_b"], "all": base["all"], "examples": report["examples"]["0.0"]},
        "rows": {Path(report["profile"]).stem: {
            "method": report["method"], "system": None, "chosen_strength": report["chosen_strength"],
            "file_default": report["profile_default_strength"], "unsteered_half_a": base["half_a"],
            "strengths": {f"{s:g}": {**entry, "examples": report["examples"][str(s)]}
                          for s, entry in by_strength.items()},
        }},
        **{key: report[key] for key in ("profile", "set", "repetition_penalty", "cpu", "seconds")},
    }  # fmt: skip


def annotate(profile_path: Path, report: dict[str, Any], out: Path, *, judges: Path, source: str = "",
             adopt: bool = False) -> Profile:  # fmt: skip
    """Write `profile_path`'s profile to `out` with `report`'s result (either layout) as its generation section;
    refuse a report of another profile. `adopt`: the file's default strength becomes the strength half A chose
    (recorded in `provenance.default_strength_choice` with the one it replaces), unless half A chose 0 (no
    steered strength kept loops and perplexity within bounds): then the default stays, and this says so."""
    profile = Profile.load(profile_path)
    result = library_layout(report)
    row = result["rows"].get(profile.name)
    if row is None or row["method"] != profile.method:
        raise SystemExit(f"{source or 'the report'} measured {sorted(result['rows'])}, not {profile.name} "
                         f"({profile.method})")
    if report.get("tensors_sha256", profile.tensor_digest()) != profile.tensor_digest():
        raise SystemExit(f"{source or 'the report'} measured other tensors than {profile_path}'s")
    judge_sha256 = report.get("judge_sha256") or file_sha256(judges / result["judge"])
    record = geneval.generation_record(result, profile.name, data_set=result["set"], replies="engine",
                                       judge_sha256=judge_sha256, source=source,
                                       decoding=report.get("profile_decoding") or {},
                                       conditions=report.get("conditions", "ignored"))  # fmt: skip
    annotated = profile.with_generation(record)
    chosen = record.chosen_strength
    if adopt and chosen > 0:
        annotated.provenance["default_strength_choice"] = {
            "how": f"generation on {result['set']} dev half A ({result['half_a']} prompts, greedy, "
                   f"{result['settings']['max_new_tokens']} tokens, judge {result['judge']}): best win rate against "
                   "unsteered with loop rate no higher than unsteered's and perplexity at most +10 % "
                   "(bench/generation.py --adopt-strength)",
            "strength": chosen, "replaced": profile.default_strength, "source": source,
        }  # fmt: skip
        annotated.default_strength = chosen
    elif adopt:
        print(f"half A chose strength 0 for {profile.name}: its default stays {profile.default_strength:g}",
              file=sys.stderr)
    annotated.save(out)
    return annotated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--set", choices=["alpaca_helpful", "hh_harmless"], default=None,
                        help="the dev prompts and the judge of this preference set (a fresh run needs it)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                        help="steered strengths (the unsteered model, strength 0, is always run)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="every request's (steered and unsteered); default: the requests set none, as a client "
                             "that leaves it out: a profile's decoding default (Profile.decoding) applies where it "
                             "steers, 1 (off) elsewhere")
    parser.add_argument("--samples", type=int, default=0,
                        help="seeded sampled reply sets beside the greedy one (temperature 0.7, top_p 0.9; scored "
                             "against the unsteered replies of the same seed, on half B and on all prompts)")
    parser.add_argument("--honour-conditions", action="store_true",
                        help="a profile with a condition steers only the prompts it fires on, as a request naming "
                             "it gets (default: it steers every prompt)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many dev prompts (the first ones)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--judges", type=Path, default=ROOT / "profiles" / "judges")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON result")
    parser.add_argument("--annotate", type=Path, default=None, metavar="PROFILE_OUT",
                        help="write the profile with its result as provenance.generation here (may be --profile)")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="with --annotate: take the result from this earlier --out file instead of a run")
    parser.add_argument("--adopt-strength", action="store_true",
                        help="with --annotate: make the strength chosen on half A the file's default strength")
    args = parser.parse_args()

    if args.adopt_strength and args.annotate is None:
        parser.error("--adopt-strength goes with --annotate")
    if args.from_json is not None:
        if args.annotate is None:
            parser.error("--from-json goes with --annotate")
        report = json.loads(args.from_json.read_text())
        annotated = annotate(args.profile, report, args.annotate, judges=args.judges, source=str(args.from_json),
                             adopt=args.adopt_strength)  # fmt: skip
        _say_annotated(annotated, args.annotate)
        return
    if args.set is None:
        parser.error("a run needs --set (or annotate from an earlier result with --from-json)")

    from server.backends.transformers import create
    from server.config import Settings
    from steering_vectors.training.data import load_pairs
    from steering_vectors.training.genmetrics import unique_prompts
    from steering_vectors.training.judge_build import cpu_name, kept_judge_file

    started = time.perf_counter()
    backend = create(Settings(max_batch_size=args.batch, max_queue=1024))
    profile = Profile.load(args.profile).validate_for(backend.fingerprint)
    prompts = unique_prompts(load_pairs(ROOT.parent / "shared" / "data" / args.set / "dev.jsonl"))
    prompts = prompts[: args.limit] if args.limit else prompts
    judge_file = kept_judge_file(args.judges, args.set)
    result = measure(backend, profile, prompts, args.strengths, judge_file, max_new_tokens=args.max_tokens,
                     repetition_penalty=args.repetition_penalty, samples=args.samples,
                     honour_conditions=args.honour_conditions, log=lambda line: print(line, file=sys.stderr))
    report = {**result, "profile": str(args.profile), "set": args.set, "replies": "engine",
              "repetition_penalty": args.repetition_penalty,
              "profile_decoding": profile.decoding if args.repetition_penalty is None else {},
              "conditions": "honoured" if args.honour_conditions else "ignored",
              "judge_sha256": file_sha256(judge_file),
              "tensors_sha256": profile.tensor_digest(), "cpu": cpu_name(),
              "seconds": time.perf_counter() - started}  # fmt: skip
    print("\n".join(geneval.generation_lines(result)))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.annotate:
        annotated = annotate(args.profile, report, args.annotate, judges=args.judges,
                             source=str(args.out) if args.out else "", adopt=args.adopt_strength)  # fmt: skip
        _say_annotated(annotated, args.annotate)


def _say_annotated(profile: Profile, path: Path) -> None:
    record = profile.generation
    assert record is not None
    chosen = next((row for row in record.strengths if row.strength == record.chosen_strength), None)
    where = f"win rate {chosen.win_rate:.1%} on half B" if chosen and chosen.win_rate is not None else "unsteered"
    print(f"wrote {path}: generation on {record.data_set}, chosen strength {record.chosen_strength:g} ({where})",
          file=sys.stderr)


if __name__ == "__main__":
    main()
