"""The result tables of profiles/README.md and docs/judge.md, rendered from the stored results only.

    python bench/tables.py             # rewrite the tables in both files
    python bench/tables.py --check     # exit 1 and print a diff where a file's tables differ from the data
    python bench/tables.py --rerun     # first rerun the generation benchmarks the manifest names, then rewrite

A table lives between marker comments, `<!-- tables:NAME -->` and `<!-- /tables -->`; everything outside the
markers is left as it is, byte for byte. NAME is a key of `MANIFEST`: `profiles-<set>` (profiles/README.md: a
set's shipped profiles, likelihood beside replies), `sampled...` (docs/judge.md: sampled replies, per seed, of runs
with `--samples`) or any other name (docs/judge.md: greedy replies per strength, e.g. `generation`).
Each line of the manifest is one profile's run: its `bench/generation.py` JSON, the profile file and
the note beside its name; adding a run means adding a line.

Where each number comes from:
- replies (win rate vs unsteered [95 % CI], loops, refusals, perplexity; the strength chosen on dev half A and
  the reason when it is 0): the line's JSON (`bench/generation.py --out`, either of its layouts), half B;
- the file default: the profile file itself (`default_strength`), so a file whose default was changed after its
  run (`bench/generation.py --adopt-strength`) shows its present default; a former file (`file=None`) shows the
  default its JSON recorded;
- calibration accuracy at 1: the profile's `provenance.calibration`;
- dev accuracy at 1 and dev Δ perplexity: the line's `dev` report, a `rahf compare` report.json (one row) or a
  `rahf eval` report.json.

`--check` also compares each shipped profile's `provenance.generation` (what the playground and `rahf profiles
show` display) with the JSON its line names, and fails when they differ.

`--rerun` calls, for each JSON of a line with a profile file, `bench/generation.py` with the set, strengths,
reply length, repetition penalty (none where the requests set none), sampled sets and conditions recorded in that
JSON, writing the JSON again; a profile whose generation
section came from that JSON is annotated again in the same call (`--annotate`, tensors and default strength
unchanged). Each run takes 5–35 minutes on a 2-core CPU. Lines without a profile file (a former profile's run,
kept for comparison) are not rerun.

Knows the manifest, the layouts of the result files and the tables' markdown. Knows nothing about how the
results are measured (bench/generation.py, `rahf eval`, `rahf compare`).
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.generation import library_layout  # noqa: E402
from steering_vectors.core.errors import ProfileError  # noqa: E402
from steering_vectors.core.profile import Profile  # noqa: E402


@dataclass(frozen=True)
class Dev:
    """Where a profile's dev-split likelihood result is: a `rahf compare` report (`row`: its row, seed 0) or a
    `rahf eval` report (`row` None: its entry for the profile)."""

    path: str
    row: str | None = None


@dataclass(frozen=True)
class Line:
    """One profile's run in one table."""

    name: str  # the profile's name, its row in the JSON
    json: str  # bench/generation.py's result
    note: str  # beside the name: how the profile was made
    show: tuple[float, ...] | None = ()  # strengths shown beside the chosen one and the file default; None: all
    file: str | None = "profiles/{name}.safetensors"  # None: not a shipped file (its JSON's default is shown)
    label: str | None = None  # the name shown, when not `name`
    dev: Dev | None = None  # profiles/README.md's likelihood columns
    pairs: str = "pairs"  # what its calibration pairs are called

    @property
    def profile_path(self) -> str | None:
        return self.file.format(name=self.name) if self.file is not None else None


COMPARISON = "profiles/comparison/alpaca_helpful/profiles/{name}-seed0.safetensors"  # rows of `rahf compare`
SETS = {"alpaca_helpful": "benign instructions", "hh_harmless": "red-team requests"}
DOCUMENTS = ("profiles/README.md", "docs/judge.md")

