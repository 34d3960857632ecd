"""Packed weights vs float weights on the default model: perplexity of the neutral text, greedy
generation speed at several batch sizes (interleaved rounds, best of each) and where greedy outputs
first differ. Prints the ratios measured side by side in one run.

    python bench/packed.py                    # modes auto (int4 + int8 head) and int8 against fp32
    python bench/packed.py --batches 1 8 16 32 --rounds 3 --max-rows 1000
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.backends.transformers.packed import pack_model  # noqa: E402
from steering_vectors.core.models import load_model  # noqa: E402
from steering_vectors.training.evaluate import neutral_text  # noqa: E402

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain photosynthesis briefly.",
    "List three fruits.",
    "How do I bake bread?",
    "Tell me a joke.",
    "What is 17*3?",
    "Describe a cat.",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["auto", "int8"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-rows", type=int, default=10**6, help="packed path up to this many rows")
    args = parser.parse_args(argv)

    loaded = load_model(None, dtype="float32")
    tokenizer = loaded.tokenizer
    models = {"fp32": loaded.model}
    for mode in args.modes:
        model = copy.deepcopy(loaded.model)
        print(f"{mode}: {pack_model(model, mode, args.max_rows).summary()}")
        models[mode] = model

    ids = tokenizer(neutral_text(), return_tensors="pt").input_ids[:, :512]
    for name, model in models.items():
        with torch.inference_mode():
            print(f"perplexity {name:>6}: {math.exp(model(ids, labels=ids).loss.item()):.3f}")

    tokenizer.padding_side = "left"
    chats = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    for batch in args.batches:
        texts = (chats * (batch // len(chats) + 1))[:batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True)
        best: dict[str, float] = {}
        outputs: dict[str, torch.Tensor] = {}
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                with torch.inference_mode():
                    out = model.generate(
                        **inputs,
                        max_new_tokens=args.new_tokens,
                        min_new_tokens=args.new_tokens,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                rate = batch * args.new_tokens / (time.perf_counter() - start)
                best[name] = max(best.get(name, 0.0), rate)
                outputs[name] = out[:, inputs.input_ids.shape[1] :]
        line = [f"batch {batch:>3}: fp32 {best['fp32']:.1f} tok/s"]
        for name in args.modes:
            differ = (outputs[name] != outputs["fp32"]).int()
            first = [int(row.argmax()) if row.any() else args.new_tokens for row in differ]
            line.append(
                f"{name} {best[name]:.1f} tok/s (x{best[name] / best['fp32']:.2f}, "
                f"first differing token {min(first)}..{max(first)})"
            )
        print("  ".join(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
