"""The stages of a training run and their work folders: pairs, instruct (step 1), patterns (step 2), fits
(step 3), each resumable.

Every stage keeps its results in a folder named by a digest of everything the result depends on (data
file contents, pairs, seed, budgets, hyper-parameters, model fingerprint, the earlier stage's folder), so
a rerun of the same command resumes where it stopped, and commands that share a stage (several fits of
one instructed model, a comparison of methods) share its folder instead of redoing it. Knows nothing
about the command line (see `pipeline_cli`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import DataFormatError, PreferencePair, TokenBudget, load_pairs, sample_pairs, split_pairs
from .profile import ModelFingerprint, atomic_write

log = logging.getLogger(__name__)

CALIBRATION_SPLIT_SEED = 0  # the held-out calibration prompts are the same for every run seed


def cpu_has_bf16_units() -> bool:
    """True when this CPU computes bf16 natively (AVX-512 BF16 or AMX): there bf16 autocast is faster
    than float32; on AVX2-only CPUs it is emulated and slower."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_bf16(mode: str) -> bool:
    """'on', 'off' or 'auto' (bf16 autocast where the CPU has bf16 units) -> whether to use it."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"bf16 mode {mode!r} is not auto, on or off")
    return cpu_has_bf16_units() if mode == "auto" else mode == "on"


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()[:16]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, value: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode())


class Stages:
    """The work folder of training runs: one sub-folder per stage result, named `<stage>-<digest>`."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, stage: str, settings: dict[str, Any]) -> Path:
        path = self.root / f"{stage}-{digest(settings)}"
        path.mkdir(parents=True, exist_ok=True)
        if not (path / "settings.json").is_file():
            write_json(path / "settings.json", settings)
        return path


@dataclass
class PairSplit:
    """Training pairs for the fit steps and calibration pairs held out from all of them.

    The held-out part is a fixed share of the training file's prompts (by a hash of the prompt, so pairs
    of one prompt never cross), the same for every seed; `pairs` and `calib` are seeded samples of the
    two parts."""

    data_file: Path
    data_digest: str
    pairs: list[PreferencePair]
    calib: list[PreferencePair]
    pool: int
    held: int
    held_out: float

    def settings(self) -> dict[str, Any]:
        return {"data": self.data_digest, "held_out": self.held_out, "pairs": [p.id for p in self.pairs]}


def split_training_pairs(
    data_file: Path, *, max_pairs: int, calib_pairs: int, held_out: float, seed: int
) -> PairSplit:
    everything = load_pairs(data_file)
    pool, held = split_pairs(everything, held_out, seed=CALIBRATION_SPLIT_SEED)
    if not pool or not held:
        raise DataFormatError(
            f"{data_file}: {len(everything)} pairs split into {len(pool)} for training and {len(held)} held "
            f"out for calibration (--held-out {held_out}); both need at least one: change --held-out or add pairs"
        )
    return PairSplit(
        data_file=data_file,
        data_digest=file_digest(data_file),
        pairs=sample_pairs(pool, max_pairs, seed=seed),
        calib=sample_pairs(held, calib_pairs, seed=seed),
        pool=len(pool),
        held=len(held),
        held_out=held_out,
    )


# -- step 1 -------------------------------------------------------------------------------------------


def instruct_folder(stages: Stages, split: PairSplit, method: str, config: Any, fingerprint: ModelFingerprint) -> Path:
    return stages.folder(
        "instruct",
        {
            **split.settings(),
            "method": method,
            "seed": config.seed,
            "budget": [config.budget.prompt, config.budget.response],
            "epochs": config.epochs,
            "batch_pairs": config.batch_pairs,
            "lr": config.lr,
            "lora": [config.rank, config.lora_alpha, list(config.targets)],
            "epsilon": config.epsilon if method == "scit" else None,
            "bf16": config.bf16,
            "model": dataclasses.asdict(fingerprint),
        },
    )