MANIFEST: dict[str, tuple[Line, ...]] = {
    # profiles/README.md, "Likelihood and replies, side by side"
    "profiles-alpaca_helpful": (
        Line("helpful", "docs/bench-generation-helpful-decoding.json",
             "**RAHF-Dual**, constant offsets (`rahf-dual/rahf`), with `repetition_penalty` 1.15 as its decoding "
             "default (replies as a request gets them)",
             show=(1.0,), dev=Dev("profiles/comparison/alpaca_helpful/report.json", row="rahf-dual")),
        Line("helpful-pref", "docs/bench-generation-helpful-pref.json",
             "`pref`: offsets fitted on the preference loss (**not RAHF**)",
             dev=Dev("profiles/helpful-pref-report/whole-replies/report.json")),
    ),
    "profiles-hh_harmless": (
        Line("harmless", "docs/bench-generation-harmless-decoding.json",
             "**RAHF-Dual** on the refusal pairs, LoRA q/v r 8 per row (`rahf-dual/lora`), with a condition and "
             "`repetition_penalty` 1.15 as its decoding default (replies as a request gets them)",
             show=None, dev=Dev("profiles/harmless-report/whole-replies/report.json"), pairs="refusal pairs"),
        Line("harmless-pref", "docs/bench-generation-harmless-pref.json",
             "`pref` with rank-8 input-dependent terms (**not RAHF**)",
             dev=Dev("profiles/harmless-pref-report/whole-replies/report.json")),
    ),
    # docs/judge.md, "Results: replies of the shipped profiles"
    "generation": (
        Line("helpful", "docs/bench-generation-helpful-decoding.json", "RAHF-Dual offsets; its decoding default, "
             "repetition_penalty 1.15", show=None),
        Line("helpful", "docs/bench-generation-helpful.json", "the same offsets before they carried a decoding default",
             show=None, file=None, label="helpful, no penalty"),
        Line("helpful", "docs/bench-generation-helpful-rp115.json", "the same offsets; repetition_penalty 1.15 on "
             "every request, the unsteered ones too", show=None, file=None, label="helpful, penalty on both"),
        Line("helpful-pref", "docs/bench-generation-helpful-pref.json", "pref, not RAHF", show=(0.5,)),
        Line("harmless", "docs/bench-generation-harmless-decoding.json", "RAHF-Dual LoRA on the refusal pairs; its "
             "condition honoured and its decoding default, repetition_penalty 1.15, where it acts", show=None),
        Line("harmless", "docs/bench-generation-harmless.json", "the same tensors before they carried a decoding "
             "default; the condition not read: every prompt steered", show=None, file=None,
             label="harmless, no penalty"),
        Line("harmless", "docs/bench-generation-harmless-rp115.json", "the same tensors; repetition_penalty 1.15 on "
             "every request, the unsteered ones too; every prompt steered", show=None, file=None,
             label="harmless, penalty on both"),
        Line("harmless", "docs/bench-generation-harmless-former.json", "RAHF-Dual LoRA, all pairs; 4 December",
             show=(0.5,), file=None, label="former harmless"),
        Line("harmless-pref", "docs/bench-generation-harmless-pref.json", "pref, not RAHF"),
    ),
    # docs/judge.md, "Other ways to steer, judged by their replies": which tokens are steered, and pref variants
    # (the comparison's rows: same pairs, budgets and seed); copies made by `rahf profiles copy --position`
    "generation-methods": (
        Line("helpful", "docs/bench-generation-helpful.json", "RAHF-Dual offsets, every token, no penalty", show=None,
             file=None),
        Line("helpful-prompt", "docs/bench-generation-helpful-prompt.json",
             "the same offsets on the prompt's tokens only", show=None, file=None),
        Line("alpaca_helpful-pref", "docs/bench-generation-helpful-pref-row.json", "not RAHF, every token",
             show=None, file=COMPARISON, label="pref"),
        Line("alpaca_helpful-pref-bidir", "docs/bench-generation-helpful-pref-bidir.json",
             "not RAHF, bi-directional", show=None, file=COMPARISON, label="pref-bidir"),
        Line("alpaca_helpful-pref-prompt", "docs/bench-generation-helpful-pref-prompt.json",
             "not RAHF, trained and served on the prompt's tokens only", show=None, file=COMPARISON,
             label="pref-prompt"),
        Line("harmless", "docs/bench-generation-harmless.json", "RAHF-Dual LoRA, every token, no penalty", show=None,
             file=None),
        Line("harmless-prompt", "docs/bench-generation-harmless-prompt.json", "the same, prompt tokens only",
             show=None, file=None),
        Line("harmless-generated", "docs/bench-generation-harmless-generated.json",
             "the same, generated tokens only", show=None, file=None),
    ),
    # docs/judge.md, "Sampled replies": seeded samples beside the greedy replies (bench/generation.py --samples)
    "sampled": (
        Line("helpful", "docs/bench-generation-helpful-sampled.json", "RAHF-Dual offsets", file=None,
             label="helpful, no penalty"),
        Line("helpful", "docs/bench-generation-helpful-decoding.json", "RAHF-Dual offsets; repetition_penalty 1.15 "
             "where it acts"),
        Line("harmless", "docs/bench-generation-harmless-decoding.json", "RAHF-Dual LoRA; condition honoured, "
             "repetition_penalty 1.15 where it acts"),
    ),
}  # fmt: skip

