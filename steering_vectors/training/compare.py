"""`rahf compare`: one fair comparison of every method on one preference set.

The same training pairs, seed(s), layers, token budgets and strength grid for every row; every steered
row's default strength is calibrated on the same held-out training pairs; every row is scored on the
same dev pairs over the same reply budget. Rows:

- unsteered; good-instruction prompting (the step-1 "good" instruction as system message);
- closed-form fits from the Dual run's records: mean-pattern, CAA, PCA;
- RAHF-SCIT and RAHF-Dual (step 3 as in the paper, `fit rahf`), each with constant offsets only and with
  low-rank terms;
- `pref` (our own preference-loss fit, not RAHF), constant and with low-rank terms; and, with constant
  offsets, bi-directional (`pref-bidir`: a seeded ±1 per pair, as BiPO trains) and on prompt tokens only
  (`pref-prompt`: trained, scored and served in position mode "prompt");
- the Dual step-1 good adapter alone (SFT on the chosen replies): a ceiling that cannot be switched per
  request.

Columns: accuracy and Δ accuracy at the default strength with a paired bootstrap 95 % interval, margin,
Δ perplexity, accuracy at a matched +5 % perplexity, trainable parameters, pairs and wall time. Each row's
result is kept in the work folder, so an interrupted comparison resumes row by row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from ..core.profile import Profile
from .cli_options import (
    add_generation_eval_options,
    add_generation_options,
    add_run_options,
    check_layers,
    command_line,
    parse_count,
    setup,
)
from .pipeline import FitResult, Run, RunConfig, Stages, read_json, write_json

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    label: str
    kind: str  # none | prompt | profile | adapter
    fit: str = ""
    method: str = "dual"
    rank: int | None = None  # for rahf (rank) and pref (pref_rank) rows: 0 = constant offsets only
    switchable: bool = True
    settings: tuple[tuple[str, Any], ...] = ()  # further RunConfig fields of this row


def rows_for(rank: int) -> list[Row]:
    return [
        Row("unsteered", "unsteered", "none"),
        Row("prompt-good", "good-instruction prompting", "prompt"),
        Row("mean", "mean-pattern (Dual records)", "profile", "mean"),
        Row("caa", "CAA", "profile", "caa"),
        Row("pca", "PCA (RepE)", "profile", "pca"),
        Row("rahf-scit", "RAHF-SCIT, offsets", "profile", "rahf", "scit", 0),
        Row("rahf-scit-rank", f"RAHF-SCIT, offsets + rank {rank}", "profile", "rahf", "scit", rank),
        Row("rahf-dual", "RAHF-Dual, offsets", "profile", "rahf", "dual", 0),
        Row("rahf-dual-rank", f"RAHF-Dual, offsets + rank {rank}", "profile", "rahf", "dual", rank),
        Row("rahf-dual-lora", "RAHF-Dual, LoRA q/v r 8 per row (the paper's form)", "profile", "lora"),
        Row("pref", "pref (not RAHF), offsets", "profile", "pref", "dual", 0),
        Row("pref-rank", f"pref (not RAHF), offsets + rank {rank}", "profile", "pref", "dual", rank),
        Row("pref-bidir", "pref (not RAHF), offsets, bi-directional", "profile", "pref", "dual", 0,
            settings=(("pref_bidirectional", True),)),
        Row("pref-prompt", "pref (not RAHF), offsets on prompt tokens only", "profile", "pref", "dual", 0,
            settings=(("position_mode", "prompt"),)),
        Row("dual-sft", "Dual good adapter alone (SFT on chosen; not switchable)", "adapter", switchable=False),
    ]


def row_config(base: RunConfig, row: Row, seed: int) -> RunConfig:
    changes: dict[str, Any] = {"seed": seed, "method": row.method}
    if row.fit == "rahf":
        changes["rank"] = row.rank
    if row.fit == "pref":
        changes["pref_rank"] = row.rank
    changes.update(row.settings)
    return dataclasses.replace(base, **changes)


def profile_parameters(profile: Any) -> int:
    return (
        sum(o.numel() for o in profile.offsets.values())
        + sum(d.numel() + u.numel() for d, u in profile.low_rank.values())
        + sum(a.numel() + b.numel() for terms in profile.lora.values() for a, b in terms.values())
    )


def lora_parameters(model: torch.nn.Module, adapter: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and f".{adapter}." in n)


class Comparison:
    """The rows of one comparison, computed (or read back) one at a time."""

    def __init__(self, base: RunConfig, loaded: Any, stages: Stages, dev: list[Any], strengths: list[float],
                 out: Path, command: str) -> None:  # fmt: skip
        from .evaluate import neutral_text, perplexity

        self.base, self.loaded, self.stages, self.dev = base, loaded, stages, dev
        self.strengths, self.out, self.command = strengths, out, command
        self.text = neutral_text()
        self.folder = stages.folder(
            "compare", {"run": base.key(), "dev": [p.id for p in dev], "strengths": strengths}
        )
        self.base_ppl = perplexity(loaded.model, loaded.tokenizer, self.text, bf16=base.bf16)
        self._unsteered: Any = None

    def score(self, profile: Any = None, strength: float = 1.0, *, system: str | None = None, desc: str = "") -> Any:
        from .evaluate import score_pairs

        return score_pairs(
            self.loaded.model, self.loaded.tokenizer, self.dev, profile, strength, budget=self.base.eval_budget,
            bf16=self.base.bf16, system=system, desc=desc or "dev",
        )

    def unsteered(self) -> Any:
        if self._unsteered is None:
            cached = read_json(self.folder / "unsteered-scores.json")
            if cached:
                from .evaluate import PreferenceScore

                self._unsteered = PreferenceScore(**cached)
            else:
                self._unsteered = self.score(desc="unsteered")
                write_json(self.folder / "unsteered-scores.json", dataclasses.asdict(self._unsteered))
        return self._unsteered

    def _entry(self, score: Any, ppl: float | None) -> dict[str, Any]:
        from .evaluate import paired_bootstrap

        base = self.unsteered()
        low, high = paired_bootstrap(base, score)
        return {
            "accuracy": score.accuracy,
            "accuracy_gain": score.accuracy - base.accuracy,
            "gain_ci95": [low, high],
            "margin": score.margin,
            "perplexity": ppl,
            "perplexity_rise": None if ppl is None else ppl / self.base_ppl - 1.0,
        }

    def _kept(self, row: Row, seed: int) -> Path:
        return self.folder / f"{row.key}-seed{seed}.safetensors"

    def publish(self, row: Row, seed: int) -> Path | None:
        """Copy the row's calibrated profile from the work folder into `<out>/profiles`, named after `out`
        (`<out name>-<row>-seed<seed>.safetensors`), so that every reported row's file is beside the report,
        whichever run computed it. None for rows without a profile, or computed before profiles were kept."""
        kept = self._kept(row, seed)
        if not kept.is_file():
            return None
        profile = Profile.load(kept)
        profile.name = f"{self.out.name}-{row.key}"
        return profile.save(self.out / "profiles" / f"{profile.name}-seed{seed}.safetensors")

    def cached(self, row: Row, seed: int) -> dict[str, Any] | None:
        """The row's result if a run already computed it, else None."""
        return read_json(self.folder / f"{row.key}-seed{seed}.json") or None

    def result(self, row: Row, seed: int) -> dict[str, Any]:
        path = self.folder / f"{row.key}-seed{seed}.json"
        cached = self.cached(row, seed)
        if cached:
            return cached
        started = time.perf_counter()
        log.info("comparison row %s (seed %d)", row.key, seed)
        result = {"row": row.key, "label": row.label, "seed": seed, "switchable": row.switchable}
        if row.kind == "none":
            result.update(self._entry(self.unsteered(), self.base_ppl), parameters=0, pairs=0, train_s=0.0)
        elif row.kind == "prompt":
            from .instruct import GOOD_INSTRUCTION

            score = self.score(system=GOOD_INSTRUCTION, desc="good instruction")
            result.update(self._entry(score, None), parameters=0, pairs=0, train_s=0.0)
        elif row.kind == "adapter":
            result.update(self._adapter_row(seed))
        else:
            result.update(self._profile_row(row, seed))
        result["row_s"] = time.perf_counter() - started
        write_json(path, result)
        return result

    def generation(self, args: argparse.Namespace, rows: list[Row], seed: int) -> dict[str, Any]:
        """The generation evaluation (`geneval`) of the rows that steer by a profile (their calibrated files,
        seed `seed`) or by the good instruction, over the strength grid; cached in the work folder by its
        settings, so a `--cached-only` rerun reads it back."""
        from .data import load_pairs, resolve_split
        from .geneval import GenRow, evaluate_from_args, judge_file_for
        from .genmetrics import unique_prompts
        from .instruct import GOOD_INSTRUCTION

        grid = list(args.gen_strengths or self.strengths)
        gen_rows: list[GenRow] = []
        for row in rows:
            if row.kind == "prompt":
                gen_rows.append(GenRow(row.key, [], [1.0], system=GOOD_INSTRUCTION, method="prompting"))
            elif row.kind == "profile" and (kept := self._kept(row, seed)).is_file():
                gen_rows.append(GenRow.of_profile(Profile.load(kept), grid, name=row.key))
        if not gen_rows:
            return {}
        judge = judge_file_for(args.judge, args.judges, args.data)
        key = {"rows": [(r.name, r.strengths) for r in gen_rows], "judge": judge.name, "tokens": args.gen_tokens,
               "samples": args.gen_samples, "limit": args.gen_limit, "seed": seed}  # fmt: skip
        path = self.stages.folder("generation", {"compare": self.folder.name, **key}) / "generation.json"
        cached = read_json(path)
        if cached:
            return cached
        if args.cached_only:
            log.info("generation evaluation not computed yet (--cached-only)")
            return {}
        prompts = unique_prompts(load_pairs(resolve_split(args.data, "dev")))
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        result = evaluate_from_args(args, model, tokenizer, prompts, gen_rows, self.base.bf16, judge)
        write_json(path, result)
        return result

    def _adapter_row(self, seed: int) -> dict[str, Any]:
        from .evaluate import perplexity

        run = Run(row_config(self.base, Row("dual-sft", "", "adapter"), seed), self.loaded, self.stages, self.command)
        model, record = run.instructed()
        try:
            model.set_adapter("good")
            params = lora_parameters(model, "good")
            score = self.score(desc="Dual good adapter")
            ppl = perplexity(model, self.loaded.tokenizer, self.text, bf16=self.base.bf16)
        finally:
            run.release(model)
        entry = self._entry(score, ppl)
        return {**entry, "parameters": params, "pairs": len(run.split.pairs), "train_s": record.get("seconds")}

    def _profile_row(self, row: Row, seed: int) -> dict[str, Any]:
        from .evaluate import matched_strength, perplexity

        run = Run(row_config(self.base, row, seed), self.loaded, self.stages, self.command)
        fitted: FitResult = run.fit(row.fit)
        profile = run.profile(row.fit, f"{self.out.name}-{row.key}", fitted)
        started = time.perf_counter()
        run.calibrate(profile, self.strengths, self.base_ppl, self.text)
        calibrate_s = time.perf_counter() - started
        profile.provenance["comparison_row"] = row.key
        profile.save(self._kept(row, seed))  # the work folder keeps it; `publish` copies it into the report
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        strength = profile.default_strength
        ppl = perplexity(model, tokenizer, self.text, profile, strength, bf16=self.base.bf16)
        entry = self._entry(self.score(profile, strength, desc=f"{row.key} x{strength:g}"), ppl)
        matched, matched_ppl = matched_strength(
            model, tokenizer, self.text, profile, self.base_ppl, bf16=self.base.bf16
        )
        at_matched = self.score(profile, matched, desc=f"{row.key} x{matched:.3g}")
        train_s = sum(v for v in fitted.seconds.values() if v is not None and math.isfinite(v)) + calibrate_s
        return {
            **entry,
            "default_strength": strength,
            "matched": {"strength": matched, "perplexity": matched_ppl, "accuracy": at_matched.accuracy,
                        "accuracy_gain": at_matched.accuracy - self.unsteered().accuracy},
            "parameters": profile_parameters(profile),
            "pairs": len(run.split.pairs),
            "train_s": train_s,
            "stage_seconds": {**fitted.seconds, "calibrate_s": calibrate_s},
            "calibration": profile.provenance["calibration"],
            "instruct_gap": profile.provenance.get("instruct_gap"),
            "method": profile.method,
        }  # fmt: skip


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and spread over seeds of one row's numbers."""
    first = dict(results[0])
    if len(results) > 1:
        for key in ("accuracy", "accuracy_gain", "margin", "perplexity_rise"):
            values = [r[key] for r in results if r.get(key) is not None]
            if values:
                mean = sum(values) / len(values)
                sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
                first[f"{key}_seeds"] = {"mean": mean, "sd": sd, "values": values}
        keep = ("seed", "accuracy", "accuracy_gain", "gain_ci95", "perplexity_rise", "default_strength", "matched",
                "instruct_gap")  # fmt: skip
        first["per_seed"] = [{k: r.get(k) for k in keep} for r in results]
    first["seeds"] = [r["seed"] for r in results]
    return first


