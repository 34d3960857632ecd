"""Cost of the steering hooks on generation speed, measured side by side in one run.

For the embedded default model at batch 1 and batch 8 (one prompt repeated, greedy, fixed new tokens),
three configurations are timed in interleaved rounds so that machine noise hits all of them alike:
  none   - no hooks installed
  empty  - hooks installed, no steering plan
  steer  - hooks installed, a plan that steers every row at every layer of a profile
It prints tokens/s (median over rounds) and the ratios empty/none and steer/none.

    python bench/hooks.py [--dtype bfloat16|float32] [--new-tokens 96] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from steering_vectors import Profile, Steerer, build_plan, combine_offsets
from steering_vectors.core.models import load_model


def _generate(model, inputs, new_tokens: int) -> int:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    loaded = load_model(None, dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    hidden, layers = loaded.fingerprint.hidden_size, loaded.fingerprint.num_layers
    gen = torch.Generator().manual_seed(0)
    offsets = {layer: torch.randn(hidden, generator=gen) * 0.01 for layer in range(layers)}
    profile = Profile(name="bench", offsets=offsets)
    message = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]
    results = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        inputs = tok.apply_chat_template([message] * batch, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True, padding=True)
        plan = build_plan([combine_offsets([(profile, 1.0)])] * batch, dtype=model.dtype)
        _generate(model, inputs, 8)  # warm-up
        times: dict[str, list[float]] = {"none": [], "empty": [], "steer": []}
        tokens = 0
        for _ in range(args.rounds):
            for config in times:
                steerer = getattr(model, "_rahf_steerer", None)
                if config == "none":
                    if steerer is not None:
                        steerer.remove()
                else:
                    steerer = Steerer.attach(model)
                started = time.perf_counter()
                if config == "steer":
                    with steerer.steering(plan):
                        tokens = _generate(model, inputs, args.new_tokens)
                else:
                    tokens = _generate(model, inputs, args.new_tokens)
                times[config].append(time.perf_counter() - started)
        speed = {config: tokens / statistics.median(values) for config, values in times.items()}
        results[batch] = {
            "tokens_per_s": speed,
            "empty_over_none": speed["empty"] / speed["none"],
            "steer_over_none": speed["steer"] / speed["none"],
        }
        print(f"batch {batch}: none {speed['none']:.1f} tok/s, empty plan {speed['empty']:.1f} tok/s, "
              f"all rows steered {speed['steer']:.1f} tok/s | empty/none {results[batch]['empty_over_none']:.3f} "
              f"(goal >= 0.98), steer/none {results[batch]['steer_over_none']:.3f} (goal >= 0.97)")
    if args.json:
        args.json.write_text(json.dumps({"dtype": args.dtype, "new_tokens": args.new_tokens,
                                         "rounds": args.rounds, "results": results}, indent=2))


if __name__ == "__main__":
    main()