CALIBRATION_AT = 1.0  # the strength of the likelihood columns (every shipped file was calibrated at 1)
DEV_AT = 1.0
MAX_PPL_RISE = 0.10  # genmetrics.choose_strength_half_split's perplexity limit, to say why 0 was chosen
_OPEN = re.compile(r"<!-- tables:(?P<name>[\w.-]+) -->\n")
_CLOSE = "<!-- /tables -->"
_REGION = re.compile(r"(<!-- tables:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /tables -->)", re.S)


class TableError(Exception):
    """A marker, a manifest line or a result file that does not make a table."""


# --- numbers as the tables write them ---


def pct(share: float | None) -> str:
    if share is None or math.isnan(share):
        return "–"
    return "0 %" if share == 0 else "100 %" if share == 1 else f"{100 * share:.1f} %"


def bound(share: float) -> str:
    return "100" if share == 1 else f"{100 * share:.1f}"


def signed(points: float) -> str:
    text = f"{abs(points):.1f}"
    return ("−" if points < 0 and text != "0.0" else "+") + text


def strength_text(strength: float) -> str:
    return f"{strength:g}"


# --- the stored results ---


@dataclass(frozen=True)
class Run:
    """One profile's generation result, read from a bench/generation.py JSON; rates of half B."""

    path: str
    name: str
    data_set: str
    prompts: int
    half_b: int
    chosen: float
    zero_reason: str  # why half A chose 0 (no steered strength met a limit), "" otherwise
    file_default: float | None
    unsteered: dict[str, float]  # loop_rate, refusal_rate, perplexity
    strengths: dict[float, dict[str, Any]]  # half B: loop_rate, refusal_rate, perplexity, win {win_rate, low, high}
    repetition_penalty: float | None  # None: the requests set none (a profile's decoding default applied)
    max_new_tokens: int
    samples: int = 0  # seeded sampled sets beside the greedy one
    honour_conditions: bool = False
    # sampled replies, all prompts: per strength one entry per seed (loop_rate, refusal_rate, perplexity, win)
    sampled: dict[float, list[dict[str, Any]]] = field(default_factory=dict)
    unsteered_sampled: list[dict[str, Any]] = field(default_factory=list)


