"""The engine's decode step on the default model: the lean Llama step (server/engine/fastdecode.py)
against the transformers forward, side by side in one run, at several batch sizes, unsteered and with
a different random offset per row at five layers. Both steps run on the same engine, cache and weights
(packed as the server packs them), rounds interleaved; prints the median ms per step and the ratio.
Then the cost of steering in the lean step: unsteered, offsets only, offsets plus a rank-`--rank`
low-rank term per layer (the input-dependent profile kind), and per-row LoRA terms of rank `--rank` on
q_proj and v_proj of layers 0-18 (the shape of the `lora` fit's profiles), rounds interleaved, with their
ratios.

    python bench/decode_step.py                          # rows 1, 8, 16; packed weights (auto)
    python bench/decode_step.py --rows 1 4 --quantize none --threads 1
    python bench/decode_step.py --rows 1 --threads 2 --profile   # and where a step's time goes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.backends.transformers.engine import ContinuousEngine  # noqa: E402
from server.backends.transformers.packed import pack_model  # noqa: E402
from steering_vectors.core.hooks import SteeringPlan, build_plan  # noqa: E402
from steering_vectors.core.models import load_model  # noqa: E402


def decode_steps(
    engine: ContinuousEngine, ids: torch.Tensor, context: int, plan: SteeringPlan | None
) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    """One decode step of `ids` at position `context` through the transformers forward and the lean step."""
    rows = ids.shape[0]
    positions = torch.full((rows,), context, dtype=torch.long)
    mask = engine._decode_mask(positions, context + 1)
    lean = engine.fast_decode
    assert lean is not None

    def regular() -> torch.Tensor:
        engine.cache.for_decode(rows, positions, context + 1)
        return engine._transformers_decode(ids, positions, mask, plan)

    def fast() -> torch.Tensor:
        engine.cache.for_decode(rows, positions, context + 1)
        return lean(ids, positions, mask, engine.cache, plan)

    return regular, fast


def compare(
    engine: ContinuousEngine, ids: torch.Tensor, context: int, plan: SteeringPlan | None, rounds: int, steps: int
) -> tuple[float, float, float]:
    """Median ms per step of the transformers forward and of the lean step, and their largest difference."""
    regular, fast = decode_steps(engine, ids, context, plan)
    times: dict[str, list[float]] = {"transformers": [], "lean": []}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, step in (("transformers", regular), ("lean", fast)):
                step()
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                times[name].append((time.perf_counter() - start) / steps * 1000)
        difference = float((fast() - regular()).abs().max())
    return statistics.median(times["transformers"]), statistics.median(times["lean"]), difference


def steering_cost(
    engine: ContinuousEngine, ids: torch.Tensor, context: int, plans: dict[str, SteeringPlan | None], rounds: int,
    steps: int,
) -> dict[str, float]:
    """Median ms per lean step under each plan, the plans taking turns within every round."""
    runs = {label: decode_steps(engine, ids, context, plan)[1] for label, plan in plans.items()}
    times: dict[str, list[float]] = {label: [] for label in plans}
    with torch.inference_mode():
        for _ in range(rounds):
            for label, step in runs.items():
                step()
                start = time.perf_counter()
                for _ in range(steps):
                    step()
                times[label].append((time.perf_counter() - start) / steps * 1000)
    return {label: statistics.median(values) for label, values in times.items()}


def profile_step(engine: ContinuousEngine, model: torch.nn.Module, ids: torch.Tensor, context: int) -> None:
    """torch.profiler over 10 unsteered lean steps with the output head: where a step's time goes."""
    from torch.profiler import profile

    _, fast = decode_steps(engine, ids, context, None)

    def step() -> torch.Tensor:
        return model.lm_head(fast())

    with torch.inference_mode():
        step()
        with profile() as prof:
            for _ in range(10):
                step()
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))
    calls = sum(e.count for e in events if e.key.startswith("aten::")) / 10
    print(f"rows {ids.shape[0]}: {calls:.0f} aten calls per step (nested ones included)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--quantize", default="auto", choices=["auto", "none", "int4", "int8"])
    parser.add_argument("--context", type=int, default=128, help="cached positions each row attends to")
    parser.add_argument("--steps", type=int, default=20, help="steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rank", type=int, default=8, help="rank of the low-rank terms in the steering-cost runs")
    parser.add_argument(
        "--profile", action="store_true", help="also print torch.profiler's table of the lean step plus head"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from steering_vectors.training.compare import cpu_name

    print(f"CPU: {cpu_name()}")
    model = load_model(None, dtype="float32").model
    print(f"weights: {pack_model(model, args.quantize).summary()}")
    engine = ContinuousEngine(model, max_batch_size=max(args.rows), max_seq_len=args.context + 64)
    lean = engine.fast_decode
    if lean is None:
        print("the lean step is not available for this model")
        return 1
    print(f"lean step: {lean.fused} fused projections, start-up check error {engine.fast_decode_error:.2g}")
    generator = torch.Generator().manual_seed(0)
    hidden = engine.steerer.hidden_size

    results: dict[str, float] = {}
    for rows in args.rows:
        ids = torch.randint(int(model.config.vocab_size), (rows,), generator=generator)
        layers = (6, 9, 12, 15, 18)
        steered = [{layer: torch.randn(hidden, generator=generator) for layer in layers} for _ in range(rows)]
        for label, plan in (("unsteered", None), ("steered", build_plan(steered))):
            slow, quick, difference = compare(engine, ids, args.context, plan, args.rounds, args.steps)
            results[f"transformers/lean@{rows}:{label}"] = slow / quick
            print(
                f"rows {rows:>3} {label:>9}: transformers {slow:7.2f} ms  lean {quick:7.2f} ms  "
                f"ratio {slow / quick:5.2f}  max |difference| {difference:.2e}"
            )
        low_rank = [
            {layer: (torch.randn(args.rank, hidden, generator=generator), torch.randn(hidden, args.rank) * 0.01)
             for layer in layers}
            for _ in range(rows)
        ]
        sizes = engine.steerer.projections
        lora = [
            {layer: {name: (torch.randn(args.rank, hidden, generator=generator),
                            torch.randn(sizes[name], args.rank, generator=generator) * 0.01)
                     for name in ("q_proj", "v_proj")} for layer in range(19)}
            for _ in range(rows)
        ]
        zeros = [{layer: torch.zeros(hidden) for layer in range(19)} for _ in range(rows)]
        plans = {"unsteered": None, "offsets": build_plan(steered),
                 "low-rank": build_plan(steered, row_low_rank=low_rank),
                 "lora": build_plan(zeros, row_lora=lora)}
        cost = steering_cost(engine, ids, args.context, plans, args.rounds, args.steps)
        results[f"lean offsets/unsteered@{rows}"] = cost["offsets"] / cost["unsteered"]
        results[f"lean low-rank/offsets@{rows}"] = cost["low-rank"] / cost["offsets"]
        results[f"lean lora/unsteered@{rows}"] = cost["lora"] / cost["unsteered"]
        print(
            f"rows {rows:>3} lean step: unsteered {cost['unsteered']:7.2f} ms  offsets {cost['offsets']:7.2f} ms  "
            f"offsets + rank-{args.rank} terms {cost['low-rank']:7.2f} ms  "
            f"LoRA r {args.rank} on q/v of layers 0-18 {cost['lora']:7.2f} ms"
        )
        if args.profile:
            profile_step(engine, model, ids, args.context)
    print("ratios of step times (transformers forward / lean step; lean step under one plan / another):")
    for key, value in results.items():
        print(f"  {key}: {value:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
