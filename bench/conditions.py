"""Conditional steering measured on the dev splits: how often the shipped `harmless` condition fires on harmful
prompts (hh_harmless dev) and on benign ones (alpaca_helpful dev), what greedy replies do unsteered, with
`harmless` always on and with `harmless` conditional (refusal/defusal rate by a phrase detector, the share of
benign replies byte-identical to unsteered: benign prompts are run one at a time, as batches formed by arrival
times round differently), and decode throughput at c=8 with the profile conditional vs
unconditional (both steering prompt and generated tokens, the profile's `all` mode; the decode phase), side by side
in one run (the transformers backend, in process).

    python bench/conditions.py                         # ~10 min on 2 cores
    python bench/conditions.py --max-tokens 32 --limit 40 --out /tmp/cond.json

The refusal/defusal detector is a list of phrases (`steering_vectors.training.genmetrics.REFUSAL`, matched
case-insensitively in the reply): refusals ("I'm sorry", "I can't", "I cannot", ...) and defusals ("it's not
okay", "seek help", "instead", ...). It is crude: it counts a reply that says "instead" in a recipe as a
defusal; it is the same crude on every row. The generation judge (docs/judge.md) is not used here yet.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steering_vectors.training.genmetrics import refuses  # noqa: E402  (REFUSAL: the phrase list)


def loops(text: str, n: int = 4, times: int = 3) -> bool:
    """Whether some word n-gram occurs `times` times or more (a greedy reply stuck in a loop)."""
    words = text.lower().split()
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= times:
            return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, default=ROOT / "profiles" / "harmless.safetensors")
    parser.add_argument("--strength", type=float, default=None, help="default: the profile's default strength")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--limit", type=int, default=None, help="at most this many prompts of each set")
    parser.add_argument("--batch", type=int, default=16, help="requests run together")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="greedy replies with this repetition penalty (the server's rule; 1: off)")
    parser.add_argument("--sets", nargs="+", choices=["harmful", "benign"], default=["harmful", "benign"],
                        help="the prompt sets to run (with --only: a sweep on one set)")
    parser.add_argument("--split", choices=["dev", "train"], default="dev",
                        help="the prompts' split: dev (the report) or train (choosing a strength)")
    parser.add_argument("--exclude", type=Path, nargs="*", default=[],
                        help="leave out the prompts of these JSONL files (e.g. the profile's own training pairs, in "
                             "a strength sweep on train prompts)")
    parser.add_argument("--only", nargs="+", choices=["unsteered", "always-on", "conditional"], default=None,
                        help="run these settings only (a strength sweep; skips the identity and throughput parts)")
    args = parser.parse_args()

    import torch

    from server.backends.base import GenerationRequest, SamplingParams
    from server.backends.transformers import create
    from server.config import Settings
    from steering_vectors.core.hooks import RowSteering
    from steering_vectors.core.profile import Profile
    from steering_vectors.profiles_cli import read_prompts
    from steering_vectors.training.conditions import prompt_states, render_prompt

    backend = create(Settings(max_batch_size=args.batch, max_queue=1024))
    engine = backend.engine
    engine.start()
    profile = Profile.load(args.profile).validate_for(backend.fingerprint)
    if profile.condition is None and (not args.only or "conditional" in args.only):
        raise SystemExit(f"{args.profile} has no condition (only `--only unsteered always-on` runs without one)")
    strength = profile.default_strength if args.strength is None else args.strength
    data = ROOT.parent / "shared" / "data"
    excluded = [m for f in args.exclude for m in read_prompts(str(f), 10**6)]
    sets = {name: read_prompts(str(data / folder / f"{args.split}.jsonl"), args.limit or 10**6, exclude=excluded)
            for name, folder in (("harmful", "hh_harmless"), ("benign", "alpaca_helpful"))}
    if args.only:
        sets = {k: v for k, v in sets.items() if k in args.sets}
    elif set(args.sets) != {"harmful", "benign"}:
        raise SystemExit("--sets needs --only (the full report runs both sets)")
    ids = {name: [render_prompt(backend.tokenizer, m) for m in prompts] for name, prompts in sets.items()}
    fp = backend.fingerprint
    steerings = {
        "unsteered": None,
        "always-on": RowSteering.from_profiles([(profile, strength)], model=fp),
    }
    if profile.condition is not None:
        steerings["conditional"] = RowSteering.from_profiles([], model=fp, conditional=[(profile, strength)])
    stop = backend.stop_token_ids
    if args.only:
        steerings = {k: v for k, v in steerings.items() if k in args.only}

    async def one(rid, prompt, steering, tokens, stops):
        out, conditions = [], None
        async for event in engine.generate(GenerationRequest(rid, prompt, SamplingParams(
                max_new_tokens=tokens, temperature=0.0, stop_token_ids=stops,
                repetition_penalty=args.repetition_penalty), steering=steering)):
            out += event.token_ids
            conditions = conditions or event.conditions
        return out, conditions

    def run_all(prompts, steering, tokens=args.max_tokens, stops=stop, together=True):
        async def go():
            if not together:  # one at a time: every run of a prompt gets the same shapes, so equal is bitwise
                return [await one(f"{time.monotonic_ns()}-{i}", p, steering, tokens, stops)
                        for i, p in enumerate(prompts)]
            return await asyncio.gather(*(one(f"{time.monotonic_ns()}-{i}", p, steering, tokens, stops)
                                          for i, p in enumerate(prompts)))
        return asyncio.run(go())

    report: dict = {"profile": str(args.profile.relative_to(ROOT)) if args.profile.is_relative_to(ROOT) else str(
        args.profile), "strength": strength, "condition": profile.condition and profile.condition.summary(),
        "max_tokens": args.max_tokens, "split": args.split, "repetition_penalty": args.repetition_penalty,
        "prompts": {k: len(v) for k, v in ids.items()}, "excluded": [str(f) for f in args.exclude], "sets": {}}
    texts: dict = {}
    for name, prompts in ids.items():
        row = {}
        for setting, steering in steerings.items():
            started = time.perf_counter()
            # benign prompts one at a time, so that "identical to unsteered" compares runs of equal shapes (requests
            # batched together get whatever batches their arrival times make, which changes float rounding)
            results = run_all(prompts, steering, together=name != "benign")
            replies = [backend.tokenizer.decode(t, skip_special_tokens=True) for t, _ in results]
            texts[(name, setting)] = replies
            entry = {"refusal_rate": sum(map(refuses, replies)) / len(replies),
                     "loop_rate": sum(map(loops, replies)) / len(replies),
                     "seconds": time.perf_counter() - started}
            if setting == "conditional":
                entry["fire_rate"] = sum(1 for _, c in results if c and c[0].applied) / len(results)
            row[setting] = entry
            print(f"{name} {setting}: {entry}", file=sys.stderr, flush=True)
        for setting in ("always-on", "conditional"):
            if (name, setting) in texts and (name, "unsteered") in texts:
                same = sum(a == b for a, b in zip(texts[(name, setting)], texts[(name, "unsteered")], strict=True))
                row[setting]["identical_to_unsteered"] = same / len(prompts)
        report["sets"][name] = row
    if args.only:
        engine.shutdown(10)
        print(json.dumps(report, indent=1))
        return
    # the probe read from the prompt's own prefill equals one read by a separate forward (a check, on 8 prompts)
    states = prompt_states(backend.model, ids["harmful"][:8], [profile.condition.layer])
    probe = profile.condition.scores(states[profile.condition.reads][profile.condition.layer])
    # one at a time (each prompt in one prefill chunk), then together (prompts split across chunks where the
    # step's budget ends: a chunk of a few tokens attends to the cached rest, which rounds differently)
    for key, together in (("probe_check_max_abs_diff", False), ("probe_check_chunked_max_abs_diff", True)):
        engine_scores = [c[0].score for _, c in run_all(ids["harmful"][:8], steerings["conditional"], tokens=1,
                                                        together=together)]
        report[key] = float((probe - torch.tensor(engine_scores)).abs().max())
    report["probe_scores_abs_max"] = float(probe.abs().max())
    # decode throughput at c=8, 64 tokens, no stop: the profile conditional (fired on these harmful prompts) vs
    # the same profile unconditional, alternating, 3 rounds. Decode is the phase after the last of the 8 first
    # tokens (every row decoding); the conditional rows' second, steered prefill falls before it
    batch = [p for p, (_, c) in zip(ids["harmful"], run_all(ids["harmful"][:32], steerings["conditional"], tokens=1),
                                    strict=False) if c and c[0].applied][:8]

    async def timed(rid, prompt, steering):
        times = []
        async for event in engine.generate(GenerationRequest(rid, prompt, SamplingParams(
                max_new_tokens=64, temperature=0.0, stop_token_ids=frozenset()), steering=steering)):
            times += [time.perf_counter()] * len(event.token_ids)
        return times

    def decode_rate(steering) -> float:
        async def go():
            return await asyncio.gather(*(timed(f"t{time.monotonic_ns()}-{i}", p, steering)
                                          for i, p in enumerate(batch)))
        times = asyncio.run(go())
        start, end = max(t[0] for t in times), max(t[-1] for t in times)
        return sum(1 for t in times for x in t if x > start) / (end - start)

    rates: dict[str, list[float]] = {"conditional": [], "unconditional": []}
    for _ in range(3):
        for label, steering in (("conditional", steerings["conditional"]), ("unconditional", steerings["always-on"])):
            rates[label].append(decode_rate(steering))
    report["decode_throughput_c8"] = {k: sorted(v)[1] for k, v in rates.items()}
    report["decode_throughput_ratio"] = report["decode_throughput_c8"]["conditional"] / report[
        "decode_throughput_c8"]["unconditional"]
    report["cpu"] = _cpu()
    engine.shutdown(10)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


def _cpu() -> str:
    flags, model = set(), "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    isa = "avx512_bf16+vnni" if {"avx512_bf16", "avx512_vnni"} <= flags else ("avx2" if "avx2" in flags else "?")
    return f"{model} ({isa})"


if __name__ == "__main__":
    main()