def read_run(path: str, report: dict[str, Any], name: str) -> Run:
    """`name`'s row of a bench/generation.py result (either layout)."""
    result = library_layout(report)
    row = result["rows"].get(name)
    if row is None:
        raise TableError(f"{path} has no row {name!r} (rows: {sorted(result['rows'])})")
    strengths = {float(key): entry for key, entry in row["strengths"].items()}
    return Run(
        path=path, name=name, data_set=result["set"], prompts=result["prompts"], half_b=result["half_b"],
        chosen=float(row["chosen_strength"]), zero_reason=_zero_reason(row, strengths),
        file_default=row.get("file_default"), unsteered=result["unsteered"]["half_b"],
        strengths={s: entry["half_b"] for s, entry in strengths.items()},
        repetition_penalty=None if (rp := result.get("repetition_penalty", 1.0)) is None else float(rp),
        max_new_tokens=int(result["settings"]["max_new_tokens"]),
        samples=int(result["settings"].get("samples", 0)), honour_conditions=result.get("conditions") == "honoured",
        sampled={s: entry["sampled"] for s, entry in strengths.items() if entry.get("sampled")},
        unsteered_sampled=result["unsteered"].get("sampled", []),
    )  # fmt: skip


def _zero_reason(row: dict[str, Any], strengths: dict[float, dict[str, Any]]) -> str:
    if row["chosen_strength"] != 0:
        return ""
    base = row["unsteered_half_a"]
    halves = [entry["half_a"] for entry in strengths.values()]
    if all(a["loop_rate"] > base["loop_rate"] for a in halves):
        return "no strength keeps loops within unsteered's"
    if all(a["perplexity"] > base["perplexity"] * (1 + MAX_PPL_RISE) for a in halves):
        return "no strength keeps perplexity within +10 %"
    return "no strength meets the loop and perplexity limits"


@dataclass(frozen=True)
class DevResult:
    """A profile's dev-split likelihood: per strength (accuracy, gain, 95 % interval of the gain or None,
    perplexity rise), beside the unsteered accuracy."""

    unsteered: float
    at: dict[float, tuple[float, float, tuple[float, float] | None, float]]


def read_dev(path: str, report: dict[str, Any], dev: Dev, name: str) -> DevResult:
    if dev.row is not None:  # a `rahf compare` report
        rows = {(r["row"], r.get("seed", 0)): r for r in report["rows"]}
        row, base = rows.get((dev.row, 0)), rows.get(("unsteered", 0))
        if row is None or base is None:
            raise TableError(f"{path} has no row {dev.row!r} (seed 0) or no unsteered row")
        ci = row.get("gain_ci95")
        return DevResult(base["accuracy"], {float(row["default_strength"]): (
            row["accuracy"], row["accuracy_gain"], tuple(ci) if ci else None, row["perplexity_rise"])})  # fmt: skip
    entry = report["profiles"].get(name)
    if entry is None:
        raise TableError(f"{path} evaluated {sorted(report['profiles'])}, not {name!r}")
    return DevResult(report["baseline"]["accuracy"], {
        float(g["strength"]): (g["accuracy"], g["accuracy_gain"], None, g["perplexity_rise"]) for g in entry["grid"]})