def _seed_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One table per row run with several seeds: each seed's step-1 gap beside what its profile did."""
    lines: list[str] = []
    for r in rows:
        if not r.get("per_seed"):
            continue
        lines += ["", f"{r['label']}, seed by seed (a seed draws another training sample; every training step "
                      "is repeated):", "",
                  "| seed | step-1 gap after (share positive, n) | default strength | accuracy | Δ acc [95 % CI] | "
                  "Δ ppl | acc. at +5 % ppl (strength) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for s in r["per_seed"]:
            after = (s.get("instruct_gap") or {}).get("gap_after") or {}
            gap = (f"{after['mean_gap']:+.3f} ({_pct(after.get('accuracy'))}, {after.get('n')})"
                   if "mean_gap" in after else "–")  # fmt: skip
            low, high = s["gain_ci95"]
            matched = s.get("matched")
            at_matched = f"{_pct(matched['accuracy'])} ({matched['strength']:.3g})" if matched else "–"
            rise = "–" if s.get("perplexity_rise") is None else f"{_pct(s['perplexity_rise'], True)} %"
            strength = "–" if s.get("default_strength") is None else f"{s['default_strength']:.3g}"
            lines.append(
                f"| {s['seed']} | {gap} | {strength} | {_pct(s['accuracy'])} | {_pct(s['accuracy_gain'], True)} "
                f"[{_pct(low, True)}, {_pct(high, True)}] | {rise} | {at_matched} |"
            )
    return lines


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f} %"


