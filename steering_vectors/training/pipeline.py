"""The stages of a training run and their work folders: pairs, instruct (step 1), patterns (step 2), fits
(step 3), each resumable.

Every stage keeps its results in a folder named by a digest of everything the result depends on (data
file contents, pairs, seed, budgets, hyper-parameters, model fingerprint, the earlier stage's folder), so
a rerun of the same command resumes where it stopped, and commands that share a stage (several fits of
one instructed model, a comparison of methods) share its folder instead of redoing it. Knows nothing
about the command line (see `pipeline_cli`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.profile import ModelFingerprint, atomic_write
from .data import DataFormatError, PreferencePair, TokenBudget, load_pairs, sample_pairs, split_pairs
from .judge import without_judge_pairs

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


def resolve_bf16(mode: str, device: str = "cpu") -> bool:
    """'on', 'off' or 'auto' -> whether to use bf16 autocast. auto: where the CPU has bf16 units, or on a
    CUDA device that supports bf16."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"bf16 mode {mode!r} is not auto, on or off")
    if mode != "auto":
        return mode == "on"
    if torch.device(device).type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return cpu_has_bf16_units()


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def file_digest(path: Path) -> str:
    """A file's digest as stage keys and records carry it (the sha256's first 16 hex digits)."""
    return file_sha256(path)[:16]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_json(path: Path, value: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode())


@contextlib.contextmanager
def stage_clock(folder: Path, every: float = 30.0) -> Iterator[Callable[[], float]]:
    """The wall time spent computing a stage over every run that worked on it, as a callable.

    A stage interrupted and resumed (a killed run, a session's end) used to record only the last run's time.
    The clock adds the time earlier runs spent (`folder/elapsed.json`, rewritten every `every` seconds while
    the stage is held and when it is let go, so a killed run loses at most that much of its time)."""
    path = folder / "elapsed.json"
    earlier = float(read_json(path).get("seconds", 0.0))
    started = time.perf_counter()

    def elapsed() -> float:
        return earlier + time.perf_counter() - started

    stop = threading.Event()

    def keep() -> None:
        while not stop.wait(every):
            write_json(path, {"seconds": elapsed()})

    keeper = threading.Thread(target=keep, name=f"clock {folder.name}", daemon=True)
    keeper.start()
    try:
        yield elapsed
    finally:
        stop.set()
        keeper.join()
        write_json(path, {"seconds": elapsed()})


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """An exclusive `flock` on `folder/.lock` for the block; waits for another holder. No-op off POSIX."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("%s is being computed by another process; waiting for it", folder.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def stage_lock(folder: Path) -> Iterator[Callable[[], float]]:
    """Hold the stage folder's lock (`folder/.lock`, an exclusive `flock`) while computing or resuming it, so
    that two processes never write one stage's checkpoints at once: the second waits, then finds the stage
    done (or further on) and goes on from there. The lock goes with the process (a killed holder frees it).

    Yields the stage's `stage_clock` (started once the lock is held: waiting for it is not counted)."""
    with _exclusive(folder), stage_clock(folder) as clock:
        yield clock


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
    everything = without_judge_pairs(load_pairs(data_file))  # the generation judge's prompts: never fit on
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
            "model": fingerprint.identity(),  # the stage's key: unchanged by fields outside the identity
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
    from .instruct import likelihood_gap, train_dual, train_scit

    with stage_lock(folder) as clock:
        record_file = folder / "instruct.json"
        record = read_json(record_file)
        if gap_pairs and "gap_before" not in record:
            if method == "dual":  # both adapters start as the base model (LoRA B = 0): no gap to measure
                record["gap_before"] = {
                    "mean_gap": 0.0, "accuracy": 0.0, "n": len(gap_pairs), "note": "adapters equal"
                }
            else:
                record["gap_before"] = likelihood_gap(
                    model, tokenizer, gap_pairs, method, budget=config.budget, bf16=config.bf16, instructed=False
                )
            write_json(record_file, record)
        trainer = train_scit if method == "scit" else train_dual
        model, losses = trainer(model, tokenizer, split.pairs, config, folder)
        if "seconds" not in record:
            record["seconds"] = clock()  # every run's time on this stage, the gap before included
        record["losses"] = losses
        if gap_pairs and "gap_after" not in record:
            record["gap_after"] = likelihood_gap(
                model, tokenizer, gap_pairs, method, budget=config.budget, bf16=config.bf16
            )
        write_json(record_file, record)
        log.info("step 1 (%s): gap before %s, after %s", method, record.get("gap_before"), record.get("gap_after"))
    return model, record


