"""Building the shipped judges: one per preference set and kind, measured on its judge-held-out pairs.

Knows the steps of a build — the judge split of a set's training file, resumable feature extraction (kind
"head") or training (kind "lora") in a work folder, the held-out pair accuracy next to the "longer reply
wins" baseline, the judge file and a JSON report — and which kind to keep (the better held-out accuracy).
Knows nothing about argument parsing (bench/judge.py) or about what the judge is used for (`genmetrics`).

One judge per set, not one for both: the sets reward different things (hh_harmless prefers the short,
evasive reply that alpaca_helpful's judge would rightly rank low), so a pooled judge would learn a compromise
that fits neither set's profiles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch

from ..core.layers import find_decoder_layers
from .data import PreferencePair, load_pairs
from .judge import (
    JUDGE_BUDGET,
    SPLIT_RULE,
    HeadJudge,
    LoraJudge,
    LoraJudgeConfig,
    accuracy_interval,
    diff_accuracy,
    feature_layers,
    judge_split,
    length_baseline,
    pair_sequences,
    pooled_features,
    save_judge,
    select_head,
    train_lora_judge,
    training_subset,
)
from .pipeline import digest, file_digest, read_json, write_json

log = logging.getLogger(__name__)

SETS = ("hh_harmless", "alpaca_helpful")


def cpu_name() -> str:
    """The CPU's model name and its bf16 / VNNI flags, for the report (figures differ between CPU kinds)."""
    name, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    extra = sorted(flags & {"avx512_bf16", "avx512_vnni", "amx_bf16", "avx2"})
    return f"{name} ({', '.join(extra) or 'no avx2'})"


def cached_features(
    model: torch.nn.Module, tokenizer: Any, pairs: list[PreferencePair], layers: list[int], folder: Path, *,
    bf16: bool, chunk: int = 64, desc: str = "features",
) -> torch.Tensor:  # fmt: skip
    """`pooled_features` of the pairs' chosen and rejected sequences, computed in chunks of `chunk` pairs that are
    kept in `folder` as they finish, so an interrupted build resumes from the last chunk."""
    folder.mkdir(parents=True, exist_ok=True)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    parts, computed = [], 0
    starts = range(0, len(pairs), chunk)
    for number, start in enumerate(starts):
        path = folder / f"chunk-{start:05d}.pt"
        if path.is_file():
            parts.append(torch.load(path))
            continue
        examples = pair_sequences(tokenizer, pairs[start : start + chunk], JUDGE_BUDGET)
        part = pooled_features(model, examples, layers, pad=pad, bf16=bf16,
                               desc=f"{desc} {number + 1}/{len(starts)}")  # fmt: skip
        torch.save(part.to(torch.float16), path)  # half the disk; the head standardises in float64 anyway
        computed += 1
        parts.append(part.to(torch.float16))
    if reused := sum((folder / f"chunk-{start:05d}.pt").is_file() for start in starts) - computed:
        log.info("%s: %d of %d feature chunks from an earlier run", folder.name, reused, len(starts))
    return torch.cat(parts).float()


