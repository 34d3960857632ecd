"""Rebuild the generation judges: one Bradley–Terry reward model per preference set and kind.

    python bench/judge.py                                   # kind head, both sets, into profiles/judges/
    python bench/judge.py --kind lora --set alpaca_helpful  # the LoRA kind of one set
    python bench/judge.py --kind both --set both --bf16 off

Each judge learns from its set's judge-train pairs and is measured on its judge-held-out pairs (the judge
split of the set's train.jsonl, by a hash of the prompt: `steering_vectors.training.judge.SPLIT_RULE`; the RAHF
pipeline never fits or calibrates on those prompts). Writes `<out>/<set>-<kind>.safetensors` and
`<out>/report.json` (accuracies, pair counts, the kept kind per set, timings, CPU). Intermediate results
(features, LoRA checkpoints) live in `--work`, so an interrupted build resumes. See docs/judge.md.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from steering_vectors.core.models import default_cache_dir
    from steering_vectors.training.judge import LoraJudgeConfig
    from steering_vectors.training.judge_build import SETS, build
    from steering_vectors.training.pipeline import resolve_bf16

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["head", "lora", "both"], default="head")
    parser.add_argument("--set", choices=[*SETS, "both"], default="both", dest="data_set")
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                        help="folder with one sub-folder per set (train.jsonl)")
    parser.add_argument("--out", type=Path, default=ROOT / "profiles" / "judges")
    parser.add_argument("--work", type=Path, default=None, help="resumable intermediate results "
                        "(default: <rahf cache>/judge)")
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--lora-epochs", type=int, default=1)
    parser.add_argument("--lora-lr", type=float, default=2e-4)
    parser.add_argument("--lora-head-lr", type=float, default=1e-3, help="learning rate of the scalar head")
    parser.add_argument("--lora-batch", type=int, default=4, help="pairs per optimiser step")
    parser.add_argument("--lora-pairs", type=int, default=None, help="train the lora kind on a seeded sample "
                        "of this many judge-train pairs (CPU time); the head kind also reports a head fitted on them")
    parser.add_argument("--head-pairs", type=int, default=None, help="train the head kind on a seeded sample "
                        "of this many judge-train pairs (CPU time)")
    parser.add_argument("--lora-top-layers", type=int, default=None, help="adapters on the last N layers only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        parser.error(f"--data {args.data}: no such folder")
    sets = list(SETS) if args.data_set == "both" else [args.data_set]
    kinds = ["head", "lora"] if args.kind == "both" else [args.kind]
    lora = LoraJudgeConfig(epochs=args.lora_epochs, lr=args.lora_lr, head_lr=args.lora_head_lr,
                           batch_pairs=args.lora_batch, max_pairs=args.lora_pairs, top_layers=args.lora_top_layers)
    command = "python bench/judge.py " + shlex.join(sys.argv[1:])
    report = build(args.data, sets, kinds, args.out, args.work or default_cache_dir() / "judge",
                   bf16=resolve_bf16(args.bf16), lora=lora, head_pairs=args.head_pairs, command=command)
    print("kept:", ", ".join(f"{s} {k}" for s, k in report["kept"].items()))


if __name__ == "__main__":
    main()