def instruct_stage(
    model: nn.Module,
    tokenizer: Any,
    split: PairSplit,
    method: str,
    config: Any,
    folder: Path,
    *,
    gap_pairs: Sequence[PreferencePair] = (),
) -> tuple[nn.Module, dict[str, Any]]:
    """Step 1 (SCIT or Dual LoRA) resumed from `folder`, with the likelihood gap on `gap_pairs` (held out
    from step 1) before and after. Returns the wrapped model and the stage's record (instruct.json)."""
    from .rahf import likelihood_gap, train_dual, train_scit

    record_file = folder / "instruct.json"
    record = read_json(record_file)
    if gap_pairs and "gap_before" not in record:
        if method == "dual":  # both adapters start as the base model (LoRA B = 0): no gap to measure
            record["gap_before"] = {"mean_gap": 0.0, "accuracy": 0.0, "n": len(gap_pairs), "note": "adapters equal"}
        else:
            record["gap_before"] = likelihood_gap(
                model, tokenizer, gap_pairs, method, budget=config.budget, bf16=config.bf16, instructed=False
            )
        write_json(record_file, record)
    started = time.perf_counter()
    trainer = train_scit if method == "scit" else train_dual
    model, losses = trainer(model, tokenizer, split.pairs, config, folder)
    if "seconds" not in record:
        record["seconds"] = time.perf_counter() - started
    record["losses"] = losses
    if gap_pairs and "gap_after" not in record:
        record["gap_after"] = likelihood_gap(
            model, tokenizer, gap_pairs, method, budget=config.budget, bf16=config.bf16
        )
    write_json(record_file, record)
    log.info("step 1 (%s): gap before %s, after %s", method, record.get("gap_before"), record.get("gap_after"))
    return model, record


# -- step 2 -------------------------------------------------------------------------------------------


def patterns_folder(stages: Stages, instruct: Path, layers: Sequence[int], base_means: bool) -> Path:
    return stages.folder(
        "patterns", {"instruct": instruct.name, "layers": list(layers), "base_means": base_means, "replies": "both"}
    )


def patterns_stage(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    layers: Sequence[int],
    method: str,
    budget: TokenBudget,
    *,
    folder: Path,
    base_means: bool,
    bf16: bool,
) -> tuple[list[Any], dict[str, Any]]:
    """Step 2 into `folder` (or loaded from it): the pattern records and the stage's record."""
    from .rahf import PatternStore, collect_patterns

    patterns_file = folder / "patterns.pt"
    record = read_json(folder / "patterns.json")
    if patterns_file.is_file():
        store = PatternStore.load(patterns_file)
        log.info("loaded %d pattern records from %s", len(store), patterns_file)
        return store.all(), record
    started = time.perf_counter()
    store = collect_patterns(
        model,
        tokenizer,
        pairs,
        layers,
        method=method,
        budget=budget,
        bf16=bf16,
        spill_dir=folder / "spill",
        base_means=base_means,
        dtype=torch.float16,
    )
    store.save(patterns_file)
    record = {"seconds": time.perf_counter() - started, "records": len(store)}
    write_json(folder / "patterns.json", record)
    return store.all(), record


# -- step 3 -------------------------------------------------------------------------------------------


def fit_stage(
    folder: Path, fit: Any
) -> tuple[dict[int, torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor]], list[float], dict[str, Any]]:
    """Run `fit(checkpoint)` -> (offsets, low_rank, losses) resumably in `folder`; record its wall time."""
    record = read_json(folder / "fit.json")
    started = time.perf_counter()
    offsets, low_rank, losses = fit(folder / "fit.ckpt")
    if "seconds" not in record:
        record["seconds"] = time.perf_counter() - started
    record["loss_first_last"] = [losses[0], losses[-1]] if losses else None
    write_json(folder / "fit.json", record)
    return offsets, low_rank, losses, record