def build_head(
    loaded: Any, data_set: str, train: list[PreferencePair], held: list[PreferencePair], work: Path, out: Path,
    *, bf16: bool, curve_sizes: tuple[int, ...] = (64, 128),
) -> dict[str, Any]:  # fmt: skip
    """Kind "head" for one set: features, cross-validated head on judge-train, accuracy on judge-held-out,
    the judge file `out/<set>-head.safetensors`, and the held-out accuracy of heads fitted on `curve_sizes` pairs
only (the comparison with a "lora" judge trained on as few). Returns the report entry."""
    started = time.perf_counter()
    model, tokenizer = loaded.model, loaded.tokenizer
    layers = feature_layers(len(find_decoder_layers(model)))
    key = digest({"pairs": [p.id for p in train + held], "model": loaded.fingerprint.digest, "layers": layers,
                  "budget": dataclasses.astuple(JUDGE_BUDGET), "bf16": bf16})  # fmt: skip
    folder = work / f"{data_set}-features-{key}"
    cached = len(list(folder.glob("chunk-*.pt")))
    features = cached_features(model, tokenizer, train + held, layers, folder, bf16=bf16, desc=f"{data_set} features")
    extracted = time.perf_counter() - started  # of this run: chunks from an earlier run cost nothing here
    train_x, held_x = features[: 2 * len(train)], features[2 * len(train) :]
    head, table = select_head(train_x, train, layers)
    selected = time.perf_counter() - started - extracted

    def differences(x: torch.Tensor) -> torch.Tensor:
        rewards = head.rewards(head.select(x, layers))
        return rewards[0::2] - rewards[1::2]

    def accuracy(x: torch.Tensor) -> float:
        return diff_accuracy(differences(x))

    curve = []
    for n in curve_sizes:  # at equal pairs with a "lora" judge trained on `training_subset(train, n)`
        if n >= len(train):
            continue
        where = {id(p): i for i, p in enumerate(train)}
        rows = torch.tensor([where[id(p)] for p in training_subset(train, n)])
        both = torch.stack([2 * rows, 2 * rows + 1], dim=1).reshape(-1)
        small, _ = select_head(train_x[both], [train[i] for i in rows.tolist()], layers)
        diff = small.rewards(small.select(held_x, layers))
        curve.append({"train_pairs": n, "held_accuracy": diff_accuracy(diff[0::2] - diff[1::2]),
                      "chosen": {"layers": small.layers, "pools": small.pools, "l2": small.l2}})  # fmt: skip
    judge = HeadJudge(model, tokenizer, head, list(head.layers), bf16=bf16)
    probe = held[:4]  # the judge's own scoring path gives the rewards the features gave (cached in float16)
    scored = judge.score([p.prompt for p in probe], [p.chosen for p in probe])
    check = float((scored - head.rewards(head.select(held_x[0 : 2 * len(probe) : 2], layers))).abs().max())
    report = {
        "kind": "head", "set": data_set, "train_pairs": len(train), "held_pairs": len(held),
        "held_accuracy": accuracy(held_x), "held_interval": accuracy_interval(differences(held_x), held),
        "held_prompts": len({json.dumps(p.prompt, sort_keys=True) for p in held}), "train_accuracy": accuracy(train_x),
        "cv_accuracy": max(r["cv_accuracy"] for r in table), "length_baseline_held": length_baseline(held),
        "chosen": {"layers": head.layers, "pools": head.pools, "l2": head.l2}, "cv_table": table,
        "feature_chunks_from_earlier_run": cached, "check_max_abs_reward_diff": check, "bf16": bf16, "curve": curve,
        "seconds": {"features": extracted, "select_fit": selected, "total": time.perf_counter() - started},
    }  # fmt: skip
    save_judge(out / f"{data_set}-head.safetensors", judge, data_set=data_set, fingerprint=loaded.fingerprint,
               report=_slim(report))  # fmt: skip
    return report


