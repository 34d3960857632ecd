"""Write the refusal pairs of a preference set: the pairs whose chosen reply refuses or defuses and whose rejected
reply does not, by the refusal phrase list of the generation metrics (`genmetrics.refuses`, case-insensitive
phrases: "I'm sorry", "I can't", "seek help", "instead", ...). The shipped `harmless` profile is RAHF-Dual trained
on these pairs of hh_harmless's train split (230 of 1,658); see profiles/README.md.

    python scripts/refusal_pairs.py ../shared/data/hh_harmless .cache/data/hh_refusal

Writes OUT/train.jsonl (the selected train pairs, in file order) and OUT/dev.jsonl (the whole dev split,
unselected, so that `rahf train --eval` scores on the same pairs as every other hh_harmless profile), and prints
the counts. Only the train split is selected from: dev stays for measuring.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steering_vectors.training.genmetrics import refuses  # noqa: E402


def is_refusal_pair(pair: dict) -> bool:
    """The chosen (last) reply refuses or defuses and the rejected one does not."""
    return refuses(pair["chosen"][-1]["content"]) and not refuses(pair["rejected"][-1]["content"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="a preference set folder with train.jsonl and dev.jsonl")
    parser.add_argument("out", type=Path, help="the folder to write")
    args = parser.parse_args()
    lines = (args.data / "train.jsonl").read_text(encoding="utf-8").splitlines()
    kept = [pair for pair in (json.loads(line) for line in lines if line.strip()) if is_refusal_pair(pair)]
    args.out.mkdir(parents=True, exist_ok=True)
    # one json.dumps per pair (default separators): the bytes the shipped profile's run read
    (args.out / "train.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in kept), encoding="utf-8")
    shutil.copyfile(args.data / "dev.jsonl", args.out / "dev.jsonl")
    print(f"{len(kept)} of {len(lines)} train pairs: chosen refuses or defuses, rejected does not -> {args.out}")


if __name__ == "__main__":
    main()