class Store:
    """The result files under `root`, each read once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._json: dict[str, Any] = {}
        self._profiles: dict[str, Profile] = {}

    def read_json(self, path: str) -> Any:
        if path not in self._json:
            try:
                self._json[path] = json.loads((self.root / path).read_text())
            except FileNotFoundError as e:
                raise TableError(f"{path}: no such result file") from e
        return self._json[path]

    def profile(self, path: str) -> Profile:
        if path not in self._profiles:
            try:
                self._profiles[path] = Profile.load(self.root / path)
            except (OSError, ProfileError) as e:
                raise TableError(f"{path}: {e}") from e
        return self._profiles[path]

    def run(self, line: Line) -> Run:
        return read_run(line.json, self.read_json(line.json), line.name)

    def dev(self, line: Line) -> DevResult:
        assert line.dev is not None
        return read_dev(line.dev.path, self.read_json(line.dev.path), line.dev, line.name)

    def file_default(self, line: Line, run: Run) -> float | None:
        path = line.profile_path
        return self.profile(path).default_strength if path is not None else run.file_default


# --- rows ---


def shown_strengths(run: Run, default: float | None, show: tuple[float, ...] | None) -> list[float]:
    """The chosen strength first, then the file default and the line's `show` (None: every measured strength)
    in increasing order."""
    extra = set(run.strengths) if show is None else {s for s in show if s in run.strengths}
    if default is not None:
        extra.add(default)
    return [run.chosen, *sorted(extra - {run.chosen})]


def strength_label(strength: float, run: Run, default: float | None, *, former: bool) -> str:
    tags = []
    if strength == run.chosen:
        tags.append(f"chosen: {run.zero_reason}" if strength == 0 and run.zero_reason else "chosen")
    if strength == default:
        tags.append("its file default" if former else "file default")
    return f"{strength_text(strength)} ({', '.join(tags)})" if tags else strength_text(strength)


def win_cell(win: dict[str, float]) -> str:
    """A win rate with its 95 % interval: "62.5 % [25.0, 100]"."""
    return f"{pct(win['win_rate'])} [{bound(win['low'])}, {bound(win['high'])}]"


def reply_cells(strength: float, run: Run) -> tuple[str, str, str, str]:
    """win rate [95 % CI], loops, refusals, perplexity of half B at `strength` (0: the unsteered replies)."""
    if strength == 0:
        base = run.unsteered
        return "–", pct(base["loop_rate"]), pct(base["refusal_rate"]), f"{base['perplexity']:.2f}"
    entry = run.strengths.get(strength)
    if entry is None:
        return "not measured", "–", "–", "–"
    win = entry["win"]
    return (win_cell(win), pct(entry["loop_rate"]),
            pct(entry["refusal_rate"]), f"{entry['perplexity']:.2f}")  # fmt: skip


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"

    return [line(header), line(["---"] * len(header)), *(line(row) for row in rows)]


def calibration_cell(profile: Profile, pairs: str) -> str:
    calibration = profile.provenance.get("calibration") or {}
    row = next((r for r in calibration.get("rows", []) if r["strength"] == CALIBRATION_AT), None)
    if row is None:
        return "–"
    unsteered = (calibration.get("unsteered") or {}).get("accuracy")
    held = "held-out " if calibration.get("held_out") else ""
    return (f"{pct(row['accuracy'])}{f' ({pct(unsteered)})' if unsteered is not None else ''}, "
            f"{calibration['pairs']} {held}{pairs}")  # fmt: skip


def dev_cells(dev: DevResult, default: float | None) -> tuple[str, str]:
    """dev accuracy at 1 with its gain [95 % CI], and the perplexity rise; the file default's too where the
    report measured it."""
    at = dev.at.get(DEV_AT)
    if at is None:
        return "–", "–"
    accuracy, gain, ci, rise = at
    interval = f"[{signed(100 * ci[0])}, {signed(100 * ci[1])}]" if ci else "(no interval computed)"
    accuracy_cell, rise_cell = f"{pct(accuracy)}, {signed(100 * gain)} {interval}", f"{signed(100 * rise)} %"
    if default is not None and default != DEV_AT and default in dev.at:
        accuracy, gain, _, rise = dev.at[default]
        accuracy_cell += f"; at the default {strength_text(default)}: {pct(accuracy)}, {signed(100 * gain)}"
        rise_cell += f" ({strength_text(default)}: {signed(100 * rise)} %)"
    return accuracy_cell, rise_cell


def _one_or_each(values: dict[str, str]) -> str:
    """The one value when every run gives the same, else "52.7 % in the run of `a`, 51.6 % in that of `b`"."""
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    parts = [f"{value} in the run of `{name}`" if i == 0 else f"{value} in that of `{name}`"
             for i, (name, value) in enumerate(values.items())]  # fmt: skip
    return ", ".join(parts)


def _dev_source(line: Line) -> str:
    assert line.dev is not None
    return f"{line.dev.path} (row `{line.dev.row}`)" if line.dev.row else line.dev.path


# --- the tables ---


def render_profiles(data_set: str, lines: Sequence[Line], store: Store) -> str:
    """profiles/README.md's table of one preference set: each profile's likelihood beside its replies."""
    runs = [store.run(line) for line in lines]
    if {run.data_set for run in runs} != {data_set} or len({(run.prompts, run.half_b) for run in runs}) != 1:
        raise TableError(f"the runs of {data_set}'s table are not all of {data_set}'s dev prompts alike")
    devs = [store.dev(line) for line in lines]
    rows = []
    for line, run, dev in zip(lines, runs, devs, strict=True):
        path = line.profile_path
        if path is None:
            raise TableError(f"{line.json}: a line of a profiles table needs its profile file")
        profile = store.profile(path)
        default = profile.default_strength
        accuracy, rise = dev_cells(dev, default)
        first = [f"`{line.label or line.name}`", line.note, calibration_cell(profile, line.pairs), accuracy, rise]
        for i, strength in enumerate(shown_strengths(run, default, line.show)):
            win, loops, refusals, _ = reply_cells(strength, run)
            rows.append([*(first if i == 0 else [""] * 5), strength_label(strength, run, default, former=False),
                         win, loops, refusals])  # fmt: skip
    unsteered = _one_or_each({line.name: pct(dev.unsteered) for line, dev in zip(lines, devs, strict=True)})
    loops = _one_or_each({run.name: pct(run.unsteered["loop_rate"]) for run in runs})
    refusals = _one_or_each({run.name: pct(run.unsteered["refusal_rate"]) for run in runs})
    header = ["file", "made by", f"calibration acc. at {strength_text(CALIBRATION_AT)}",
              f"dev acc. at {strength_text(DEV_AT)} (unsteered {unsteered}) [95 % CI]", "dev Δ ppl",
              "replies: strength", "win rate vs unsteered [95 % CI]", "loops", "refusals"]  # fmt: skip
    intro = (f"**{data_set}** ({SETS[data_set]}; replies: {runs[0].half_b} half-B prompts of {runs[0].prompts}; "
             f"unsteered loops {loops}{'; ' if ',' in loops else ', '}refusals {refusals}):")  # fmt: skip
    sources = (f"Generation source: {', '.join(dict.fromkeys(line.json for line in lines))}; dev likelihood: "
               f"{', '.join(dict.fromkeys(_dev_source(line) for line in lines))}.")  # fmt: skip
    return "\n".join([intro, "", *table(header, rows), "", sources]) + "\n"


def render_generation(lines: Sequence[Line], store: Store) -> str:
    """docs/judge.md's table: each profile's replies per strength, the unsteered replies' figures beside its
    first steered row."""
    rows = []
    for line in lines:
        run = store.run(line)
        default = store.file_default(line, run)
        name = line.label or line.name
        for i, strength in enumerate(shown_strengths(run, default, line.show)):
            win, loops, refusals, ppl = reply_cells(strength, run)
            if i == 0 and strength != 0:
                base = run.unsteered
                loops += f" ({pct(base['loop_rate'])})"
                refusals += f" ({pct(base['refusal_rate'])})"
                ppl += f" ({base['perplexity']:.2f})"
            label = strength_label(strength, run, default, former=line.file is None)
            rows.append([f"{name} ({line.note})" if i == 0 else name, label, win, loops, refusals, ppl])
    header = ["profile (method)", "strength", "win rate vs unsteered [95 % CI]", "loops (unsteered)",
              "refusals (unsteered)", "ppl (unsteered)"]  # fmt: skip
    sources = f"Generation source: {', '.join(dict.fromkeys(line.json for line in lines))}."
    return "\n".join([*table(header, rows), "", sources]) + "\n"


def render_sampled(lines: Sequence[Line], store: Store) -> str:
    """docs/judge.md's table of sampled replies: per profile, strength and seed, the win rate against the unsteered
    replies of the same seed on half B and on all prompts, and half B's loops, refusals and perplexity beside the
    unsteered sample's (– where a run scored its samples on all prompts only)."""
    rows = []
    for line in lines:
        run = store.run(line)
        if not run.sampled:
            raise TableError(f"{line.json} has no sampled replies (bench/generation.py --samples K)")
        default = store.file_default(line, run)
        name = line.label or line.name
        first = True
        for strength in sorted(run.sampled):
            for seed, (entry, base) in enumerate(zip(run.sampled[strength], run.unsteered_sampled, strict=True)):
                every, half, base_half = entry["win"], entry.get("half_b"), base.get("half_b")
                label = strength_label(strength, run, default, former=line.file is None)
                cells = ["–"] * 4
                if half is not None and base_half is not None:
                    cells = [win_cell(half["win"]),
                             f"{pct(half['loop_rate'])} ({pct(base_half['loop_rate'])})",
                             f"{pct(half['refusal_rate'])} ({pct(base_half['refusal_rate'])})",
                             f"{half['perplexity']:.2f} ({base_half['perplexity']:.2f})"]  # fmt: skip
                rows.append([f"{name} ({line.note})" if first else name, label, str(seed), cells[0],
                             win_cell(every), *cells[1:]])  # fmt: skip
                first = False
    header = ["profile (method)", "strength", "seed", "win rate vs unsteered, half B [95 % CI]",
              "win rate, all prompts [95 % CI]", "loops, half B (unsteered)", "refusals, half B (unsteered)",
              "ppl, half B (unsteered)"]  # fmt: skip
    sources = f"Generation source: {', '.join(dict.fromkeys(line.json for line in lines))}."
    return "\n".join([*table(header, rows), "", sources]) + "\n"


