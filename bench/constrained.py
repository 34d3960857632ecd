"""The per-token cost of constrained decoding (`response_format` json_object, llguidance) on the embedded
default model: the same greedy chat requests with and without `{"type": "json_object"}`, through the
engine `rahf serve` builds (same settings, packed weights, lean decode step), in one run, rounds
interleaved. Every decode step (one token for every row of the batch: forward, masks, selection,
grammar advance) is timed inside the engine, in wall time and in process CPU time (the CPU time is the
figure to read on a shared machine: other processes' load stretches wall time, not the work done).
Prints the CPU (lscpu's model name), the median ms per decode step of each kind and their ratios, and
the grammar's own time per row-token (mask + advance, timed inside the constraint), at each batch size
(every row of a batch constrained, or none).

    nice -n 10 .venv/bin/python bench/constrained.py                  # batches 1 and 4, 3 rounds
    python bench/constrained.py --batch 1 --rounds 5 --max-tokens 96 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.backends import create_backend  # noqa: E402
from server.backends.base import GenerationRequest, SamplingParams, TokenConstraint  # noqa: E402
from server.config import Settings  # noqa: E402
from server.protocol import parse_response_format  # noqa: E402
from server.structured import Grammars  # noqa: E402
from steering_vectors.core.models import load_model  # noqa: E402

PROMPTS = [
    "Describe a cat with its name, age and favourite food.",
    "List three European capitals with their countries.",
    "Give a recipe for pancakes: ingredients and steps.",
    "Summarise the plot of a detective story in a few fields.",
    "Invent a programmer: name, age and the languages they use.",
    "What is the weather like on Mars? Give temperature and wind.",
    "Name two planets and their moons.",
    "Describe a car: brand, colour, year and price.",
]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown (no lscpu)"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


class Timed(TokenConstraint):
    """A constraint that adds the time spent in it (mask and advance) to `clock`."""

    def __init__(self, inner: TokenConstraint, clock: list[float]) -> None:
        self.inner = inner
        self.clock = clock

    def allowed(self) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return self.inner.allowed()
        finally:
            self.clock[0] += time.perf_counter() - start

    def advance(self, token_id: int) -> None:
        start = time.perf_counter()
        try:
            self.inner.advance(token_id)
        finally:
            self.clock[0] += time.perf_counter() - start

    @property
    def done(self) -> bool:
        return self.inner.done


class StepClock:
    """Wraps the engine's decode step: the rows, wall and process CPU seconds of every step while `on`
    (steps are compared between kinds at equal row counts: json rows finish at other steps than plain
    ones, and a step of fewer rows is cheaper)."""

    def __init__(self, engine) -> None:
        self.step = engine._decode_step
        engine._decode_step = self
        self.on = False
        self.steps: list[tuple[int, float, float]] = []  # (rows, wall s, CPU s)

    def __call__(self) -> None:
        rows = len(self.step.__self__._running)
        if not self.on or rows == 0:
            return self.step()
        wall, cpu = time.perf_counter(), time.process_time()
        self.step()
        self.steps.append((rows, time.perf_counter() - wall, time.process_time() - cpu))


async def run_batch(engine, requests: list[GenerationRequest]) -> list[tuple[int, str | None]]:
    """(tokens, finish_reason) of each of the rows run together."""

    async def one(request: GenerationRequest) -> tuple[int, str | None]:
        count, finish = 0, None
        async for event in engine.generate(request):
            count += len(event.token_ids)
            finish = event.finish_reason
        return count, finish

    return await asyncio.gather(*(one(r) for r in requests))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"CPU: {cpu_name()}; torch threads {torch.get_num_threads()}")
    settings = Settings(max_batch_size=max(args.batch))
    backend = create_backend(settings, model=load_model(None, dtype="float32"))
    engine, tokenizer = backend.engine, backend.tokenizer
    print(f"model {backend.model_name}: {backend.info}")
    grammars = Grammars(tokenizer, backend.stop_token_ids)
    fmt = parse_response_format({"type": "json_object"})
    start = time.perf_counter()
    grammars.llg_tokenizer()
    built = time.perf_counter() - start
    start = time.perf_counter()
    grammars.compile(fmt)
    compiled = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(100):
        grammars.constraint(fmt)
    copy = (time.perf_counter() - start) / 100
    print(f"one-off: llguidance tokenizer {built:.2f} s (once per model); json_object grammar "
          f"{compiled * 1000:.1f} ms (once per format); a row's copy {copy * 1e6:.0f} us")

    prompts = [
        list(tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                     tokenize=False), add_special_tokens=False)["input_ids"])
        for p in PROMPTS
    ]
    clock = StepClock(engine)
    engine.start()
    try:
        for batch in args.batch:
            # rows in the step -> that step's seconds, per kind
            wall: dict[str, dict[int, list[float]]] = {"plain": {}, "json_object": {}}
            cpu: dict[str, dict[int, list[float]]] = {"plain": {}, "json_object": {}}
            grammar_share: list[float] = []
            tokens_seen: dict[str, int] = {"plain": 0, "json_object": 0}
            finished: dict[str, list[str | None]] = {"plain": [], "json_object": []}
            for round_ in range(args.rounds + 1):  # round 0 warms up
                order = ("plain", "json_object") if round_ % 2 else ("json_object", "plain")
                for kind in order:
                    spent = [0.0]
                    requests = [
                        GenerationRequest(
                            f"{kind}-{round_}-{i}",
                            prompts[i % len(prompts)],
                            SamplingParams(max_new_tokens=args.max_tokens, temperature=0.0,
                                           stop_token_ids=backend.stop_token_ids),
                            constraint=Timed(grammars.constraint(fmt), spent) if kind == "json_object" else None,
                        )
                        for i in range(batch)
                    ]
                    clock.steps, clock.on = [], round_ > 0
                    rows = asyncio.run(run_batch(engine, requests))
                    clock.on = False
                    time.sleep(0.05)  # the step that delivered the last event has recorded itself
                    if round_ == 0:
                        continue
                    for rows_in_step, w, c in list(clock.steps):
                        wall[kind].setdefault(rows_in_step, []).append(w)
                        cpu[kind].setdefault(rows_in_step, []).append(c)
                    tokens_seen[kind] += sum(n for n, _ in rows)
                    finished[kind].extend(f for _, f in rows)
                    if kind == "json_object":
                        grammar_share.append(spent[0] / sum(n for n, _ in rows) * 1e6)
            reasons = {r: finished["json_object"].count(r) for r in sorted(set(finished["json_object"]), key=str)}
            print(
                f"batch {batch}: grammar (mask + advance) {statistics.median(grammar_share):.0f} us per row-token; "
                f"tokens plain {tokens_seen['plain']} / json_object {tokens_seen['json_object']}; json_object "
                f"finish reasons {reasons}"
            )
            for k in sorted(set(cpu["plain"]) & set(cpu["json_object"]), reverse=True):
                steps = (len(cpu["plain"][k]), len(cpu["json_object"][k]))
                if min(steps) < 3:
                    continue
                c = {kind: statistics.median(cpu[kind][k]) * 1000 for kind in cpu}
                w = {kind: statistics.median(wall[kind][k]) * 1000 for kind in wall}
                print(
                    f"  steps of {k} row(s) (median of {steps[0]} / {steps[1]}): plain {c['plain']:.2f} ms CPU / "
                    f"{w['plain']:.2f} ms wall, json_object {c['json_object']:.2f} / {w['json_object']:.2f}; "
                    f"ratio json_object/plain {c['json_object'] / c['plain']:.3f} CPU, "
                    f"{w['json_object'] / w['plain']:.3f} wall"
                )
    finally:
        engine.shutdown(timeout=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
