"""The fair comparison (`rahf compare`) and its statistics on a tiny random Llama."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from steering_vectors.core.models import load_model
from steering_vectors.core.profile import Profile
from steering_vectors.training.evaluate import (
    PreferenceScore,
    matched_strength,
    paired_bootstrap,
    score_pairs,
)


def _score(wins: list[bool]) -> PreferenceScore:
    chosen = [1.0 if w else 0.0 for w in wins]
    rejected = [0.5] * len(wins)
    return PreferenceScore(sum(wins) / len(wins), 0.0, len(wins), chosen, rejected)


def test_paired_bootstrap_interval() -> None:
    same = _score([True, False, True, False])
    assert paired_bootstrap(same, same) == (0.0, 0.0)  # the same pairs won: no difference in any resample
    base = _score([False] * 10)
    better = _score([True] * 3 + [False] * 7)
    low, high = paired_bootstrap(base, better)
    assert 0.0 <= low < 0.3 < high <= 1.0  # all differences are >= 0, and the point estimate lies inside
    with pytest.raises(ValueError, match="same pairs"):
        paired_bootstrap(base, same)


def test_matched_strength_finds_the_perplexity_target(monkeypatch) -> None:
    import steering_vectors.training.evaluate as evaluate

    calls = []

    def fake_perplexity(model, tokenizer, text, profile=None, strength=1.0, **kwargs):  # ppl = 20 (1 + s^2 / 10)
        calls.append(strength)
        return 20.0 * (1.0 + strength**2 / 10.0)

    monkeypatch.setattr(evaluate, "perplexity", fake_perplexity)
    profile = Profile("push", {1: torch.ones(4)})
    strength, ppl = matched_strength(None, None, "text", profile, 20.0, rise=0.05, steps=12)
    assert len(calls) == 13  # the top of the range, then one bisection step each
    assert strength == pytest.approx(0.5**0.5, abs=8.0 / 2**12) and ppl == 20.0 * (1.0 + strength**2 / 10.0)
    # a profile that cannot reach the target within the range reports the top of the range
    strength, ppl = matched_strength(None, None, "text", profile, 20.0, rise=0.5, high=2.0)
    assert (strength, ppl) == (2.0, 28.0)



def test_calibration_never_picks_a_default_that_breaks_the_fluency_cap(monkeypatch) -> None:
    import steering_vectors.training.evaluate as evaluate

    def fake_perplexity(model, tokenizer, text, profile=None, strength=1.0, **kwargs):  # ppl = 20 (1 + 4 s^2)
        return 20.0 * (1.0 + 4.0 * strength**2)

    scored = []

    def fake_score(model, tokenizer, pairs, profile=None, strength=1.0, **kwargs):
        scored.append(strength)
        return _score([True, strength > 0.1])

    monkeypatch.setattr(evaluate, "perplexity", fake_perplexity)
    monkeypatch.setattr(evaluate, "score_pairs", fake_score)
    profile = Profile("push", {1: torch.ones(4)})
    # every grid strength is over +8 % (0.5 -> +100 %): the default is the largest strength under the cap
    strength, rows = evaluate.calibrate_strength(
        None, None, [], profile, [0.5, 1.0], base_ppl=20.0, text="t", max_ppl_rise=0.08
    )
    assert 20.0 * (1.0 + 4.0 * strength**2) <= 20.0 * 1.08  # within the cap ...
    assert strength > 0.02**0.5 - 0.5 / 2**6  # ... and within one bisection step (of [0, 0.5]) of it
    assert scored == [strength] and rows[-1]["below_grid"] and rows[-1]["strength"] == strength
    assert [r["strength"] for r in rows[:2]] == [0.5, 1.0] and all(r["accuracy"] != r["accuracy"] for r in rows[:2])
    # a grid with a usable strength keeps the usual choice
    scored.clear()
    strength, rows = evaluate.calibrate_strength(
        None, None, [], profile, [0.1, 0.5], base_ppl=20.0, text="t", max_ppl_rise=0.08
    )
    assert strength == 0.1 and scored == [0.1] and not any(r.get("below_grid") for r in rows)


def _write_split(folder: Path, name: str, n_prompts: int) -> None:
    rows = [
        {"prompt": f"{name} question {i}", "chosen": f"kind answer {i}", "rejected": f"rude {i}!"}
        for i in range(n_prompts)
    ]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_command_scores_every_row_on_the_same_pairs_and_resumes(tiny_model_dir: Path, tmp_path: Path,
                                                                        capsys) -> None:  # fmt: skip
    from steering_vectors.cli import main

    data = tmp_path / "data"
    data.mkdir()
    _write_split(data, "train", 16)
    _write_split(data, "dev", 5)
    out, work = tmp_path / "comparison", tmp_path / "work"
    rows = "unsteered,prompt-good,caa,rahf-dual-rank,rahf-dual-lora,pref,dual-sft"
    argv = ["compare", "--data", str(data), "--out", str(out), "--model", str(tiny_model_dir), "--rows", rows,
            "--layers", "1,2", "--max-pairs", "6", "--held-out", "0.3", "--calib-pairs", "2", "--gap-pairs", "2",
            "--fit-steps", "2", "--fit-batch", "4", "--pref-steps", "2", "--pref-batch", "2", "--rank", "2",
            "--prompt-tokens", "24", "--response-tokens", "8", "--eval-response-tokens", "10",
            "--strengths", "0.5,1", "--work-dir", str(work), "--bf16", "off", "--seed-rows", "pref",
            "--seeds", "0,1"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    by_row = {r["row"]: r for r in report["rows"]}
    assert list(by_row) == rows.split(",") and report["dev_pairs"] == 5

    tiny = load_model(tiny_model_dir)
    from steering_vectors.training.data import TokenBudget, load_pairs

    dev = load_pairs(data / "dev.jsonl")
    budget = TokenBudget(24, 10)
    direct = score_pairs(tiny.model, tiny.tokenizer, sorted(dev, key=lambda p: p.id), budget=budget)
    assert by_row["unsteered"]["accuracy"] == pytest.approx(direct.accuracy)
    caa = Profile.load(out / "profiles" / "comparison-caa-seed0.safetensors")
    assert caa.method == "rahf-dual/caa" and caa.provenance["calibration"]["held_out"]
    rahf = Profile.load(out / "profiles" / "comparison-rahf-dual-rank-seed0.safetensors")
    assert rahf.ranks() == {1: 2, 2: 2} and by_row["rahf-dual-rank"]["parameters"] == 2 * (64 + 2 * 2 * 64)
    for key in ("caa", "rahf-dual-rank", "pref"):
        row = by_row[key]
        low, high = row["gain_ci95"]
        assert low <= row["accuracy_gain"] <= high and row["matched"]["strength"] > 0
        assert row["default_strength"] in (0.5, 1.0)
    assert by_row["pref"]["seeds"] == [0, 1] and "accuracy_gain_seeds" in by_row["pref"]
    gains = by_row["pref"]["accuracy_gain_seeds"]["values"]
    assert f"2 seeds: {100 * sum(gains) / 2:+.1f} ± " in (out / "report.md").read_text()
    assert f"({100 * gains[0]:+.1f}, {100 * gains[1]:+.1f})" in (out / "report.md").read_text()
    # ... and a table of the seeds, one line each, with that seed's own interval and matched strength
    per_seed = by_row["pref"]["per_seed"]
    assert [s["seed"] for s in per_seed] == [0, 1] and [s["accuracy_gain"] for s in per_seed] == gains
    lines = (out / "report.md").read_text().splitlines()
    start = lines.index("pref (not RAHF), offsets, seed by seed (a seed draws another training sample; every "
                        "training step is repeated):")  # fmt: skip
    for seed, s in enumerate(per_seed):
        low, high = s["gain_ci95"]
        assert lines[start + 4 + seed].startswith(
            f"| {seed} | – | {s['default_strength']:.3g} | {100 * s['accuracy']:.1f} % | "
            f"{100 * s['accuracy_gain']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] | "
        ) and lines[start + 4 + seed].endswith(f"({s['matched']['strength']:.3g}) |")
    assert lines[start + 6] == ""  # one line a seed
    assert by_row["dual-sft"]["switchable"] is False and by_row["dual-sft"]["parameters"] > 0
    # LoRA r 8 on q and v, trained up to the deepest target layer (2): layers 0-2 of the tiny model's 4
    lora = by_row["rahf-dual-lora"]
    profile = Profile.load(out / "profiles" / "comparison-rahf-dual-lora-seed0.safetensors")
    assert profile.method == "rahf-dual/lora" and profile.lora_ranks() == {
        layer: {"q_proj": 8, "v_proj": 8} for layer in (0, 1, 2)}  # fmt: skip
    assert lora["switchable"] is True and lora["parameters"] == 3 * (64 + 8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)
    assert lora["default_strength"] in (0.5, 1.0) and lora["matched"]["strength"] > 0
    assert by_row["prompt-good"]["perplexity"] is None
    text = (out / "report.md").read_text()
    assert "RAHF-Dual, offsets + rank 2" in text and "pref (not RAHF), offsets" in text
    assert (out / "comparison.png").stat().st_size > 0

    # a rerun reads every row back from the work folder: the rows' files are not written again
    stamps = {p: p.stat().st_mtime_ns for p in work.glob("compare-*/*.json")}
    assert main(argv) == 0
    capsys.readouterr()
    assert {p: p.stat().st_mtime_ns for p in work.glob("compare-*/*.json")} == stamps

    # --cached-only computes nothing: rows and seeds no run finished are listed as pending
    partial = tmp_path / "partial"
    cached_argv = [*argv, "--rows", f"{rows},mean", "--seeds", "0,1,2", "--out", str(partial), "--cached-only"]
    assert main(cached_argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["pending"] == ["pref (seed 2)", "mean (seed 0)"]
    assert {p: p.stat().st_mtime_ns for p in work.glob("compare-*/*.json")} == stamps
    # ... but each reported row's calibrated profile is copied from the work folder, named after its report
    published = sorted(f.name for f in (partial / "profiles").iterdir())
    assert published == sorted(f.name.replace("comparison-", "partial-") for f in (out / "profiles").iterdir())
    for name in published:
        copy, original = Profile.load(partial / "profiles" / name), Profile.load(out / "profiles" / name.replace(
            "partial-", "comparison-"))  # fmt: skip
        assert copy.name == name.removesuffix(".safetensors").rpartition("-seed")[0]
        assert copy.default_strength == original.default_strength and copy.provenance == original.provenance
        assert all(torch.equal(copy.offsets[k], original.offsets[k]) for k in original.offsets)
    cached = json.loads((partial / "report.json").read_text())
    assert [r["row"] for r in cached["rows"]] == rows.split(",")
    assert {r["row"]: r["accuracy"] for r in cached["rows"]} == {r["row"]: r["accuracy"] for r in report["rows"]}
    assert next(r for r in cached["rows"] if r["row"] == "pref")["seeds"] == [0, 1]
    text = (partial / "report.md").read_text()
    assert "Not computed yet (this report was written with `--cached-only`" in text
    assert "pref (seed 2), mean (seed 0)." in text and "--cached-only" not in text.split("```")[1]
    with pytest.raises(SystemExit, match="no row of this comparison is computed yet"):
        main([*cached_argv, "--work-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "nothing")])

    # on a machine whose work folder lacks the rows (a fresh one), --cached-only keeps the rows of the report
    # already in --out, as they were, when that report came from the same comparison; it says so
    before = json.loads((partial / "report.json").read_text())
    (partial / "report.json").write_text(json.dumps({**before, "cpu": "Another CPU, 1 threads"}))  # made elsewhere
    assert main([*cached_argv, "--work-dir", str(tmp_path / "empty")]) == 0
    assert json.loads(capsys.readouterr().out)["pending"] == ["pref (seed 2)", "mean (seed 0)"]
    after = json.loads((partial / "report.json").read_text())
    assert after["rows"] == before["rows"] and after["carried_over"] == rows.split(",")
    assert after["carried_cpu"] == "Another CPU, 1 threads" and after["cpu"] != after["carried_cpu"]
    assert "The CPU of that report: Another CPU, 1 threads (wall times differ by machine)." in (
        partial / "report.md").read_text()  # fmt: skip
    assert f"the same settings in a work folder this run did not have): {rows.replace(',', ', ')}." in (
        partial / "report.md").read_text()  # fmt: skip
    # ... but not from a report of other settings (another strength grid): nothing is computed, nothing kept
    with pytest.raises(SystemExit, match="no row of this comparison is computed yet"):
        main([*cached_argv, "--work-dir", str(tmp_path / "empty"), "--strengths", "0.5,1,3"])
    assert json.loads((partial / "report.json").read_text()) == after


def test_report_shows_default_strengths_to_three_digits_and_marks_those_below_the_grid() -> None:
    from steering_vectors.training.compare import _strength

    grid = [0.5, 1.0, 2.0]
    assert _strength({"default_strength": 1.0}, grid) == "1"
    assert _strength({"default_strength": 0.5}, grid) == "0.5"
    assert _strength({"default_strength": 0.1796875}, grid) == "0.18 (below grid)"
    assert _strength({"row": "unsteered"}, grid) == "–"


def test_compare_generation_judges_the_profile_and_prompt_rows_and_caches_it(tiny_model_dir: Path, tmp_path: Path,
                                                                              capsys) -> None:  # fmt: skip
    from steering_vectors.cli import main
    from steering_vectors.training.judge import HeadJudge, HeadParams, save_judge

    tiny = load_model(tiny_model_dir)
    head = HeadParams([1], ["mean"], torch.randn(64, generator=torch.Generator().manual_seed(0)), torch.zeros(64),
                      torch.ones(64), 0.01)  # fmt: skip
    judge = tmp_path / "toy-head.safetensors"
    save_judge(judge, HeadJudge(tiny.model, tiny.tokenizer, head, [1]), data_set="toy", fingerprint=tiny.fingerprint,
               report={})  # fmt: skip
    data = tmp_path / "data"
    data.mkdir()
    _write_split(data, "train", 12)
    _write_split(data, "dev", 4)
    out, work = tmp_path / "comparison", tmp_path / "work"
    argv = ["compare", "--data", str(data), "--out", str(out), "--model", str(tiny_model_dir),
            "--rows", "unsteered,prompt-good,pref", "--layers", "1,2", "--max-pairs", "6", "--held-out", "0.3",
            "--calib-pairs", "2", "--gap-pairs", "0", "--pref-steps", "2", "--pref-batch", "2", "--prompt-tokens",
            "24", "--response-tokens", "8", "--eval-response-tokens", "10", "--strengths", "0.5,1",
            "--work-dir", str(work), "--bf16", "off", "--generation", "--judge", str(judge), "--gen-tokens", "4"]
    assert main(argv) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    generation = report["generation"]
    assert sorted(generation["rows"]) == ["pref", "prompt-good"]
    assert generation["rows"]["prompt-good"]["system"] and list(generation["rows"]["prompt-good"]["strengths"]) == ["1"]
    pref = Profile.load(out / "profiles" / "comparison-pref-seed0.safetensors")
    grid = sorted({0.5, 1.0, pref.default_strength})
    assert list(generation["rows"]["pref"]["strengths"]) == [f"{s:g}" for s in grid]
    assert generation["prompts"] == len({json.dumps(p) for p in (json.loads(line)["prompt"] for line in
                                         (data / "dev.jsonl").read_text().splitlines())})  # fmt: skip
    assert "## Generations judged" in (out / "report.md").read_text() and (out / "generation.png").is_file()
    # the evaluation is kept in the work folder: --cached-only reads it back and computes nothing
    kept = list(work.glob("generation-*/generation.json"))
    assert len(kept) == 1
    stamp = kept[0].stat().st_mtime_ns
    assert main([*argv, "--cached-only"]) == 0
    capsys.readouterr()
    assert kept[0].stat().st_mtime_ns == stamp
    assert json.loads((out / "report.json").read_text())["generation"] == generation


def test_run_config_key_leaves_out_the_bidirectional_flag_while_it_is_off() -> None:
    from steering_vectors.training.compare import row_config, rows_for
    from steering_vectors.training.pipeline import RunConfig

    base = RunConfig(data_file=Path("train.jsonl"))
    key = base.key()
    assert "pref_bidirectional" not in key and key["pref_steps"] == 32 and key["position_mode"] == "all"
    rows = {r.key: r for r in rows_for(8)}
    bidir = row_config(base, rows["pref-bidir"], seed=1)
    assert bidir.pref_bidirectional is True and bidir.seed == 1 and bidir.key()["pref_bidirectional"] is True
    assert row_config(base, rows["pref-prompt"], seed=0).position_mode == "prompt"
    assert row_config(base, rows["pref"], seed=0) == dataclasses.replace(base, seed=0, method="dual", pref_rank=0)


def test_compare_bidirectional_and_prompt_only_pref_rows(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    from steering_vectors.cli import main

    data = tmp_path / "data"
    data.mkdir()
    _write_split(data, "train", 16)
    _write_split(data, "dev", 5)
    out, work = tmp_path / "comparison", tmp_path / "work"
    argv = ["compare", "--data", str(data), "--out", str(out), "--model", str(tiny_model_dir),
            "--rows", "pref,pref-bidir,pref-prompt", "--layers", "1,2", "--max-pairs", "6", "--held-out", "0.3",
            "--calib-pairs", "2", "--pref-steps", "3", "--pref-batch", "2", "--prompt-tokens", "24",
            "--response-tokens", "8", "--eval-response-tokens", "10", "--strengths", "0.5,1",
            "--work-dir", str(work), "--bf16", "off"]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    by_row = {r["row"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    assert list(by_row) == ["pref", "pref-bidir", "pref-prompt"]
    one_way = Profile.load(out / "profiles" / "comparison-pref-seed0.safetensors")
    both = Profile.load(out / "profiles" / "comparison-pref-bidir-seed0.safetensors")
    assert both.provenance["pref"]["bidirectional"] is True and "bidirectional" not in one_way.provenance["pref"]
    assert both.description.startswith("bi-directional preference-loss offsets") and both.method == "pref"
    assert not torch.equal(both.offsets[1], one_way.offsets[1])
    assert "pref (not RAHF), offsets, bi-directional" in (out / "report.md").read_text()
    # prompt tokens only: trained, kept and served in that mode, so its offsets differ from the one-way fit's
    prompt_only = Profile.load(out / "profiles" / "comparison-pref-prompt-seed0.safetensors")
    assert prompt_only.position_mode == "prompt" and one_way.position_mode == both.position_mode == "all"
    assert not torch.equal(prompt_only.offsets[1], one_way.offsets[1])
    # three stage folders: each fit is its own
    assert len(list(work.glob("fit-pref-*"))) == 3