def render(name: str, store: Store, manifest: dict[str, tuple[Line, ...]] | None = None) -> str:
    """The markdown of the table region `name`."""
    manifest = MANIFEST if manifest is None else manifest
    if name not in manifest:
        raise TableError(f"no table {name!r} in the manifest (tables: {sorted(manifest)})")
    if name.startswith("profiles-"):
        return render_profiles(name.removeprefix("profiles-"), manifest[name], store)
    if name.startswith("sampled"):
        return render_sampled(manifest[name], store)
    return render_generation(manifest[name], store)


def replace_regions(text: str, render_one: Callable[[str], str]) -> str:
    """`text` with the body of every `<!-- tables:NAME -->` … `<!-- /tables -->` region replaced by
    `render_one(NAME)`; the markers and everything outside them unchanged."""
    opened, closed = len(_OPEN.findall(text)), text.count(_CLOSE)
    found = list(_REGION.finditer(text))
    if not opened == closed == len(found) or any(_OPEN.search(m.group("body")) for m in found):
        raise TableError(f"{opened} opening and {closed} closing table markers do not pair up")
    return _REGION.sub(lambda m: m.group(1) + render_one(m.group("name")) + m.group(4), text)


def drift(store: Store, manifest: dict[str, tuple[Line, ...]] | None = None) -> list[str]:
    """Shipped profiles whose `provenance.generation` differs from the JSON their lines name."""
    manifest = MANIFEST if manifest is None else manifest
    problems = []
    for line in dict.fromkeys(line for lines in manifest.values() for line in lines):
        path = line.profile_path
        if path is None:
            continue
        record, run = store.profile(path).generation, store.run(line)
        if record is None or record.source != line.json:
            problems.append(f"{path}: its generation section comes from {record.source if record else 'nowhere'}, "
                            f"the tables from {line.json} (bench/generation.py --from-json {line.json} --annotate)")
            continue
        stored = {row.strength: (row.win_rate, row.low, row.high, row.loop_rate, row.refusal_rate, row.perplexity)
                  for row in record.strengths}  # fmt: skip
        measured = {s: (e["win"]["win_rate"], e["win"]["low"], e["win"]["high"], e["loop_rate"], e["refusal_rate"],
                        e["perplexity"]) for s, e in run.strengths.items()}  # fmt: skip
        if record.chosen_strength != run.chosen or stored.keys() != measured.keys() or any(
                not all(math.isclose(a, b, abs_tol=1e-9) for a, b in zip(stored[s], measured[s], strict=True)
                        if a is not None and b is not None) for s in stored):  # fmt: skip
            problems.append(f"{path}: its generation section differs from {line.json} "
                            f"(bench/generation.py --from-json {line.json} --annotate)")
    return problems


