"""The command-line pieces `rahf train`, `rahf eval` and `rahf compare` share: argument types (numbers, layer
lists, counts, fractions, profile names, fit methods), the options of one training run
(`pipeline.RunConfig`) and of the side-by-side generations, the layer check against a loaded model, and each
command's logging / thread setup and its own command line (recorded in reports).

Knows argparse and the defaults for the embedded model; imports neither command.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch

DEFAULT_LAYERS = "6,9,12,15,18"
DEFAULT_STRENGTHS = "0.25,0.5,1,2"


def parse_floats(text: str) -> list[float]:
    """Comma-separated finite numbers, at least one."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return values


def parse_ints(text: str) -> list[int]:
    """Comma-separated non-negative integers (layer indices), at least one."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices >= 0, got {text!r}")
    return values


def at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text}")
        return value

    parse.__name__ = "int"  # argparse names the type in its messages
    return parse


parse_count, parse_count0 = at_least(1), at_least(0)


def parse_penalty(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.01 <= value <= 100.0:
        raise argparse.ArgumentTypeError(f"expected a repetition penalty from 0.01 to 100 (1: off), got {text!r}")
    return value


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gen-tokens", type=parse_count, default=96,
                        help="new tokens of each side-by-side generation (default 96: long enough to show loops)")
    parser.add_argument("--gen-repetition-penalty", type=parse_penalty, default=1.0,
                        help="repetition_penalty of those generations, as the server applies it (default 1: off)")


def add_generation_eval_options(parser: argparse.ArgumentParser) -> None:
    """The generation evaluation (`geneval`) of `rahf eval` and `rahf compare`: off unless --generation."""
    group = parser.add_argument_group("generation evaluation (replies judged; docs/judge.md)")
    group.add_argument("--generation", action="store_true",
                       help="also judge greedy replies to the dev prompts at every strength against unsteered")
    group.add_argument("--judge", type=Path, default=None,
                       help="judge file (default: the one --judges keeps for the data folder's name)")
    group.add_argument("--judges", type=Path, default=Path("profiles/judges"), help="judges folder with report.json")
    group.add_argument("--gen-limit", type=parse_count, default=None, help="at most this many dev prompts")
    group.add_argument("--gen-samples", type=parse_count0, default=0,
                       help="seeded sampled reply sets beside the greedy one (temperature 0.7, top-p 0.9)")
    group.add_argument("--gen-strengths", type=parse_floats, default=None,
                       help="strength grid of the generation rows (default: --strengths)")
    group.add_argument("--gen-compose", action="store_true",
                       help="rahf eval: one more row with every given profile together, each at its default strength")


def parse_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def parse_name(text: str) -> str:
    from ..core.errors import ProfileFormatError
    from ..core.profile import validate_name

    try:
        return validate_name(text)
    except ProfileFormatError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_layers(layers: list[int], model: torch.nn.Module) -> None:
    from ..core.errors import ProfileLayerError
    from ..core.layers import find_decoder_layers

    count = len(find_decoder_layers(model))
    outside = sorted(layer for layer in set(layers) if layer >= count)
    if outside:
        raise ProfileLayerError(f"--layers {outside}: the model has {count} decoder layers (0..{count - 1})")


def parse_fits(text: str) -> list[str]:
    from .fit import FIT_METHODS, RECORD_FITS

    # "all" = the RAHF fit and its three baselines (what the shipped profiles were made with); pref is named
    fits = list(RECORD_FITS) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    bad = [f for f in fits if f not in FIT_METHODS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown fit methods {bad}; choose from {FIT_METHODS} or 'all'")
    return fits



def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of one training run (`pipeline.RunConfig`), shared by `train` and `compare`."""
    parser.add_argument("--model", default=None, help="local model directory (default: embedded SmolLM2)")
    parser.add_argument("--method", choices=("scit", "dual"), default="dual", help="step 1 variant")
    parser.add_argument("--layers", type=parse_ints, default=parse_ints(DEFAULT_LAYERS), help="target decoder layers")
    parser.add_argument("--alpha", type=float, default=1.0, help="pattern scale in the alignment target")
    parser.add_argument("--max-pairs", type=parse_count, default=1024, help="training pairs (seeded sample)")
    parser.add_argument(
        "--held-out",
        type=parse_fraction,
        default=0.1,
        help="share of the training file's prompts held out from every fit step (calibration, step-1 gap)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-tokens", type=parse_count, default=96, help="prompt token budget")
    parser.add_argument("--response-tokens", type=parse_count, default=64, help="reply token budget of steps 1-3")
    parser.add_argument(
        "--eval-response-tokens", type=parse_count, default=256, help="reply token budget of calibration and --eval"
    )
    parser.add_argument("--epochs", type=parse_count, default=1, help="epochs of the LoRA step")
    parser.add_argument("--batch-pairs", type=parse_count, default=2, help="pairs per LoRA step")
    parser.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate")
    parser.add_argument("--fit-steps", type=parse_count, default=128, help="Adam steps of the 'rahf' fit")
    parser.add_argument("--fit-batch", type=parse_count, default=8, help="replies per step of the 'rahf' fit")
    parser.add_argument("--fit-lr", type=float, default=None, help="'rahf' fit learning rate (default: scaled)")
    parser.add_argument(
        "--rank", type=parse_count0, default=8,
        help="rank of the input-dependent low-rank term per layer in the 'rahf' fit",
    )
    parser.add_argument("--kl", type=float, default=0.0, help="weight of the prompt-token KL in the 'rahf' fit")
    parser.add_argument(
        "--l2", type=float, default=1e-3, help="weight of the low-rank factors' squared norms in the 'rahf' fit"
    )
    parser.add_argument(
        "--fit-down-lr", type=float, default=1e-3, help="learning rate of the unit-norm 'down' factors in 'rahf'"
    )
    parser.add_argument(
        "--fit-init",
        choices=("zeros", "shift"),
        default="shift",
        help="start of the 'rahf' offsets: zeros, or the closed-form mean shift from base states to the target",
    )
    parser.add_argument("--pref-steps", type=parse_count, default=32, help="Adam steps of the 'pref' fit")
    parser.add_argument("--pref-batch", type=parse_count, default=8, help="pairs per step of the 'pref' fit")
    parser.add_argument("--pref-lr", type=float, default=0.01, help="learning rate of the 'pref' fit")
    parser.add_argument(
        "--pref-rank",
        type=parse_count0,
        default=0,
        help="rank of an input-dependent low-rank term per layer in the 'pref' fit (0: constant offsets only)",
    )
    parser.add_argument("--pref-beta", type=float, default=10.0, help="beta of the 'pref' preference loss")
    parser.add_argument(
        "--pref-l2", type=float, default=0.01, help="weight of the squared norms of offsets and factors in 'pref'"
    )
    parser.add_argument(
        "--pref-kl", type=float, default=0.0, help="weight of the prompt-token KL in the 'pref' loss"
    )
    parser.add_argument(
        "--pref-bidirectional",
        action="store_true",
        help="'pref' fit in both directions (a seeded ±1 per pair and step; margins against the unsteered model)",
    )
    parser.add_argument("--position-mode", choices=("all", "generated", "prompt"), default="all")
    parser.add_argument(
        "--calib-pairs", type=parse_count, default=64, help="held-out training pairs to tune the default strength"
    )
    parser.add_argument(
        "--gap-pairs", type=parse_count0, default=64, help="held-out pairs for step 1's likelihood gap (0: skip)"
    )
    parser.add_argument("--strengths", type=parse_floats, default=parse_floats(DEFAULT_STRENGTHS), help="strength grid")
    parser.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16 autocast; auto: on where the CPU has bf16 units (AVX-512 BF16, AMX), off elsewhere",
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="stage folders and checkpoints (default: <cache>/runs)"
    )
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N")



def setup(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)


def command_line() -> str:
    return "rahf " + " ".join(shlex.quote(a) for a in sys.argv[1:])

