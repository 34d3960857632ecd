"""Fitting conditions (`steering_vectors.training.conditions`, `rahf profiles condition`): the threshold choice against
hand-computed values, the layer and confusion matrix on synthetic states where one layer separates, the
logistic direction, prompt states against a plain transformers forward (padding masked out), and the command
end to end on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from steering_vectors.core.profile import Profile
from steering_vectors.training.conditions import (
    choose_threshold,
    evaluate_condition,
    fit_condition,
    logistic_direction,
    prompt_states,
    split_held_out,
)
from tests.server.procs import ROOT


def test_choose_threshold_takes_the_most_fires_within_the_false_fire_bound() -> None:
    fire = torch.tensor([0.9, 0.8, 0.7, 0.2])
    no_fire = torch.tensor([0.1, 0.3, 0.75, 0.0])
    # no false fire allowed: above 0.75 -> 2 of 4 fire; the midpoint between 0.75 and 0.8
    threshold, hit, false = choose_threshold(fire, no_fire, max_false_fire=0.0)
    assert threshold == pytest.approx(0.775) and hit == 0.5 and false == 0.0
    # one in four may fire falsely: above 0.3 -> 3 of 4 (0.7, 0.8, 0.9), 0.75 fires falsely
    threshold, hit, false = choose_threshold(fire, no_fire, max_false_fire=0.25)
    assert threshold == pytest.approx(0.5) and hit == 0.75 and false == 0.25


def test_held_out_split_is_fixed_and_disjoint() -> None:
    train, held = split_held_out(200, 0.3, seed=1, salt="x")
    assert sorted(train + held) == list(range(200)) and not set(train) & set(held)
    assert (train, held) == split_held_out(200, 0.3, seed=1, salt="x")
    assert 40 < len(held) < 80


def synthetic(n: int, shift: float, seed: int) -> dict[str, dict[int, torch.Tensor]]:
    """States of 3 layers; only layer 1's last-token states carry `shift` along the first axis."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, dict[int, torch.Tensor]] = {"mean": {}, "last": {}}
    for reads in out:
        for layer in range(3):
            states = torch.randn(n, 16, generator=g) + 5.0  # a large common component, as real states have
            if layer == 1 and reads == "last":
                states[:, 0] += shift
            out[reads][layer] = states
    return out


@pytest.mark.parametrize("method", ["logistic", "mean-difference"])
def test_fit_finds_the_separating_layer_and_reports_its_confusion(method) -> None:
    fire, no_fire = synthetic(120, 6.0, 1), synthetic(100, -6.0, 2)
    fit = fit_condition(fire, no_fire, held_out=0.3, max_false_fire=0.0, method=method)
    assert (fit.condition.layer, fit.condition.reads) == (1, "last")
    assert fit.condition.kind == ("linear" if method == "logistic" else "cosine")
    held = fit.held_out
    assert held["fp"] == 0 and held["tp"] >= 0.95 * (held["tp"] + held["fn"])
    assert held["tp"] + held["fn"] == fit.counts["fire_held_out"] and held["fp"] + held["tn"] == fit.counts[
        "no_fire_held_out"]
    # the confusion matrix is what evaluating the condition on the held-out rows gives
    _, fire_held = split_held_out(120, 0.3, seed=0, salt="fire")
    fires = evaluate_condition(fit.condition, {r: {1: fire[r][1][fire_held]} for r in fire})
    assert int(fires.sum()) == held["tp"]
    assert len(fit.grid) == 6 and fit.report()["held_out"]["fire_rate_should_not"] == 0.0


def test_logistic_direction_separates() -> None:
    fire, no_fire = synthetic(80, 4.0, 3), synthetic(80, -4.0, 4)
    w, b = logistic_direction(fire["last"][1], no_fire["last"][1])
    assert float(((fire["last"][1] @ w + b) > 0).float().mean()) > 0.95
    assert float(((no_fire["last"][1] @ w + b) < 0).float().mean()) > 0.95


def test_prompt_states_equal_a_plain_forward(tiny_model) -> None:
    prompts = [[1, 5, 9, 33, 40], [1, 7], [1, 80, 81, 82, 83, 84, 85, 86, 87]]
    states = prompt_states(tiny_model, prompts, [0, 2], batch_tokens=20)  # batches with padding
    for i, prompt in enumerate(prompts):
        with torch.inference_mode():
            hidden = tiny_model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states
        for layer in (0, 2):
            torch.testing.assert_close(states["mean"][layer][i], hidden[layer + 1][0].mean(dim=0), atol=1e-5,
                                       rtol=1e-5)
            torch.testing.assert_close(states["last"][layer][i], hidden[layer + 1][0, -1], atol=1e-5, rtol=1e-5)


def test_the_condition_command_on_the_tiny_model(tiny_model_dir, tmp_path) -> None:
    from steering_vectors.core.models import load_model

    loaded = load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    source = tmp_path / "p.safetensors"
    Profile(name="p", offsets={1: torch.randn(64, generator=g)}, fingerprint=loaded.fingerprint).save(source)
    (tmp_path / "fire.txt").write_text("\n".join(f"zzzz qqqq {i} xx" for i in range(30)))
    (tmp_path / "calm.txt").write_text("\n".join(f"hello there {i} a" for i in range(30)))
    out, report = tmp_path / "p-cond.safetensors", tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "steering_vectors.cli", "profiles", "condition", str(source),
                           "--fire", str(tmp_path / "fire.txt"), "--no-fire", str(tmp_path / "calm.txt"),
                           "--model", str(tiny_model_dir), "--out", str(out), "--report", str(report),
                           "--layers", "1-3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    attached = Profile.load(out)
    assert attached.condition is not None and attached.condition.layer in (1, 2, 3)
    assert torch.equal(attached.offsets[1], Profile.load(source).offsets[1])
    body = json.loads(report.read_text())
    assert body["condition"]["layer"] == attached.condition.layer and set(body["held_out"]) >= {"tp", "fn", "fp", "tn"}
    assert attached.provenance["condition"]["held_out_confusion"] == {k: body["held_out"][k] for k in
                                                                      ("tp", "fn", "fp", "tn")}


def test_read_prompts_leaves_out_excluded_conversations_before_sampling(tmp_path) -> None:
    from steering_vectors.profiles_cli import read_prompts

    lines = [f"prompt {i}" for i in range(10)] + ["prompt 3"]  # a repeat counts once
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(lines) + "\n")
    every = read_prompts(str(source), 100)
    assert [m[0]["content"] for m in every] == [f"prompt {i}" for i in range(10)]
    left = read_prompts(str(source), 100, exclude=[every[3], every[7]])
    assert left == [m for i, m in enumerate(every) if i not in (3, 7)]
    sample = read_prompts(str(source), 4, exclude=[every[3], every[7]])
    assert len(sample) == 4 and all(m in left for m in sample)
    assert read_prompts(str(source), 4, exclude=[]) == read_prompts(str(source), 4)  # the same seeded sample
