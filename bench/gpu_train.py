"""One profile's whole `rahf train` on a GPU host, against the 60-minute goal (bench/gpu_check.sh train).

Builds the model from its config with random weights on the device (as bench/gpu_check.py does: the
98 MB GGUF does not travel), then runs the `rahf train` command of the honest-scale comparison with
`--device`: RAHF-Dual step 1 (two LoRA adapters on 1,024 training pairs), step 2 (patterns), step 3 in the
forms named by --fit, and strength calibration on held-out pairs. Prints the command's own stage timings
(its JSON summary), the wall time of the whole command and one profile's time (step 1 + step 2 + the
fit + calibration) against 60 minutes. Random weights give the real cost, not a useful profile.

    python bench/gpu_train.py --device cuda                       # SmolLM2-135M shape, 1,024 pairs
    python bench/gpu_train.py --device cpu --shape tiny --max-pairs 24 --calib-pairs 4 --gap-pairs 4 \
        --fit-steps 4 --strengths 1                                # dry run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_check import RAHF, environment, fresh_model  # noqa: E402

GOAL_S = 3600.0


def default_data() -> Path:
    """.gpu/data/hh_harmless (made by `gpu_check.sh prepare`), else the shared data beside the checkout."""
    carried = ROOT / ".gpu" / "data" / "hh_harmless"
    return carried if (carried / "train.jsonl").is_file() else ROOT.parent / "shared" / "data" / "hh_harmless"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="weights of the random model as saved (`rahf train` loads them as saved)")
    parser.add_argument("--shape", default="model", choices=["model", "tiny"])
    parser.add_argument("--model-files", help="folder with config.json and the tokenizer (default .gpu/model)")
    parser.add_argument("--data", type=Path, default=None, help="preference set (default: hh_harmless)")
    parser.add_argument("--fit", default="lora,rahf", help="step-3 forms, as `rahf train --fit`")
    parser.add_argument("--max-pairs", default="1024")
    parser.add_argument("--calib-pairs", default="48")
    parser.add_argument("--gap-pairs", default="64")
    parser.add_argument("--fit-steps", default="128")
    parser.add_argument("--strengths", default="0.5,1,2")
    parser.add_argument("--bf16", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--work", default="/tmp/rahf-gpu-train")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="JSON and the command's log")
    args = parser.parse_args()

    import torch

    model, model_dir, work, out = fresh_model(args)
    layers = model.config.num_hidden_layers
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    # the comparison's layers on the full shape; spread over the tiny one's four
    target_layers = "6,9,12,15,18" if layers > 18 else ",".join(str(i) for i in range(1, layers))
    data = args.data or default_data()
    command = [
        *RAHF, "train", "--data", str(data), "--name", "gpu-train", "--out", str(work / "profiles"),
        "--model", str(model_dir), "--device", args.device, "--work-dir", str(work / "runs"),
        "--method", "dual", "--alpha", "1", "--fit-init", "shift", "--layers", target_layers,
        "--max-pairs", args.max_pairs, "--calib-pairs", args.calib_pairs, "--gap-pairs", args.gap_pairs,
        "--fit-steps", args.fit_steps, "--strengths", args.strengths, "--bf16", args.bf16, "--fit", args.fit,
    ]
    print("command:", " ".join(command[len(RAHF):]), flush=True)
    log_path = out / "gpu_train.log"
    started = time.perf_counter()
    with log_path.open("w") as log:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode:
        print(f"FAILED: rahf train exited {done.returncode}; the log's end:", flush=True)
        print(log_path.read_text()[-4000:], flush=True)
        return 1
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    timings = summary["timings"]
    print(json.dumps(timings, indent=2), flush=True)
    fits = [f.strip() for f in args.fit.split(",") if f.strip()]
    shared = sum(timings.get(key, 0.0) for key in ("instruct_s", "collect_s"))
    per_profile = {fit: shared + timings.get(f"fit_{fit}_s", 0.0) + timings.get("calibrate_s", 0.0) / len(fits)
                   for fit in fits}
    for fit, seconds in per_profile.items():
        print(f"one profile ({fit}): {seconds / 60:.1f} min (step 1 + step 2 + fit + its share of calibration); "
              f"goal 60 min: {'met' if seconds <= GOAL_S else 'not met'}", flush=True)
    print(f"whole command: {wall / 60:.1f} min for {len(fits)} forms", flush=True)
    report = {**environment(args.device), "command": command[len(RAHF):], "timings": timings,
              "per_profile_s": per_profile, "wall_s": wall, "instruct_gap": summary.get("instruct_gap")}
    (out / "gpu_train.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