# -- step 2 -------------------------------------------------------------------------------------------


def patterns_folder(stages: Stages, instruct: Path, layers: Sequence[int]) -> Path:
    """Patterns of both replies of every pair, with the base model's means (so CAA and PCA can use them)."""
    return stages.folder("patterns", {"instruct": instruct.name, "layers": list(layers), "replies": "both"})


def patterns_stage(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    layers: Sequence[int],
    method: str,
    budget: TokenBudget,
    *,
    folder: Path,
    bf16: bool,
) -> tuple[list[Any], dict[str, Any]]:
    """Step 2 into `folder` (or loaded from it): the pattern records and the stage's record."""
    from .collect import PatternStore, collect_patterns

    patterns_file = folder / "patterns.pt"
    with stage_lock(folder) as clock:
        record = read_json(folder / "patterns.json")
        if patterns_file.is_file():
            store = PatternStore.load(patterns_file)
            log.info("loaded %d pattern records from %s", len(store), patterns_file)
            return store.all(), record
        store = collect_patterns(
            model,
            tokenizer,
            pairs,
            layers,
            method=method,
            budget=budget,
            bf16=bf16,
            spill_dir=folder / "spill",
            base_means=True,
            dtype=torch.float16,
        )
        store.save(patterns_file)
        record = {"seconds": clock(), "records": len(store)}
        write_json(folder / "patterns.json", record)
    return store.all(), record


# -- step 3 -------------------------------------------------------------------------------------------


def fit_stage(
    folder: Path, fit: Any
) -> tuple[dict[int, torch.Tensor], dict[int, tuple[torch.Tensor, torch.Tensor]], list[float], dict[str, Any]]:
    """Run `fit(checkpoint)` -> (offsets, low_rank, losses) resumably in `folder`; record its wall time."""
    with stage_lock(folder) as clock:
        record = read_json(folder / "fit.json")
        offsets, low_rank, losses = fit(folder / "fit.ckpt")
        if "seconds" not in record:
            record["seconds"] = clock()
        record["loss_first_last"] = [losses[0], losses[-1]] if losses else None
        write_json(folder / "fit.json", record)
    return offsets, low_rank, losses, record


# -- one run: the stages in order, for `rahf train` and `rahf compare` ----------------------------------


@dataclass
class RunConfig:
    """Everything a training run depends on: the flags of `rahf train`."""

    data_file: Path
    method: str = "dual"
    layers: tuple[int, ...] = (6, 9, 12, 15, 18)
    alpha: float = 1.0
    max_pairs: int = 1024
    held_out: float = 0.1
    seed: int = 0
    prompt_tokens: int = 96
    response_tokens: int = 64
    eval_response_tokens: int = 256
    epochs: int = 1
    batch_pairs: int = 2
    lr: float = 5e-4
    fit_steps: int = 128
    fit_batch: int = 8
    fit_lr: float | None = None
    rank: int = 8
    kl: float = 0.0
    l2: float = 1e-3
    fit_init: str = "shift"
    fit_down_lr: float = 1e-3
    pref_steps: int = 32
    pref_batch: int = 8
    pref_lr: float = 0.01
    pref_rank: int = 0
    pref_beta: float = 10.0
    pref_l2: float = 0.01
    pref_kl: float = 0.0
    pref_bidirectional: bool = False
    position_mode: str = "all"
    calib_pairs: int = 64
    gap_pairs: int = 64
    bf16: bool = False

    @classmethod
    def from_args(cls, args: Any, data_file: Path, bf16: bool) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"data_file", "bf16", "layers"}
        return cls(
            data_file=data_file, bf16=bf16, layers=tuple(args.layers), **{n: getattr(args, n) for n in names}
        )

    @property
    def budget(self) -> TokenBudget:
        return TokenBudget(self.prompt_tokens, self.response_tokens)

    def key(self) -> dict[str, Any]:
        """The fields as a dict, less those added since comparisons were first run that still hold their
        default (`pref_bidirectional` off), so that earlier work folders and reports keep their names."""
        fields = dataclasses.asdict(self)
        if not fields["pref_bidirectional"]:
            del fields["pref_bidirectional"]
        return fields

    @property
    def eval_budget(self) -> TokenBudget:
        return TokenBudget(self.prompt_tokens, self.eval_response_tokens)