def _strength(row: dict[str, Any], grid: list[float]) -> str:
    """A row's default strength for the table; one below the grid (every grid strength broke the fluency
    cap, so calibration bisected below it) says so."""
    strength = row.get("default_strength")
    if strength is None:
        return "–"
    return f"{strength:.3g}" + (" (below grid)" if grid and strength < min(grid) else "")


def write_comparison(report: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    rows = report["rows"]
    figure, axis = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r.get("perplexity_rise") is None:
            axis.axhline(100 * r["accuracy"], linestyle=":", color="grey", linewidth=1)
            axis.annotate(r["row"], (0.0, 100 * r["accuracy"]), fontsize=7, color="grey")
            continue
        xs, ys = [100 * r["perplexity_rise"]], [100 * r["accuracy"]]
        if r.get("matched"):
            xs.append(100 * (r["matched"]["perplexity"] / report["base_perplexity"] - 1))
            ys.append(100 * r["matched"]["accuracy"])
        axis.plot(xs, ys, marker="o", label=r["row"])
    axis.axvline(10, color="red", linestyle=":", label="+10 % perplexity")
    axis.set(xlabel="perplexity rise on neutral text (%)", ylabel="dev preference accuracy (%)",
             title=f"{report['title']}\ndefault strength (first point) and matched +5 % perplexity")  # fmt: skip
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "comparison.png", dpi=110)
    plt.close(figure)

    lines = [f"# {report['title']}", "", "Reproduce with:", "", "```", report["command"], "```", ""]
    lines += [
        f"Dev pairs: {report['dev_pairs']} (whole split); reply budget {report['eval_response_tokens']} tokens "
        f"(prompt {report['prompt_tokens']}); training pairs {report['train_pairs']} (budgets "
        f"{report['prompt_tokens']}/{report['response_tokens']}), calibration on {report['calib_pairs']} held-out "
        f"training pairs over strengths {report['strengths']}; layers {report['layers']}; α {report['alpha']}; "
        f"seeds {report['seeds']}; CPU: {report['cpu']}; bf16 autocast {report['bf16']}. Unsteered perplexity "
        f"{report['base_perplexity']:.2f}.",
        "",
        "| method | switchable | default strength | accuracy | Δ acc (pts) [95 % CI] | margin | Δ ppl | "
        "acc. at +5 % ppl (strength) | trainable params | pairs | wall time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        low, high = r["gain_ci95"]
        gain = f"{_pct(r['accuracy_gain'], True)} [{_pct(low, True)}, {_pct(high, True)}]"
        gain = "–" if r["row"] == "unsteered" else gain
        seeds = r.get("accuracy_gain_seeds")
        if seeds:
            each = ", ".join(_pct(v, True) for v in seeds["values"])
            gain += f"; {len(seeds['values'])} seeds: {_pct(seeds['mean'], True)} ± {100 * seeds['sd']:.1f} ({each})"
        matched = r.get("matched")
        at_matched = f"{_pct(matched['accuracy'])} ({matched['strength']:.3g})" if matched else "–"
        wall = r.get("train_s")
        lines.append(
            f"| {r['label']} | {'yes' if r['switchable'] else 'no'} | {_strength(r, report['strengths'])} | "
            f"{_pct(r['accuracy'])} | {gain} | {r['margin']:.4f} | {_pct(r['perplexity_rise'], True)}"
            f"{'' if r['perplexity_rise'] is None else ' %'} | {at_matched} | {r['parameters']:,} | {r['pairs']} | "
            f"{'–' if not wall else f'{wall / 60:.1f} min'} |"
        )
    gaps = [(r["label"], r["instruct_gap"]) for r in rows if r.get("instruct_gap")]
    if gaps:
        lines += [
            "",
            "Step 1's likelihood gap on held-out training pairs (mean gap; share of pairs with a positive gap):",
            "",
        ]
        seen = set()
        for label, gap in gaps:
            method = label.split(",")[0]
            if method in seen:
                continue
            seen.add(method)
            before, after = gap.get("gap_before") or {}, gap.get("gap_after") or {}
            lines.append(
                f"- {method}: before {before.get('mean_gap', float('nan')):+.4f} ({_pct(before.get('accuracy'))}), "
                f"after {after.get('mean_gap', float('nan')):+.4f} ({_pct(after.get('accuracy'))}), "
                f"n = {after.get('n')}"
            )
    lines += _seed_lines(rows)
    if report.get("carried_over"):
        lines += ["", "Carried over from this folder's earlier report (computed with the same settings in a work "
                  f"folder this run did not have): {', '.join(report['carried_over'])}."]  # fmt: skip
        if report.get("carried_cpu") and report["carried_cpu"] != report.get("cpu"):
            lines[-1] += f" The CPU of that report: {report['carried_cpu']} (wall times differ by machine)."
    if report.get("pending"):
        lines += ["", "Not computed yet (this report was written with `--cached-only` from the rows runs had "
                  f"finished): {', '.join(report['pending'])}."]  # fmt: skip
    lines += ["", "![accuracy against perplexity](comparison.png)", ""]
    if report.get("generation"):
        from .geneval import generation_lines, plot_generation

        plot_generation(report["generation"], out / "generation.png")
        lines += [*generation_lines(report["generation"]), "", "![win rate and loop rate vs strength]"
                  "(generation.png)", ""]  # fmt: skip
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def register(sub: argparse._SubParsersAction) -> None:
    compare = sub.add_parser("compare", help="compare every steering method on one preference set, fairly")
    compare.add_argument("--data", required=True, help="folder with train.jsonl and dev.jsonl")
    compare.add_argument("--out", type=Path, required=True, help="report folder (profiles go to <out>/profiles)")
    compare.add_argument("--title", default=None)
    add_run_options(compare)
    compare.add_argument("--rows", default="all", help="comma-separated row keys, or 'all'")
    compare.add_argument("--seeds", default="0", help="seeds of the rows named by --seed-rows (first = all rows)")
    compare.add_argument("--seed-rows", default="rahf-dual-rank,pref-rank", help="rows run with every seed")
    compare.add_argument("--eval-pairs", type=parse_count, default=1000, help="dev pairs (seeded sample)")
    compare.add_argument("--threads", type=parse_count, default=None)
    add_generation_options(compare)
    add_generation_eval_options(compare)
    compare.add_argument("--cached-only", action="store_true",
                         help="compute no row: report the rows earlier runs finished (in the work folder, or in "
                              "--out's report of the same comparison) and list the others as pending")
    compare.set_defaults(handler=run_compare)


def earlier_rows(report: dict[str, Any], stage_folder: str) -> dict[str, dict[str, Any]]:
    """The row summaries of `report` (the one already in --out), when it was made from the same comparison (same
    settings, dev pairs and strengths: the same stage folder name); else none. `--cached-only` carries them
    over for rows this machine's work folder holds less of, so that a report finished over several machines
    keeps every row."""
    if report.get("stage_folder") != stage_folder:
        return {}
    return {r["row"]: r for r in report.get("rows", []) if "row" in r and "seeds" in r}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        else:
            name = "unknown CPU"
    except OSError:
        name = "unknown CPU"
    from .pipeline import cpu_has_bf16_units

    return f"{name}, {torch.get_num_threads()} threads, {'with' if cpu_has_bf16_units() else 'no'} bf16 units"


def run_compare(args: argparse.Namespace) -> int:
    from ..core.models import check_model, default_cache_dir, load_model
    from .data import load_pairs, resolve_split, sample_pairs
    from .pipeline import resolve_bf16

    setup(args)
    bf16 = resolve_bf16(args.bf16, args.device)
    check_model(args.model)
    data_file = resolve_split(args.data, "train")
    base = RunConfig.from_args(args, data_file, bf16)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    seed_rows = {s.strip() for s in args.seed_rows.split(",") if s.strip()}
    rows = rows_for(args.rank)
    if args.rows != "all":
        wanted = [k.strip() for k in args.rows.split(",") if k.strip()]
        unknown = sorted(set(wanted) - {r.key for r in rows})
        if unknown:
            raise SystemExit(f"rahf compare: error: unknown rows {unknown}; choose from {[r.key for r in rows]}")
        rows = [next(r for r in rows if r.key == key) for key in dict.fromkeys(wanted)]  # computed in this order
    dev = sample_pairs(load_pairs(resolve_split(args.data, "dev")), args.eval_pairs, seed=0)
    loaded = load_model(args.model, device=args.device)
    check_layers(list(base.layers), loaded.model)
    stages = Stages(args.work_dir or default_cache_dir() / "runs")
    comparison = Comparison(base, loaded, stages, dev, list(args.strengths), args.out, command_line())
    started = time.perf_counter()
    generation: dict[str, Any] = {}
    summaries: list[dict[str, Any]] = []
    pending: list[str] = []
    carried: list[str] = []
    order = {r.key: i for i, r in enumerate(rows_for(args.rank))}
    # the command that computes every row (with --cached-only it reports only those earlier runs finished)
    command = command_line().replace(" --cached-only", "")

    def write() -> Path:
        summaries.sort(key=lambda r: order[r["row"]])  # the report lists rows in one fixed order
        report = {
            "title": args.title or f"Steering methods on {Path(args.data).name}",
            "command": command,
            "rows": summaries,
            "dev_pairs": len(dev),
            "train_pairs": base.max_pairs,
            "calib_pairs": base.calib_pairs,
            "prompt_tokens": base.prompt_tokens,
            "response_tokens": base.response_tokens,
            "eval_response_tokens": base.eval_response_tokens,
            "strengths": list(args.strengths),
            "layers": list(base.layers),
            "alpha": base.alpha,
            "seeds": seeds,
            "cpu": cpu_name(),
            "bf16": bf16,
            "base_perplexity": comparison.base_ppl,
            "settings": base.key(),
            "seconds_this_run": time.perf_counter() - started,
            "stage_folder": comparison.folder.name,
            "pending": pending,
            "carried_over": carried,
        }
        if carried:
            report["carried_cpu"] = earlier_cpu
        if generation:
            report["generation"] = generation
        return write_comparison(report, args.out)

    before = (read_json(args.out / "report.json") or {}) if args.cached_only else {}
    earlier = earlier_rows(before, comparison.folder.name)
    earlier_cpu = before.get("carried_cpu") or before.get("cpu")  # where the carried rows were computed
    for row in rows:
        wanted = seeds if row.key in seed_rows else seeds[:1]
        if args.cached_only:  # only what runs have computed so far; the rest is listed as pending
            found = {seed: comparison.cached(row, seed) for seed in wanted}
            results = [result for result in found.values() if result is not None]
            kept = earlier.get(row.key)
            if kept and set(kept["seeds"]) <= set(wanted) and len(kept["seeds"]) > len(results):
                # the report already in --out holds more of this row than this work folder does: a run on
                # another machine computed it with the same settings, so its summary is carried over as it was
                summaries.append(kept)
                carried.append(row.key)
                pending.extend(f"{row.key} (seed {seed})" for seed in wanted if seed not in kept["seeds"])
                continue
            pending.extend(f"{row.key} (seed {seed})" for seed, result in found.items() if result is None)
            if not results:
                continue
        else:
            results = [comparison.result(row, seed) for seed in wanted]
        for result in results:
            comparison.publish(row, result["seed"])
        summaries.append(summarise(results))
        if not args.cached_only:
            write()  # after every row, so a partial comparison is readable
    if not summaries:
        raise SystemExit("rahf compare: error: --cached-only: no row of this comparison is computed yet")
    if args.generation:
        generation.update(comparison.generation(args, [r for r in rows if r.key in {s["row"] for s in summaries}],
                                                seeds[0]))  # fmt: skip
    path = write()
    print(json.dumps({"report": str(path), "rows": [r["row"] for r in summaries], "pending": pending}, indent=2))
    return 0

