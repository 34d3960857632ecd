"""Loops under steering, and whether the server's sampling penalties stop them.

A strong profile can make greedy replies loop on one sentence; likelihood metrics do not see that. This
script starts `rahf serve` on the shipped profiles, asks each prompt once per (profile, strength, penalty)
setting with greedy decoding through the OpenAI API (as a client would), and reports for each setting the
share of repeated token 4-grams in the replies (`evaluate.repeated_ngram_share`, pooled over the prompts),
how many replies have a 4-gram repeated three or more times, and the replies themselves (markdown), so that a
reader can see whether a penalty that stops a loop also changes what the profile does.

    python bench/repetition.py                                    # harmless at 1 and 0.5, four penalty settings
    python bench/repetition.py --steer harmless@1 helpful@1 --penalties none rep1.2 freq0.5 --max-tokens 96

Prompts: the six of `rahf eval`'s report, a lock-picking request, and the first `--dev-prompts` single-turn
prompts of `--data`'s dev split. Output: `--out` (default bench/results/repetition/) report.md + report.json.

    python bench/repetition.py --sampler-cost                     # what the penalty costs the sampler per step
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import Server, free_port  # noqa: E402  (the bench folder's server launcher)

ROOT = Path(__file__).resolve().parents[1]
EXTRA_PROMPTS = ("How do I pick a lock?",)


def parse_penalty(text: str) -> dict[str, float]:
    """`none`, `repN` (repetition_penalty N), `freqN` (frequency_penalty N), `presN` (presence_penalty N)."""
    if text == "none":
        return {}
    for prefix, key in (("rep", "repetition_penalty"), ("freq", "frequency_penalty"), ("pres", "presence_penalty")):
        if text.startswith(prefix):
            return {key: float(text[len(prefix) :])}
    raise argparse.ArgumentTypeError(f"penalty {text!r}: use none, repN, freqN or presN")


def parse_steer(text: str) -> tuple[str, float] | None:
    """`none` or `PROFILE@STRENGTH`."""
    if text == "none":
        return None
    name, _, strength = text.partition("@")
    return name, float(strength or 1.0)


def dev_prompts(data: Path, count: int) -> list[str]:
    """The first `count` single-turn user prompts of the dev split (conversational rows)."""
    prompts: list[str] = []
    path = data / "dev.jsonl"
    if count <= 0 or not path.exists():
        return prompts
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        turns = row.get("prompt")
        if isinstance(turns, list) and len(turns) == 1 and turns[0].get("role") == "user":
            prompts.append(turns[0]["content"])
        elif isinstance(turns, str):
            prompts.append(turns)
        if len(prompts) == count:
            break
    return prompts


def ask(
    client: httpx.Client, url: str, model: str, prompt: str, steer: tuple[str, float] | None, penalty: dict,
    max_tokens: int,
) -> str:  # fmt: skip
    messages = [{"role": "user", "content": prompt}]
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, **penalty}
    if steer is not None:
        body["steering"] = {"profile": steer[0], "strength": steer[1]}
    response = client.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    if response.status_code != 200:
        raise SystemExit(f"{response.status_code} for {body}: {response.text}")
    return response.json()["choices"][0]["message"]["content"]


def sampler_cost(rows: int = 8, rounds: int = 200) -> None:
    """What a repetition penalty costs the sampler, side by side: plain greedy rows take one batched argmax,
    penalised rows the per-row path (default model's vocabulary, 60 prompt + 100 generated tokens a row)."""
    import torch

    from server.backends.base import SamplingParams
    from server.backends.sampling import select_tokens
    from steering_vectors.training.compare import cpu_name

    generator = torch.Generator().manual_seed(0)
    vocab = 49152
    logits = torch.randn(rows, vocab, generator=generator)
    prompts = [torch.randint(0, vocab, (60,), generator=generator).tolist() for _ in range(rows)]
    outputs = [torch.randint(0, vocab, (100,), generator=generator).tolist() for _ in range(rows)]
    settings = {"greedy": 1.0, "greedy, repetition_penalty 1.15": 1.15}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(rounds):  # interleaved, so drift hits both alike
        for name, penalty in settings.items():
            params = [SamplingParams(max_new_tokens=1, temperature=0.0, repetition_penalty=penalty)] * rows
            started = time.perf_counter()
            select_tokens(logits, params, [None] * rows, outputs, prompts)
            times[name].append(time.perf_counter() - started)
    medians = {name: sorted(t)[len(t) // 2] * 1e3 for name, t in times.items()}
    print(f"sampler, {rows} rows, {cpu_name()}:")
    for name, ms in medians.items():
        print(f"  {name}: {ms:.3f} ms per step (median of {rounds})")
    penalised, plain = medians["greedy, repetition_penalty 1.15"], medians["greedy"]
    print(f"  ratio {penalised / plain:.2f}x, {penalised - plain:.3f} ms more per step")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steer", nargs="+", default=["none", "harmless@1", "harmless@0.5"], help="settings: none or PROFILE@STRENGTH"
    )
    parser.add_argument(
        "--penalties",
        nargs="+",
        type=parse_penalty,
        default=None,
        help="none, repN, freqN, presN (default: none rep1.15 rep1.3 freq0.5)",
    )
    parser.add_argument("--profile-dir", type=Path, default=ROOT / "profiles")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hh_harmless")
    parser.add_argument("--dev-prompts", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the server (0: its default)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "repetition")
    parser.add_argument(
        "--sampler-cost", action="store_true", help="only time the sampler with and without the penalty (no server)"
    )
    args = parser.parse_args(argv)
    if args.sampler_cost:
        sampler_cost()
        return 0
    penalties = args.penalties or [parse_penalty(p) for p in ("none", "rep1.15", "rep1.3", "freq0.5")]
    steers = [parse_steer(s) for s in args.steer]

    from transformers import AutoTokenizer

    from steering_vectors.core.models import ensure_embedded_cache
    from steering_vectors.training.evaluate import GENERATION_PROMPTS, reply_repetition

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_cache()[0])
    prompts = [*GENERATION_PROMPTS, *EXTRA_PROMPTS, *dev_prompts(args.data, args.dev_prompts)]
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    rahf = str(Path(sys.executable).with_name("rahf"))
    env = {"RAHF_LOG_JSON": "false", **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    with tempfile.TemporaryDirectory() as work:
        server = Server("rahf", [rahf, "serve", "--port", str(port), "--profile-dir", str(args.profile_dir),
                                 "--read-only-profiles", "--no-profile-watch", "--log-level", "warning",
                                 "--max-tokens-limit", str(max(args.max_tokens, 16)),
                                 "--default-repetition-penalty", "1"],  # "none" means none
                        f"http://127.0.0.1:{port}/readyz", Path(work), env)  # fmt: skip
        try:
            server.wait_ready(600)
            url = f"http://127.0.0.1:{port}"
            results = []
            with httpx.Client() as client:
                model = client.get(f"{url}/v1/models").json()["data"][0]["id"]
                for steer in steers:
                    for penalty in penalties:
                        started = time.perf_counter()
                        replies = [ask(client, url, model, p, steer, penalty, args.max_tokens) for p in prompts]
                        share, looping = reply_repetition(tokenizer, replies)
                        result = {
                            "steer": "none" if steer is None else f"{steer[0]}@{steer[1]:g}",
                            "penalty": penalty or {},
                            "repeated_4gram_share": share,
                            "looping_replies": looping,
                            "replies": replies,
                            "seconds": time.perf_counter() - started,
                        }
                        results.append(result)
                        print(f"{result['steer']:>16} {json.dumps(result['penalty']):>32}  rep4 {share:.3f}  "
                              f"looping {looping}/{len(prompts)}  ({result['seconds']:.0f} s)", flush=True)  # fmt: skip
        finally:
            server.stop()
    write_report(args, prompts, results)
    return 0


def write_report(args: argparse.Namespace, prompts: list[str], results: list[dict]) -> None:
    from steering_vectors.training.compare import cpu_name

    (args.out / "report.json").write_text(
        json.dumps(
            {
                "prompts": prompts,
                "max_tokens": args.max_tokens,
                "cpu": cpu_name().split(",")[0],
                "server_threads": args.threads or None,
                "results": results,
            },
            indent=2,
        )  # fmt: skip
    )
    label = lambda r: f"{r['steer']}, " + (", ".join(f"{k} {v:g}" for k, v in r["penalty"].items()) or "no penalty")  # noqa: E731
    lines = [
        "# Loops under steering, with and without sampling penalties",
        "",
        f"Greedy replies (temperature 0, up to {args.max_tokens} tokens) through `rahf serve` (its defaults; "
        f"server threads: {args.threads or 'default'}) on {cpu_name().split(',')[0]};",
        f"{len(prompts)} prompts. `rep4`: share of the replies' token 4-grams that repeat an earlier one of the same",
        "reply (pooled); `looping`: replies with a 4-gram three or more times.",
        f"Command: `python bench/repetition.py {' '.join(sys.argv[1:])}`".rstrip() + "",
        "",
        "| setting | rep4 | looping |",
        "| --- | --- | --- |",
        *(f"| {label(r)} | {r['repeated_4gram_share']:.3f} | {r['looping_replies']}/{len(prompts)} |" for r in results),
        "",
        "## Replies",
    ]
    for i, prompt in enumerate(prompts):
        lines += ["", f"### {prompt}", ""]
        for r in results:
            reply = " ".join(r["replies"][i].split())
            lines.append(f"- **{label(r)}**: {reply}")
    (args.out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"report: {args.out / 'report.md'}")


if __name__ == "__main__":
    raise SystemExit(main())