@dataclass
class FitResult:
    offsets: dict[int, torch.Tensor]
    low_rank: dict[int, tuple[torch.Tensor, torch.Tensor]]
    provenance: dict[str, Any]  # what this fit adds to (or overrides in) the run's provenance
    seconds: dict[str, float]  # wall time of the stages it used (of the runs that finished them)
    lora: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = dataclasses.field(default_factory=dict)


class Run:
    """One training run over a model: its pairs, and the stages it needs, each resumed from `stages`."""

    def __init__(self, config: RunConfig, loaded: Any, stages: Stages, command: str = "") -> None:
        self.config = config
        self.loaded = loaded
        self.stages = stages
        self.command = command
        self.split = split_training_pairs(
            config.data_file,
            max_pairs=config.max_pairs,
            calib_pairs=config.calib_pairs,
            held_out=config.held_out,
            seed=config.seed,
        )
        self._records: tuple[list[Any], dict[str, Any], dict[str, Any]] | None = None
        self._calib_unsteered: dict[str, float] | None = None

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    def instruct_config(self) -> Any:
        from .instruct import InstructConfig

        c = self.config
        return InstructConfig(
            epochs=c.epochs, batch_pairs=c.batch_pairs, lr=c.lr, bf16=c.bf16, seed=c.seed, budget=c.budget
        )

    def instruct_dir(self) -> Path:
        config = self.instruct_config()
        return instruct_folder(self.stages, self.split, self.config.method, config, self.loaded.fingerprint)

    def instructed(self) -> tuple[nn.Module, dict[str, Any]]:
        """Step 1's model (LoRA-wrapped; `release` unwraps it) and its record, resumed or trained."""
        return instruct_stage(
            self.model,
            self.loaded.tokenizer,
            self.split,
            self.config.method,
            self.instruct_config(),
            self.instruct_dir(),
            gap_pairs=self.split.calib[: self.config.gap_pairs],
        )

    @staticmethod
    def release(model: nn.Module) -> None:
        if hasattr(model, "unload"):
            model.unload()  # the base model again (in place), LoRA layers removed

    def records(self) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
        """Step 2's records with the records of steps 1 and 2, from the stage folders or computed."""
        if self._records is None:
            instruct_dir = self.instruct_dir()
            folder = patterns_folder(self.stages, instruct_dir, self.config.layers)
            model, instruct_record = self.model, read_json(instruct_dir / "instruct.json")
            needs_step1 = not (folder / "patterns.pt").is_file() or "gap_after" not in instruct_record
            if needs_step1:
                model, instruct_record = self.instructed()
            try:
                records, patterns_record = patterns_stage(
                    model, self.loaded.tokenizer, self.split.pairs, self.config.layers, self.config.method,
                    self.config.budget, folder=folder, bf16=self.config.bf16,
                )
            finally:
                if needs_step1:
                    self.release(model)
            patterns_record = {**patterns_record, "folder": folder.name, "instruct_folder": instruct_dir.name}
            self._records = (records, instruct_record, patterns_record)
        return self._records

    def base_provenance(self) -> dict[str, Any]:
        c = self.config
        return {
            "data": str(c.data_file),
            "pairs": len(self.split.pairs),
            "held_out": c.held_out,
            "seed": c.seed,
            "instruct": c.method,
            "layers": list(c.layers),
            "alpha": c.alpha,
            "budget": {"prompt": c.prompt_tokens, "response": c.response_tokens},
            "model": self.loaded.name,
            "command": self.command,
            "bf16_autocast": c.bf16,
        }

    def fit(self, fit: str) -> FitResult:
        """Step 3 by `fit` (rahf, lora, mean, caa, pca or pref), with the stages it needs."""
        from .fit import FitConfig, caa_offsets, fit_offsets, mean_pattern_offsets, pca_offsets
        from .pref import PrefConfig, fit_preference_offsets

        c, tokenizer = self.config, self.loaded.tokenizer
        layers = list(c.layers)
        if fit == "pref":
            pref = PrefConfig(
                beta=c.pref_beta, l2=c.pref_l2, kl=c.pref_kl, steps=c.pref_steps, batch_pairs=c.pref_batch,
                lr=c.pref_lr, rank=c.pref_rank, position_mode=c.position_mode, budget=c.budget, bf16=c.bf16,
                seed=c.seed, bidirectional=c.pref_bidirectional,
            )
            settings = {k: v for k, v in dataclasses.asdict(pref).items() if k != "budget"}
            if not pref.bidirectional:
                del settings["bidirectional"]  # so one-way fits keep the stage folders they had
            folder = self.stages.folder(
                "fit-pref",
                {**self.split.settings(), "layers": layers, "model": self.loaded.fingerprint.digest, **settings,
                 "budget": [c.prompt_tokens, c.response_tokens]},
            )
            offsets, low_rank, _, record = fit_stage(
                folder, lambda ckpt: fit_preference_offsets(self.model, tokenizer, self.split.pairs, layers, pref, ckpt)
            )
            kept = ("beta", "l2", "kl", "steps", "batch_pairs", "lr", "rank", "bidirectional")
            # not RAHF: no instructed model and no patterns are used, so no instruct method or alpha
            provenance = {
                "instruct": "none", "alpha": None, "pref": {k: settings[k] for k in kept if k in settings},
                "fit_loss_first_last": record["loss_first_last"],
            }
            return FitResult(offsets, low_rank, provenance, {"fit_s": record["seconds"]})
        if fit == "lora":
            return self._fit_lora_terms()
        records, instruct_record, patterns_record = self.records()
        losses = instruct_record.get("losses", [])
        provenance = {
            "instruct_epochs": c.epochs,
            "instruct_loss_first_last": [losses[0], losses[-1]] if losses else None,
            "instruct_gap": {k: instruct_record.get(k) for k in ("gap_before", "gap_after")},
            "stages": {"instruct": patterns_record["instruct_folder"], "patterns": patterns_record["folder"]},
        }
        seconds = {
            "instruct_s": instruct_record.get("seconds", float("nan")),
            "collect_s": patterns_record.get("seconds", float("nan")),
        }
        low_rank: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if fit == "rahf":
            config = FitConfig(
                alpha=c.alpha, steps=c.fit_steps, batch_size=c.fit_batch, lr=c.fit_lr, rank=c.rank, kl=c.kl,
                l2=c.l2, init=c.fit_init, down_lr=c.fit_down_lr, bf16=c.bf16, seed=c.seed,
            )
            settings = {"patterns": patterns_record["folder"], **dataclasses.asdict(config)}
            folder = self.stages.folder("fit-rahf", settings)
            offsets, low_rank, _, record = fit_stage(
                folder, lambda ckpt: fit_offsets(self.model, tokenizer, records, layers, config, ckpt)
            )
            seconds["fit_s"] = record["seconds"]
            provenance["fit_loss_first_last"] = record["loss_first_last"]
            kept = ("steps", "batch_size", "lr", "rank", "kl", "l2", "init", "down_lr")
            provenance["rahf"] = {k: getattr(config, k) for k in kept}
        elif fit == "mean":
            offsets = mean_pattern_offsets(records, layers, c.alpha)
        elif fit == "caa":
            offsets = caa_offsets(records, layers)
        elif fit == "pca":
            offsets = pca_offsets(records, layers)
        else:
            raise ValueError(f"unknown fit {fit!r}")
        return FitResult(offsets, low_rank, provenance, seconds)

    def fit_lora(self) -> tuple[nn.Module, dict[str, Any]]:
        """Step 3 as a LoRA adapter 'rahf' on the base model (`fit.fit_lora`: the paper's parameterisation,
        not switchable per request), trained or resumed in its stage folder. Returns the wrapped model
        (`release` unwraps it) and the stage record with the seconds of the stages it used."""
        from .fit import FitConfig, fit_lora

        c = self.config
        records, instruct_record, patterns_record = self.records()
        config = FitConfig(alpha=c.alpha, steps=c.fit_steps, batch_size=c.fit_batch, bf16=c.bf16, seed=c.seed)
        lora = self.instruct_config()
        lora_settings = {"rank": lora.rank, "lora_alpha": lora.lora_alpha, "targets": list(lora.targets), "lr": lora.lr}
        folder = self.stages.folder(
            "fit-lora", {"patterns": patterns_record["folder"], "alpha": c.alpha, "steps": c.fit_steps,
                         "batch_size": c.fit_batch, "seed": c.seed, "bf16": c.bf16, "lora": lora_settings},
        )  # fmt: skip
        with stage_lock(folder) as clock:
            record = read_json(folder / "fit.json")
            model, losses = fit_lora(self.model, self.loaded.tokenizer, records, list(c.layers), config, lora,
                                     folder / "fit.ckpt")  # fmt: skip
            if "seconds" not in record:
                record["seconds"] = clock()
            record["loss_first_last"] = [losses[0], losses[-1]] if losses else None
            record["lora"] = lora_settings
            write_json(folder / "fit.json", record)
        seconds = {
            "instruct_s": instruct_record.get("seconds", float("nan")),
            "collect_s": patterns_record.get("seconds", float("nan")),
            "fit_s": record["seconds"],
        }
        return model, {**record, "stage_seconds": seconds, "instruct_gap": {
            k: instruct_record.get(k) for k in ("gap_before", "gap_after")}}

    def _fit_lora_terms(self) -> FitResult:
        """The 'lora' fit: `fit_lora`'s adapter as per-row LoRA terms of a profile (`fit.lora_terms`)."""
        from .fit import lora_terms

        model, record = self.fit_lora()
        try:
            offsets, lora = lora_terms(model, "rahf")
        finally:
            self.release(model)
        c = self.config
        provenance = {
            "instruct_epochs": c.epochs,
            "instruct_gap": record.get("instruct_gap"),
            "fit_loss_first_last": record.get("loss_first_last"),
            "rahf": {"steps": c.fit_steps, "batch_size": c.fit_batch, "parameterisation": "lora", **record["lora"]},
        }
        return FitResult(offsets, {}, provenance, record["stage_seconds"], lora=lora)

    def profile(self, fit: str, name: str, result: FitResult) -> Any:
        from .fit import make_profile

        data = Path(self.config.data_file).parent.name or Path(self.config.data_file).name
        return make_profile(
            name,
            result.offsets,
            fit=fit,
            fingerprint=self.loaded.fingerprint,
            provenance={**self.base_provenance(), **result.provenance},
            description=(
                f"{'bi-directional ' if self.config.pref_bidirectional else ''}preference-loss offsets from {data}"
                " (pref fit, not RAHF)"
                if fit == "pref"
                else f"RAHF-{self.config.method} profile from {data} ({fit} fit)"
            ),
            position_mode=self.config.position_mode,
            low_rank=result.low_rank or None,
            lora=result.lora or None,
        )

    def calibrate(self, profile: Any, strengths: Sequence[float], base_ppl: float, text: str) -> None:
        """Set the profile's default strength on the held-out calibration pairs (never fit pairs)."""
        from . import evaluate

        strength, rows = evaluate.calibrate_strength(
            self.model, self.loaded.tokenizer, self.split.calib, profile, strengths, base_ppl=base_ppl, text=text,
            budget=self.config.eval_budget, bf16=self.config.bf16,
        )
        if self._calib_unsteered is None:
            score = evaluate.score_pairs(
                self.model, self.loaded.tokenizer, self.split.calib, budget=self.config.eval_budget,
                bf16=self.config.bf16, desc="calibrate unsteered",
            )
            self._calib_unsteered = {"accuracy": score.accuracy, "margin": score.margin, "perplexity": base_ppl}
        profile.default_strength = strength
        profile.provenance["calibration"] = {
            "pairs": len(self.split.calib), "held_out": True, "response_tokens": self.config.eval_response_tokens,
            "unsteered": self._calib_unsteered, "rows": rows, "strength": strength,
        }
