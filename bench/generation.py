"""Profiles judged by their replies: greedy replies to a set's dev prompts at several strengths, scored by the
set's generation judge (profiles/judges, docs/judge.md) against the unsteered replies, with loop rate,
distinct-2, length, refusal rate and the replies' perplexity under the unsteered model; the default strength
chosen on half A of the dev prompts (`genmetrics.choose_strength_half_split`: best win rate with loop rate no
higher than unsteered's and perplexity at most +10 %) and reported on half B.

    python bench/generation.py --profile profiles/helpful.safetensors --set alpaca_helpful \\
        --strengths 0.5 1 2 --out docs/bench-generation-helpful.json

Replies come from the server's own engine (the transformers backend, in process, batched, greedy), so they are
what a request gets; each profile steers in its own position mode. Prompts: each dev prompt once
(`genmetrics.unique_prompts`). The judge, the loop detector (a token 4-gram three times) and the refusal phrases
are the library's (`steering_vectors.training.judge`, `evaluate.loops`, `genmetrics.REFUSAL`).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--set", choices=["alpaca_helpful", "hh_harmless"], required=True,
                        help="the dev prompts and the judge of this preference set")
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                        help="steered strengths (the unsteered model, strength 0, is always run)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--limit", type=int, default=None, help="at most this many dev prompts (the first ones)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--judges", type=Path, default=ROOT / "profiles" / "judges")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from server.backends.base import GenerationRequest, SamplingParams
    from server.backends.transformers import create
    from server.config import Settings
    from steering_vectors.core.hooks import RowSteering
    from steering_vectors.core.profile import Profile
    from steering_vectors.training import genmetrics as gm
    from steering_vectors.training.conditions import render_prompt
    from steering_vectors.training.data import load_pairs
    from steering_vectors.training.evaluate import loops
    from steering_vectors.training.judge import load_judge
    from steering_vectors.training.judge_build import cpu_name, kept_judge_file

    started = time.perf_counter()
    backend = create(Settings(max_batch_size=args.batch, max_queue=1024))
    engine, tokenizer = backend.engine, backend.tokenizer
    profile = Profile.load(args.profile).validate_for(backend.fingerprint)
    prompts = gm.unique_prompts(load_pairs(ROOT.parent / "shared" / "data" / args.set / "dev.jsonl"))
    prompts = prompts[: args.limit] if args.limit else prompts
    ids = [render_prompt(tokenizer, list(p)) for p in prompts]
    stop = backend.stop_token_ids

    async def one(rid: str, prompt: list[int], steering: RowSteering | None) -> list[int]:
        out: list[int] = []
        params = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.0, stop_token_ids=stop,
                                repetition_penalty=args.repetition_penalty)
        async for event in engine.generate(GenerationRequest(rid, prompt, params, steering=steering)):
            out += event.token_ids
        return out

    async def replies_at(strength: float) -> list[str]:
        fp = backend.fingerprint
        steering = None if strength == 0 else RowSteering.from_profiles([(profile, strength)], model=fp)
        tokens = await asyncio.gather(*(one(f"g{strength}-{i}", p, steering) for i, p in enumerate(ids)))
        return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens]

    # 1. replies at every strength, from the engine
    engine.start()
    strengths = [0.0, *sorted({s for s in args.strengths if s != 0})]
    replies: dict[float, list[str]] = {}
    for strength in strengths:
        t0 = time.perf_counter()
        replies[strength] = asyncio.run(replies_at(strength))
        print(f"strength {strength:g}: {len(prompts)} replies in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    engine.shutdown(10)

    # 2. judge rewards, loops and perplexity under the unsteered model (the engine has stopped: no steering)
    judge_file = kept_judge_file(args.judges, args.set)
    judge = load_judge(judge_file, backend.model, tokenizer)
    rewards = {s: judge.score(list(prompts), r).tolist() for s, r in replies.items()}
    rows: dict[float, gm.GenerationRows] = {}
    for strength, texts in replies.items():
        same = [a == b for a, b in zip(texts, replies[0.0], strict=True)]
        rows[strength] = gm.GenerationRows(
            score=gm.win_outcomes(rewards[strength], rewards[0.0], same=same, tie=1e-4),
            looped=[loops(t) for t in gm.reply_tokens(tokenizer, texts)],
            nll=gm.reply_nll(backend.model, tokenizer, list(prompts), texts),
        )

    # 3. the strength chosen on half A, reported on half B (and the whole dev set beside it)
    choice = gm.choose_strength_half_split(list(prompts), rows)
    halves = [gm.dev_half(p) for p in prompts]
    in_b = [h == "b" for h in halves]
    table = {}
    for strength in strengths:
        texts = replies[strength]
        same = [a == b for a, b in zip(texts, replies[0.0], strict=True)]
        pick = [i for i, keep in enumerate(in_b) if keep]
        table[strength] = {
            "half_a": choice.half_a[strength],
            "half_b": {**choice.half_b[strength], **gm.reply_metrics(tokenizer, [texts[i] for i in pick]),
                       "win": gm.win_rate_from_scores([rewards[strength][i] for i in pick],
                                                      [rewards[0.0][i] for i in pick],
                                                      same=[same[i] for i in pick], tie=1e-4)},
            "all": {**gm.reply_metrics(tokenizer, texts), "perplexity": gm.pooled_perplexity(rows[strength].nll),
                    "win": gm.win_rate_from_scores(rewards[strength], rewards[0.0], same=same, tie=1e-4)},
        }
    report = {
        "profile": str(args.profile), "method": profile.method, "set": args.set, "judge": str(judge_file.name),
        "prompts": len(prompts), "half_a": halves.count("a"), "half_b": halves.count("b"),
        "max_tokens": args.max_tokens, "repetition_penalty": args.repetition_penalty, "chosen_strength":
        choice.strength, "profile_default_strength": profile.default_strength, "strengths": table,
        "examples": {str(s): replies[s][:3] for s in strengths}, "cpu": cpu_name(),
        "seconds": time.perf_counter() - started,
    }
    print(_markdown(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


def _markdown(report: dict) -> str:
    lines = [f"{report['profile']} ({report['method']}) on {report['set']} dev, {report['prompts']} prompts "
             f"(half A {report['half_a']}, half B {report['half_b']}); judge {report['judge']}; chosen on half A: "
             f"strength {report['chosen_strength']:g} (file default {report['profile_default_strength']:g})",
             "", "| strength | win rate vs unsteered, half B [95 % CI] | loops | distinct-2 | length | refusals | "
             "perplexity | half A: win / loops / ppl / meets |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for strength, row in report["strengths"].items():
        b, a, win = row["half_b"], row["half_a"], row["half_b"]["win"]
        lines.append(f"| {strength:g} | {win['win_rate']:.1%} [{win['low']:.1%}, {win['high']:.1%}] | "
                     f"{b['loop_rate']:.1%} | {b['distinct_2']:.3f} | {b['length']:.0f} | {b['refusal_rate']:.1%} | "
                     f"{b['perplexity']:.2f} | {a['score']:.1%} / {a['loop_rate']:.1%} / {a['perplexity']:.2f} / "
                     f"{'yes' if a['meets'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