def build_lora(
    load: Any, data_set: str, train: list[PreferencePair], held: list[PreferencePair], work: Path, out: Path,
    *, bf16: bool, config: LoraJudgeConfig,
) -> dict[str, Any]:  # fmt: skip
    """Kind "lora" for one set, trained (or resumed) in `work`, on a model of its own from `load()`; accuracy
    on judge-held-out; the judge file `out/<set>-lora.safetensors`. Returns the report entry."""
    started = time.perf_counter()
    loaded = load()
    config = dataclasses.replace(config, bf16=bf16)
    key = digest({"pairs": [p.id for p in train], "model": loaded.fingerprint.digest,
                  "config": dataclasses.asdict(config), "budget": dataclasses.astuple(JUDGE_BUDGET)})  # fmt: skip
    folder = work / f"{data_set}-lora-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    record = read_json(folder / "train.json")
    loaded.model.requires_grad_(False)
    reward, losses = train_lora_judge(loaded.model, loaded.tokenizer, train, config, folder / "train.ckpt")
    trained = record.get("seconds") or time.perf_counter() - started  # a resumed run keeps the first full time
    write_json(folder / "train.json", {"seconds": trained})
    edge = max(1, min(20, len(losses) // 4))  # mean loss of the first and the last quarter, at most 20 steps each
    judge = LoraJudge(reward, loaded.tokenizer, bf16=bf16)
    prompts = [p.prompt for p in held]
    diff = judge.score(prompts, [p.chosen for p in held]) - judge.score(prompts, [p.rejected for p in held])
    held_score = {"accuracy": diff_accuracy(diff), "margin": float(diff.mean())}
    report = {
        "kind": "lora", "set": data_set, "train_pairs": len(training_subset(train, config.max_pairs, config.seed)),
        "held_pairs": len(held),
        "held_accuracy": held_score["accuracy"], "held_margin": held_score["margin"],
        "held_interval": accuracy_interval(diff, held),
        "length_baseline_held": length_baseline(held), "bf16": bf16,
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k not in ("bf16", "checkpoint_every")},
        "loss_first_last": [_mean(losses[:edge]), _mean(losses[-edge:])], "loss_window": edge,
        "steps": len(losses), "seconds": {"train": trained, "total": time.perf_counter() - started},
    }  # fmt: skip
    save_judge(out / f"{data_set}-lora.safetensors", judge, data_set=data_set, fingerprint=loaded.fingerprint,
               report=_slim(report))  # fmt: skip
    return report


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _slim(report: dict[str, Any]) -> dict[str, Any]:
    """What a judge file's metadata keeps of its report (the cross-validation table stays in report.json)."""
    return {k: v for k, v in report.items() if k != "cv_table"}


def keep_better(report: dict[str, Any]) -> dict[str, str]:
    """Per set, the kind with the better judge-held-out accuracy among those built (ties: "head", the cheaper
    one to run)."""
    kept = {}
    for data_set, kinds in report.get("judges", {}).items():
        ranked = sorted(kinds.items(), key=lambda kv: (-kv[1]["held_accuracy"], kv[0] != "head"))
        if ranked:
            kept[data_set] = ranked[0][0]
    return kept


def kept_judge_file(directory: Path, data_set: str) -> Path:
    """The file of the kind kept for `data_set` in a judges folder (its report.json says which)."""
    kind = read_json(directory / "report.json").get("kept", {}).get(data_set)
    if kind is None:
        raise FileNotFoundError(f"{directory / 'report.json'}: no judge kept for {data_set}; run bench/judge.py")
    return directory / f"{data_set}-{kind}.safetensors"


def build(
    data_root: Path, sets: list[str], kinds: list[str], out: Path, work: Path, *, bf16: bool,
    lora: LoraJudgeConfig | None = None, head_pairs: int | None = None, command: str = "",
) -> dict[str, Any]:  # fmt: skip
    """The whole build: for each set and kind, the judge file and its entry in `out/report.json` (entries of
    kinds not rebuilt this time are kept), and the kept kind per set. `head_pairs`: the head kind learns from a
    seeded sample of this many judge-train pairs (`training_subset`; all when None)."""
    from ..core.models import load_model

    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "report.json"
    report = read_json(report_path)
    report.update({"split_rule": SPLIT_RULE, "cpu": cpu_name(), "torch_threads": torch.get_num_threads(),
                   "budget": {"prompt": JUDGE_BUDGET.prompt, "response": JUDGE_BUDGET.response}})  # fmt: skip
    report.setdefault("judges", {})
    report.setdefault("commands", {})
    loaded = load_model() if "head" in kinds else None
    for data_set in sets:
        data_file = data_root / data_set / "train.jsonl"
        split = judge_split(load_pairs(data_file))
        log.info("%s: %d judge-train and %d judge-held-out pairs", data_set, len(split.train), len(split.held))
        for kind in kinds:
            if kind == "head":
                train = training_subset(split.train, head_pairs)  # a seeded sample when CPU time is short
                entry = build_head(loaded, data_set, train, split.held, work, out, bf16=bf16)
            else:
                entry = build_lora(load_model, data_set, split.train, split.held, work, out, bf16=bf16,
                                   config=lora or LoraJudgeConfig())  # fmt: skip
            entry["data_digest"] = file_digest(data_file)
            report = {**read_json(report_path), **{k: v for k, v in report.items() if k not in ("judges", "commands")}}
            report.setdefault("judges", {}).setdefault(data_set, {})[kind] = entry  # read again: another build of
            report.setdefault("commands", {})[f"{data_set}/{kind}"] = command  # another kind may have written since
            report["kept"] = keep_better(report)
            write_json(report_path, report)
            print(f"{data_set} {kind}: held-out pair accuracy {100 * entry['held_accuracy']:.1f} % of "
                  f"{entry['held_pairs']} pairs (trained on {entry['train_pairs']}; longer-reply baseline "
                  f"{100 * entry['length_baseline_held']:.1f} %), {entry['seconds']['total']:.0f} s", flush=True)
    return report
