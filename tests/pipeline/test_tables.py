"""bench/tables.py: tables rendered from fabricated result files (expected markdown written by hand), marker
replacement, `--check` on the repository's own files and on a modified copy, `--rerun`'s command lines."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import tables
from bench.tables import Dev, Line, Store, TableError
from steering_vectors.core.generation_record import GenerationRecord
from steering_vectors.core.profile import Profile

ROOT = Path(__file__).resolve().parents[2]


def _half_b(win: float, low: float, high: float, loops: float, refusals: float, ppl: float) -> dict[str, Any]:
    return {"loop_rate": loops, "refusal_rate": refusals, "perplexity": ppl,
            "win": {"win_rate": win, "low": low, "high": high}}  # fmt: skip


# `p`: score_replies' layout, repetition penalty 1.15, 32 tokens; half A chose 0.5
P_RUN = {
    "prompts": 10, "half_a": 6, "half_b": 4, "judge": "j.safetensors",
    "settings": {"max_new_tokens": 32, "samples": 0},
    "unsteered": {"half_b": {"loop_rate": 0.25, "refusal_rate": 0.0, "perplexity": 2.0}},
    "rows": {"p": {
        "method": "m", "system": None, "chosen_strength": 0.5, "file_default": 1.0,
        "unsteered_half_a": {"loop_rate": 0.5, "perplexity": 2.0},
        "strengths": {
            "0.5": {"half_a": {"loop_rate": 0.5, "perplexity": 2.1},
                    "half_b": _half_b(0.625, 0.25, 1.0, 0.5, 0.25, 1.95)},
            "1": {"half_a": {"loop_rate": 0.5, "perplexity": 2.5}, "half_b": _half_b(0.75, 0.5, 1.0, 0.75, 0.0, 2.35)},
            "2": {"half_a": {"loop_rate": 0.9, "perplexity": 3.0}, "half_b": _half_b(1.0, 1.0, 1.0, 1.0, 0.0, 3.0)},
        },
    }},
    "profile": "profiles/p.safetensors", "set": "alpaca_helpful", "replies": "engine", "repetition_penalty": 1.15,
}  # fmt: skip

# `q`: the older layout (strengths keyed "0.0", "1.0", the unsteered row among them); half A chose 0
Q_RUN = {
    "profile": "profiles/q.safetensors", "method": "pref", "set": "alpaca_helpful", "judge": "j.safetensors",
    "prompts": 10, "half_a": 6, "half_b": 4, "max_tokens": 96, "repetition_penalty": 1.0,
    "chosen_strength": 0.0, "profile_default_strength": 1.0,
    "strengths": {
        "0.0": {"half_a": {"loop_rate": 0.5, "perplexity": 2.0},
                "half_b": {"loop_rate": 0.25, "refusal_rate": 0.0, "perplexity": 2.0}, "all": {}},
        "1.0": {"half_a": {"loop_rate": 0.75, "perplexity": 2.0}, "half_b": _half_b(0.4, 0.1, 0.7, 0.5, 0.5, 2.5),
                "all": {}},
    },
    "examples": {"0.0": [], "1.0": []}, "cpu": "x", "seconds": 1.0,
}  # fmt: skip

P_EVAL = {"baseline": {"accuracy": 0.5}, "profiles": {"p": {"grid": [
    {"strength": 0.5, "accuracy": 0.55, "accuracy_gain": 0.05, "perplexity_rise": 0.01},
    {"strength": 1.0, "accuracy": 0.6, "accuracy_gain": 0.1, "perplexity_rise": -0.02},
]}}}  # fmt: skip
Q_COMPARE = {"rows": [
    {"row": "unsteered", "seed": 0, "accuracy": 0.5, "accuracy_gain": 0.0, "gain_ci95": [0.0, 0.0],
     "perplexity_rise": 0.0},
    {"row": "pref", "seed": 1, "accuracy": 0.9, "accuracy_gain": 0.4, "gain_ci95": [0.3, 0.5], "perplexity_rise": 0.0,
     "default_strength": 1.0},
    {"row": "pref", "seed": 0, "accuracy": 0.55, "accuracy_gain": 0.05, "gain_ci95": [-0.05, 0.15],
     "perplexity_rise": 0.123, "default_strength": 1.0},
]}  # fmt: skip

P_LINE = Line("p", "docs/p.json", "made by p", show=(1.0,), dev=Dev("reports/p.json"))
Q_LINE = Line("q", "docs/q.json", "made by q", dev=Dev("reports/compare.json", row="pref"))
MANIFEST = {
    "profiles-alpaca_helpful": (P_LINE, Q_LINE),
    "generation": (Line("p", "docs/p.json", "note p", show=None),
                   Line("q", "docs/q.json", "note q", file=None, label="former q")),
}  # fmt: skip

P_RECORD = {
    "set": "alpaca_helpful", "judge": "j.safetensors", "judge_sha256": "", "replies": "engine", "max_new_tokens": 32,
    "prompts": 10, "half_a": 6, "half_b": 4, "chosen_strength": 0.5,
    "unsteered": {"loop_rate": 0.25, "refusal_rate": 0.0, "perplexity": 2.0},
    "strengths": [
        {"strength": 0.5, "win_rate": 0.625, "low": 0.25, "high": 1.0, "loop_rate": 0.5, "refusal_rate": 0.25,
         "perplexity": 1.95},
        {"strength": 1.0, "win_rate": 0.75, "low": 0.5, "high": 1.0, "loop_rate": 0.75, "refusal_rate": 0.0,
         "perplexity": 2.35},
        {"strength": 2.0, "win_rate": 1.0, "low": 1.0, "high": 1.0, "loop_rate": 1.0, "refusal_rate": 0.0,
         "perplexity": 3.0},
    ],
    "source": "docs/p.json",
}  # fmt: skip


def _write(root: Path, path: str, data: Any) -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(json.dumps(data) if not isinstance(data, str) else data)


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    """A root with the runs, reports and profiles above: `p` (default 0.5, annotated from docs/p.json) and `q`."""
    for path, data in [("docs/p.json", P_RUN), ("docs/q.json", Q_RUN), ("reports/p.json", P_EVAL),
                       ("reports/compare.json", Q_COMPARE)]:  # fmt: skip
        _write(tmp_path, path, data)
    (tmp_path / "profiles").mkdir()
    p = Profile("p", {1: torch.zeros(4)}, default_strength=0.5, method="m", provenance={"calibration": {
        "pairs": 8, "held_out": True, "strength": 1.0, "unsteered": {"accuracy": 0.25},
        "rows": [{"strength": 0.5, "accuracy": 0.3}, {"strength": 1.0, "accuracy": 0.375}]}})  # fmt: skip
    p.with_generation(GenerationRecord.from_json(P_RECORD)).save(tmp_path / "profiles/p.safetensors")
    Profile("q", {1: torch.zeros(4)}, default_strength=1.0, method="pref", provenance={"calibration": {
        "pairs": 16, "strength": 1.0, "rows": [{"strength": 1.0, "accuracy": 0.5}]}}).save(
        tmp_path / "profiles/q.safetensors")  # fmt: skip
    return tmp_path


def test_profiles_table_rows(results: Path) -> None:
    text = tables.render("profiles-alpaca_helpful", Store(results), MANIFEST)
    assert text.splitlines() == [
        "**alpaca_helpful** (benign instructions; replies: 4 half-B prompts of 10; unsteered loops 25.0 %, "
        "refusals 0 %):",
        "",
        "| file | made by | calibration acc. at 1 | dev acc. at 1 (unsteered 50.0 %) [95 % CI] | dev Δ ppl "
        "| replies: strength | win rate vs unsteered [95 % CI] | loops | refusals |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        "| `p` | made by p | 37.5 % (25.0 %), 8 held-out pairs | 60.0 %, +10.0 (no interval computed); at the "
        "default 0.5: 55.0 %, +5.0 | −2.0 % (0.5: +1.0 %) | 0.5 (chosen, file default) | 62.5 % [25.0, 100] "
        "| 50.0 % | 25.0 % |",
        "| | | | | | 1 | 75.0 % [50.0, 100] | 75.0 % | 0 % |",
        "| `q` | made by q | 50.0 %, 16 pairs | 55.0 %, +5.0 [−5.0, +15.0] | +12.3 % "
        "| 0 (chosen: no strength keeps loops within unsteered's) | – | 25.0 % | 0 % |",
        "| | | | | | 1 (file default) | 40.0 % [10.0, 70.0] | 50.0 % | 50.0 % |",
        "",
        "Generation source: docs/p.json, docs/q.json; dev likelihood: reports/p.json, reports/compare.json "
        "(row `pref`).",
    ]  # fmt: skip


def test_generation_table_rows(results: Path) -> None:
    text = tables.render("generation", Store(results), MANIFEST)
    assert text.splitlines() == [
        "| profile (method) | strength | win rate vs unsteered [95 % CI] | loops (unsteered) | refusals (unsteered) "
        "| ppl (unsteered) |",
        "| --- | --- | --- | --- | --- | --- |",
        "| p (note p) | 0.5 (chosen, file default) | 62.5 % [25.0, 100] | 50.0 % (25.0 %) | 25.0 % (0 %) "
        "| 1.95 (2.00) |",
        "| p | 1 | 75.0 % [50.0, 100] | 75.0 % | 0 % | 2.35 |",
        "| p | 2 | 100 % [100, 100] | 100 % | 0 % | 3.00 |",
        "| former q (note q) | 0 (chosen: no strength keeps loops within unsteered's) | – | 25.0 % | 0 % | 2.00 |",
        "| former q | 1 (its file default) | 40.0 % [10.0, 70.0] | 50.0 % | 50.0 % | 2.50 |",
        "",
        "Generation source: docs/p.json, docs/q.json.",
    ]  # fmt: skip


def test_sampled_table_rows(results: Path) -> None:
    def sample(win: float, low: float, high: float, loops: float, refusals: float, ppl: float) -> dict[str, Any]:
        return {"loop_rate": loops, "refusal_rate": refusals, "perplexity": ppl,
                "win": {"win_rate": win, "low": low, "high": high}}  # fmt: skip

    sampled = json.loads(json.dumps(P_RUN))
    sampled["settings"]["samples"] = 2
    sampled["unsteered"]["sampled"] = [{**sample(0, 0, 0, 0.1, 0.0, 4.0), "half_b": sample(0, 0, 0, 0.25, 0.0, 3.0)},
                                       sample(0, 0, 0, 0.2, 0.1, 4.5)]  # the second seed: all prompts only
    sampled["rows"]["p"]["strengths"]["0.5"]["sampled"] = [
        {**sample(0.6, 0.3, 0.9, 0.0, 0.0, 4.1), "half_b": sample(0.75, 0.5, 1.0, 0.0, 0.25, 3.5)},
        sample(0.55, 0.2, 0.8, 0.1, 0.2, 4.4)]  # fmt: skip
    _write(results, "docs/p-sampled.json", sampled)
    line = Line("p", "docs/p-sampled.json", "note p", file=None)
    assert tables.render("sampled", Store(results), {"sampled": (line,)}).splitlines() == [
        "| profile (method) | strength | seed | win rate vs unsteered, half B [95 % CI] | win rate, all prompts "
        "[95 % CI] | loops, half B (unsteered) | refusals, half B (unsteered) | ppl, half B (unsteered) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        "| p (note p) | 0.5 (chosen) | 0 | 75.0 % [50.0, 100] | 60.0 % [30.0, 90.0] | 0 % (25.0 %) | 25.0 % (0 %) "
        "| 3.50 (3.00) |",
        "| p | 0.5 (chosen) | 1 | – | 55.0 % [20.0, 80.0] | – | – | – |",
        "",
        "Generation source: docs/p-sampled.json.",
    ]  # fmt: skip
    with pytest.raises(TableError, match="no sampled replies"):
        tables.render("sampled", Store(results), {"sampled": (P_LINE,)})


def test_zero_reason_says_which_limit(results: Path) -> None:
    run = json.loads(json.dumps(Q_RUN))
    run["strengths"]["1.0"]["half_a"] = {"loop_rate": 0.25, "perplexity": 2.3}  # loops fine, perplexity +15 %
    assert tables.read_run("q.json", run, "q").zero_reason == "no strength keeps perplexity within +10 %"
    with pytest.raises(TableError, match="no row 'r'"):
        tables.read_run("q.json", run, "r")


def test_replace_regions_leaves_the_rest() -> None:
    text = ("# Title\n\nprose  with  spaces\n<!-- tables:a -->\nold a\n<!-- /tables -->\nmiddle\n\n"
            "<!-- tables:b -->\nold\nb\n<!-- /tables --> tail\nend")  # fmt: skip
    out = tables.replace_regions(text, lambda name: f"new {name}\n")
    assert out == ("# Title\n\nprose  with  spaces\n<!-- tables:a -->\nnew a\n<!-- /tables -->\nmiddle\n\n"
                   "<!-- tables:b -->\nnew b\n<!-- /tables --> tail\nend")  # fmt: skip
    assert tables.replace_regions("no tables\n", lambda name: "x") == "no tables\n"
    for broken in ["<!-- tables:a -->\nopen", "text\n<!-- /tables -->",
                   "<!-- tables:a -->\n<!-- tables:b -->\nx\n<!-- /tables -->"]:  # fmt: skip
        with pytest.raises(TableError):
            tables.replace_regions(broken, lambda name: "x\n")
    with pytest.raises(TableError, match="no table 'c'"):
        tables.render("c", Store(Path(".")), MANIFEST)


def test_drift_between_profile_and_json(results: Path) -> None:
    manifest = {"profiles-alpaca_helpful": (P_LINE, Q_LINE)}
    problems = tables.drift(Store(results), manifest)
    assert problems == ["profiles/q.safetensors: its generation section comes from nowhere, the tables from "
                        "docs/q.json (bench/generation.py --from-json docs/q.json --annotate)"]  # fmt: skip
    changed = json.loads(json.dumps(P_RUN))
    changed["rows"]["p"]["strengths"]["1"]["half_b"]["win"]["win_rate"] = 0.7
    _write(results, "docs/p.json", changed)
    assert tables.drift(Store(results), {"generation": (P_LINE,)}) == [
        "profiles/p.safetensors: its generation section differs from docs/p.json "
        "(bench/generation.py --from-json docs/p.json --annotate)"]  # fmt: skip


def test_rerun_commands(results: Path) -> None:
    # p once though it is in both tables; the former q of "generation" is not rerun
    commands = tables.rerun_commands(Store(results), MANIFEST)
    assert commands == [
        [sys.executable, "bench/generation.py", "--profile", "profiles/p.safetensors", "--set", "alpaca_helpful",
         "--strengths", "0.5", "1", "2", "--max-tokens", "32", "--repetition-penalty", "1.15", "--out",
         "docs/p.json", "--annotate", "profiles/p.safetensors"],
        [sys.executable, "bench/generation.py", "--profile", "profiles/q.safetensors", "--set", "alpaca_helpful",
         "--strengths", "1", "--max-tokens", "96", "--repetition-penalty", "1", "--out", "docs/q.json"],
    ]  # fmt: skip
    with pytest.raises(TableError, match="former file"):
        tables.rerun_command(MANIFEST["generation"][1], Store(results).run(Q_LINE), annotate=False)
    # a run whose requests set no penalty (the profile's decoding default), with sampled sets and conditions
    opened = {**P_RUN, "repetition_penalty": None, "conditions": "honoured",
              "settings": {**P_RUN["settings"], "samples": 2}}  # fmt: skip
    _write(results, "docs/p.json", opened)
    assert tables.rerun_command(P_LINE, Store(results).run(P_LINE), annotate=False) == [
        sys.executable, "bench/generation.py", "--profile", "profiles/p.safetensors", "--set", "alpaca_helpful",
        "--strengths", "0.5", "1", "2", "--max-tokens", "32", "--samples", "2", "--honour-conditions",
        "--out", "docs/p.json"]  # fmt: skip


def test_rerun_runs_then_renders(results: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(results, "README.md", "intro\n<!-- tables:generation -->\nstale\n<!-- /tables -->\n")
    monkeypatch.setattr(tables, "MANIFEST", MANIFEST)
    monkeypatch.setattr(tables, "DOCUMENTS", ("README.md",))
    calls: list[tuple[list[str], Path]] = []
    monkeypatch.setattr(tables.subprocess, "run", lambda command, cwd, check: calls.append((command, cwd)))
    assert tables.main(["--rerun", "--root", str(results)]) == 0
    assert [(command[3], cwd) for command, cwd in calls] == [("profiles/p.safetensors", results),
                                                             ("profiles/q.safetensors", results)]  # fmt: skip
    text = (results / "README.md").read_text()
    assert text.startswith("intro\n<!-- tables:generation -->\n| profile (method) |")
    assert text.endswith("Generation source: docs/p.json, docs/q.json.\n<!-- /tables -->\n")


def test_check_passes_on_the_repository() -> None:
    store = Store(ROOT)
    for document in tables.DOCUMENTS:
        old, new = tables.updated(ROOT, document, store)
        assert "<!-- tables:" in old
        assert old == new, f"{document}'s tables differ from the data: run python bench/tables.py"
    assert tables.drift(store) == []
    assert tables.main(["--check"]) == 0


def _copy_of_repository(tmp_path: Path) -> Path:
    """The result files of the repository, linked, and copies of the documents."""
    for folder in ("docs", "profiles"):
        (tmp_path / folder).mkdir()
        for entry in (ROOT / folder).iterdir():
            (tmp_path / folder / entry.name).symlink_to(entry)
    for document in tables.DOCUMENTS:
        (tmp_path / document).unlink()
        (tmp_path / document).write_text((ROOT / document).read_text())
    return tmp_path


def test_check_fails_on_a_modified_copy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy_of_repository(tmp_path)
    judge = root / "docs/judge.md"
    text = judge.read_text()
    row = "| helpful-pref | 0.5 | 61.4 % [40.9, 79.5] |"
    assert text.count(row) == 1
    outside = text.replace("Kept: the head kind", "Kept:  the head kind")  # outside the tables: fine
    assert outside != text
    judge.write_text(outside)
    assert tables.main(["--check", "--root", str(root)]) == 0
    judge.write_text(text.replace(row, "| helpful-pref | 0.5 | 61.5 % [40.9, 79.5] |"))
    capsys.readouterr()
    assert tables.main(["--check", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "-| helpful-pref | 0.5 | 61.5 % [40.9, 79.5] |" in out and f"+{row}" in out
    assert tables.main(["--root", str(root)]) == 0  # rewrites the copy
    assert judge.read_text() == text