def rerun_command(line: Line, run: Run, *, annotate: bool, python: str = sys.executable) -> list[str]:
    """bench/generation.py's argv that measures `line`'s profile again as `run` recorded it, into its JSON."""
    path = line.profile_path
    if path is None:
        raise TableError(f"{line.json} is the run of a former file: not rerun")
    penalty = [] if run.repetition_penalty is None else ["--repetition-penalty", strength_text(run.repetition_penalty)]
    return [python, "bench/generation.py", "--profile", path, "--set", run.data_set,
            "--strengths", *(strength_text(s) for s in sorted(run.strengths)), "--max-tokens", str(run.max_new_tokens),
            *penalty,
            *(["--samples", str(run.samples)] if run.samples else []),
            *(["--honour-conditions"] if run.honour_conditions else []),
            "--out", line.json, *(["--annotate", path] if annotate else [])]  # fmt: skip


def rerun_commands(store: Store, manifest: dict[str, tuple[Line, ...]] | None = None) -> list[list[str]]:
    """One command per (JSON, profile file) of the manifest, former files left out."""
    manifest = MANIFEST if manifest is None else manifest
    commands: dict[tuple[str, str], list[str]] = {}
    for line in (line for lines in manifest.values() for line in lines):
        path = line.profile_path
        if path is None or (line.json, path) in commands:
            continue
        record = store.profile(path).generation
        commands[line.json, path] = rerun_command(line, store.run(line),
                                                  annotate=record is not None and record.source == line.json)
    return list(commands.values())


def updated(root: Path, document: str, store: Store, manifest: dict[str, tuple[Line, ...]] | None = None
            ) -> tuple[str, str]:  # fmt: skip
    """`document`'s text now and with its tables rendered from the data under `root`."""
    try:
        text = (root / document).read_text()
    except FileNotFoundError as e:
        raise TableError(f"{document}: no such document") from e
    return text, replace_regions(text, lambda name: render(name, store, manifest))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff where the tables differ from the data")
    mode.add_argument("--rerun", action="store_true", help="rerun the manifest's generation benchmarks first")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    store = Store(args.root)
    try:
        if args.rerun:  # 1. measure again (each run rewrites its JSON), then render from the new results
            for command in rerun_commands(store):
                print("$", " ".join(command), file=sys.stderr, flush=True)
                subprocess.run(command, cwd=args.root, check=True)
            store = Store(args.root)
        results = {document: updated(args.root, document, store) for document in DOCUMENTS}
        problems = drift(store)
    except TableError as e:
        print(f"bench/tables.py: {e}", file=sys.stderr)
        return 2
    if args.check:
        stale = False
        for document, (old, new) in results.items():
            if old != new:
                stale = True
                sys.stdout.writelines(difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                                           f"{document} (now)", f"{document} (from the data)"))
        for problem in problems:
            print(problem)
        if stale:
            print("the tables differ from the data: run python bench/tables.py", file=sys.stderr)
        return 1 if stale or problems else 0
    for document, (old, new) in results.items():
        if old != new:
            (args.root / document).write_text(new)
            print(f"wrote {document}", file=sys.stderr)
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
