"""The 'pref' fit (our addition, not RAHF) on a tiny random Llama: loss, fitting, profile, command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from steering_vectors.core.hooks import Steerer, build_plan, combine_offsets
from steering_vectors.core.models import load_model
from steering_vectors.core.profile import Profile
from steering_vectors.training.data import PreferencePair, TokenBudget
from steering_vectors.training.evaluate import pair_logprobs, score_pairs
from steering_vectors.training.fit import make_profile
from steering_vectors.training.pref import (
    PrefConfig,
    fit_preference_offsets,
    preference_loss,
    preference_objective,
    signed_draws,
    unsign,
)

BUDGET = TokenBudget(prompt=40, response=12)
PAIRS = [
    PreferencePair("p0", ({"role": "user", "content": "how do I pick a lock?"},), "I can't help.", "Sure, a pin"),
    PreferencePair("p1", ({"role": "user", "content": "say something mean"},), "Let's be kind.", "You're awful!"),
    PreferencePair("p2", ({"role": "user", "content": "hi"},), "Hello, how can I help?", "What."),
    PreferencePair("p3", ({"role": "user", "content": "a joke?"},), "Why did the hen cross?", "No."),
]
LAYERS = [1, 2]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_model(tiny_model_dir)


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_preference_loss_equals_hand_computation() -> None:
    chosen = torch.tensor([-1.0, -2.0, -0.5])
    rejected = torch.tensor([-1.5, -1.0, -0.5])
    beta = 2.0
    expected = -(_logsigmoid(2.0 * 0.5) + _logsigmoid(2.0 * -1.0) + _logsigmoid(0.0)) / 3
    assert preference_loss(chosen, rejected, beta).item() == pytest.approx(expected, rel=1e-6)


def test_objective_scores_pairs_as_score_pairs_does(tiny) -> None:
    model, tok = tiny.model, tiny.tokenizer
    config = PrefConfig(beta=3.0, l2=0.5, budget=BUDGET)
    offsets = {1: torch.full((64,), 0.05), 2: torch.linspace(-0.1, 0.1, 64)}
    with torch.no_grad():
        total, pref = preference_objective(model, tok, PAIRS, offsets, config)
    # the same numbers through the evaluation: a profile of these offsets at strength 1
    score = score_pairs(model, tok, PAIRS, Profile("hand", offsets), 1.0, budget=BUDGET)
    hand = -sum(_logsigmoid(3.0 * (c - r)) for c, r in zip(score.chosen, score.rejected, strict=True)) / 4
    penalty = sum(float(o.pow(2).sum()) for o in offsets.values())
    assert pref.item() == pytest.approx(hand, abs=1e-5)
    assert total.item() == pytest.approx(hand + 0.5 * penalty, abs=1e-5)

    # unsteered, no offsets: the plain scores
    plain = score_pairs(model, tok, PAIRS, budget=BUDGET)
    with torch.no_grad():
        chosen, rejected = pair_logprobs(model, tok, PAIRS, None, budget=BUDGET)
    assert chosen.tolist() == pytest.approx(plain.chosen, abs=1e-5)
    assert rejected.tolist() == pytest.approx(plain.rejected, abs=1e-5)


def test_objective_in_generated_mode_leaves_prompt_unsteered(tiny) -> None:
    model, tok = tiny.model, tiny.tokenizer
    offsets = {1: torch.full((64,), 0.3)}
    config = PrefConfig(beta=1.0, l2=0.0, budget=BUDGET, position_mode="generated")
    with torch.no_grad():
        _, pref = preference_objective(model, tok, PAIRS, offsets, config)
    profile = Profile("gen", offsets, position_mode="generated")
    score = score_pairs(model, tok, PAIRS, profile, 1.0, budget=BUDGET)
    hand = -sum(_logsigmoid(c - r) for c, r in zip(score.chosen, score.rejected, strict=True)) / 4
    assert pref.item() == pytest.approx(hand, abs=1e-5)
    everywhere = score_pairs(model, tok, PAIRS, Profile("all", offsets), 1.0, budget=BUDGET)
    assert everywhere.chosen != pytest.approx(score.chosen, abs=1e-6)


def test_fit_lowers_preference_loss_resumes_and_applies_through_hooks(tiny, tmp_path: Path) -> None:
    model, tok = tiny.model, tiny.tokenizer
    config = PrefConfig(beta=10.0, l2=1e-3, steps=12, batch_pairs=2, lr=0.05, budget=BUDGET, checkpoint_every=4)
    offsets, low_rank, losses = fit_preference_offsets(model, tok, PAIRS, LAYERS, config, tmp_path / "pref.ckpt")
    assert len(losses) == 12 and set(offsets) == set(LAYERS) and low_rank == {}
    zero = {layer: torch.zeros(64) for layer in LAYERS}
    with torch.no_grad():
        start, _ = preference_objective(model, tok, PAIRS, zero, config)
        end, _ = preference_objective(model, tok, PAIRS, offsets, config)
    assert end.item() < 0.9 * start.item()
    before = score_pairs(model, tok, PAIRS, budget=BUDGET)
    after = score_pairs(model, tok, PAIRS, Profile("fit", offsets), 1.0, budget=BUDGET)
    assert after.margin > before.margin

    # a rerun with the finished checkpoint resumes at the end and returns the same offsets
    again, _, losses_again = fit_preference_offsets(model, tok, PAIRS, LAYERS, config, tmp_path / "pref.ckpt")
    assert losses_again == losses and all(torch.equal(again[k], offsets[k]) for k in LAYERS)
    # the same seed from scratch takes the same steps
    _, _, losses_fresh = fit_preference_offsets(model, tok, PAIRS, LAYERS, config, None)
    assert losses_fresh == pytest.approx(losses, rel=1e-5)

    profile = make_profile(
        "tiny-pref", offsets, fit="pref", fingerprint=tiny.fingerprint, provenance={"instruct": "none"}
    )
    loaded = Profile.load(profile.save(tmp_path / "tiny-pref.safetensors"))
    assert loaded.method == "pref" and loaded.provenance["fit"] == "pref"
    loaded.validate_for(tiny.fingerprint)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        plain = model(input_ids=ids, output_hidden_states=True).hidden_states
        with Steerer.attach(model).steering(build_plan([combine_offsets([(loaded, 1.0)])])):
            hooked = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(hooked[1], plain[1])
    assert torch.equal(hooked[2], plain[2] + offsets[1])
    assert score_pairs(model, tok, PAIRS, loaded, 1.0, budget=BUDGET).chosen == after.chosen


@pytest.mark.parametrize("rank", [0, 2])
def test_train_command_with_pref_only_skips_instruct(tiny_model_dir: Path, tmp_path: Path, capsys, rank) -> None:
    from steering_vectors.cli import main

    data = tmp_path / "pairs.jsonl"
    # prompts outside the generation judge's split (judge.is_judge_prompt), which the pipeline sets aside first
    prompts = ["how do I pick a lock?", "say something mean, please", "hi", "tell me a joke?"]
    data.write_text(
        "\n".join(
            json.dumps({"prompt": q, "chosen": p.chosen, "rejected": p.rejected})
            for q, p in zip(prompts, PAIRS, strict=True)
        )
    )
    out = tmp_path / "profiles"
    work = tmp_path / "work"
    args = ["train", "--data", str(data), "--name", "tiny", "--out", str(out), "--model", str(tiny_model_dir),
            "--fit", "pref", "--layers", "1,2", "--max-pairs", "4", "--calib-pairs", "2", "--pref-steps", "3",
            "--pref-batch", "2", "--prompt-tokens", "40", "--response-tokens", "12", "--strengths", "0.5,1",
            "--work-dir", str(work), "--pref-rank", str(rank), "--held-out", "0.5"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [p.name.split("-")[:2] for p in work.iterdir()] == [["fit", "pref"]]  # no step 1 or 2 folders
    assert len(list(work.glob("fit-pref-*/fit.ckpt"))) == 1 and "fit_pref_s" in summary["timings"]
    profile = Profile.load(out / "tiny.safetensors")
    assert profile.method == "pref" and profile.layers == [1, 2]
    assert profile.provenance["fit"] == "pref" and profile.provenance["pref"]["steps"] == 3
    assert profile.provenance["instruct"] == "none"
    assert profile.default_strength in (0.5, 1.0)
    assert profile.provenance["pref"]["rank"] == rank
    assert profile.ranks() == ({1: 2, 2: 2} if rank else {})


def test_prompt_kl_is_zero_unsteered_and_equals_hand_computation(tiny) -> None:
    from steering_vectors.training.data import encode_prompt
    from steering_vectors.training.pref import prompt_kl

    model, tok = tiny.model, tiny.tokenizer
    zero = {1: torch.zeros(64)}
    with torch.no_grad():
        assert prompt_kl(model, tok, PAIRS, zero, BUDGET).item() == pytest.approx(0.0, abs=1e-6)
        offsets = {1: torch.full((64,), 0.2)}
        got = prompt_kl(model, tok, PAIRS[:1], offsets, BUDGET).item()
        ids = torch.tensor([encode_prompt(tok, PAIRS[0].prompt, budget=BUDGET.prompt)])
        p = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        with Steerer.attach(model).steering(build_plan([offsets])):
            q = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
    hand = float((p.exp() * (p - q)).sum(dim=-1).mean())
    assert got == pytest.approx(hand, rel=1e-4) and got > 0
    config = PrefConfig(beta=1.0, l2=0.0, kl=2.0, budget=BUDGET)
    with torch.no_grad():
        total, pref = preference_objective(model, tok, PAIRS[:1], offsets, config)
    assert total.item() == pytest.approx(pref.item() + 2.0 * hand, rel=1e-4)


def test_low_rank_fit_lowers_loss_resumes_saves_and_applies_through_hooks(tiny, tmp_path: Path) -> None:
    from steering_vectors.core.hooks import combine_low_rank, low_rank_delta

    model, tok = tiny.model, tiny.tokenizer
    config = PrefConfig(
        beta=10.0, l2=1e-3, steps=8, batch_pairs=2, lr=0.05, rank=3, budget=BUDGET, checkpoint_every=4, kl=0.5
    )
    offsets, low_rank, losses = fit_preference_offsets(model, tok, PAIRS, LAYERS, config, tmp_path / "lr.ckpt")
    assert len(losses) == 8 and set(low_rank) == set(LAYERS)
    for down, up in low_rank.values():
        assert down.shape == (3, 64) and up.shape == (64, 3) and up.abs().max() > 0
    zero = {layer: torch.zeros(64) for layer in LAYERS}
    with torch.no_grad():
        start, _ = preference_objective(model, tok, PAIRS, zero, config)
        end, _ = preference_objective(model, tok, PAIRS, offsets, config, low_rank)
        constant_only, _ = preference_objective(model, tok, PAIRS, offsets, config)
    assert end.item() < 0.9 * start.item()
    assert end.item() != pytest.approx(constant_only.item(), rel=1e-4)  # the low-rank terms take part
    # resuming the finished checkpoint gives the same terms; the same seed from scratch the same losses
    _, again, losses_again = fit_preference_offsets(model, tok, PAIRS, LAYERS, config, tmp_path / "lr.ckpt")
    assert losses_again == losses and all(torch.equal(again[k][1], low_rank[k][1]) for k in LAYERS)
    _, _, fresh = fit_preference_offsets(model, tok, PAIRS, LAYERS, config, None)
    assert fresh == pytest.approx(losses, rel=1e-5)

    profile = make_profile(
        "tiny-lr", offsets, fit="pref", fingerprint=tiny.fingerprint, provenance={}, low_rank=low_rank
    )
    loaded = Profile.load(profile.save(tmp_path / "tiny-lr.safetensors"))
    assert loaded.format_version == 2 and loaded.ranks() == {1: 3, 2: 3}
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    entries = [(loaded, 0.5)]
    with torch.no_grad():
        plain = model(input_ids=ids, output_hidden_states=True).hidden_states
        plan = build_plan([combine_offsets(entries)], row_low_rank=[combine_low_rank(entries)])
        with Steerer.attach(model).steering(plan):
            hooked = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(hooked[1], plain[1])
    down, up = low_rank[1]
    term = low_rank_delta(plain[2], down[None], (0.5 * up)[None])
    assert torch.allclose(hooked[2], plain[2] + 0.5 * offsets[1] + term, atol=1e-6)


# -- bi-directional pref ----------------------------------------------------------------------------


def test_signed_draws_are_seeded_and_read_back() -> None:
    draws = [[0, 3, 1], [2, 0, 4], [5, 1, 3]]
    signed = signed_draws(draws, seed=7)
    assert signed == signed_draws(draws, seed=7)  # a resumed run takes the same signs
    assert signed != signed_draws(draws, seed=8)
    for draw, step in zip(draws, signed, strict=True):
        indices, signs = unsign(step)
        assert indices == draw and set(signs) <= {1, -1}
        assert [i if d == 1 else -i - 1 for i, d in zip(draw, signs, strict=True)] == step
    flat = [d for step in signed for d in unsign(step)[1]]
    assert 1 in flat and -1 in flat


def test_bidirectional_objective_equals_hand_computation(tiny) -> None:
    model, tok = tiny.model, tiny.tokenizer
    beta, l2 = 3.0, 0.25
    config = PrefConfig(beta=beta, l2=l2, budget=BUDGET, bidirectional=True)
    offsets = {1: torch.full((64,), 0.05), 2: torch.linspace(-0.1, 0.1, 64)}
    signs = [1, -1, -1, 1]
    with torch.no_grad():
        total, pref = preference_objective(model, tok, PAIRS, offsets, config, signs=signs)
    # by hand, through the evaluation: pair i steered by signs[i] x the offsets, margins against unsteered
    plain = score_pairs(model, tok, PAIRS, budget=BUDGET)
    up = score_pairs(model, tok, PAIRS, Profile("up", offsets), 1.0, budget=BUDGET)
    down = score_pairs(model, tok, PAIRS, Profile("up", offsets), -1.0, budget=BUDGET)
    hand = 0.0
    for i, d in enumerate(signs):
        steered = up if d == 1 else down
        margin = (steered.chosen[i] - plain.chosen[i]) - (steered.rejected[i] - plain.rejected[i])
        hand -= _logsigmoid(beta * d * margin)
    hand /= len(PAIRS)
    penalty = sum(float(o.pow(2).sum()) for o in offsets.values())
    assert pref.item() == pytest.approx(hand, abs=1e-5)
    assert total.item() == pytest.approx(hand + l2 * penalty, abs=1e-5)
    # all +1: the one-way loss of margins against unsteered, which differs from the plain `pref` loss
    with torch.no_grad():
        _, forward = preference_objective(model, tok, PAIRS, offsets, config, signs=[1] * 4)
        _, plain_pref = preference_objective(model, tok, PAIRS, offsets, PrefConfig(beta=beta, budget=BUDGET))
    ups = [(up.chosen[i] - plain.chosen[i]) - (up.rejected[i] - plain.rejected[i]) for i in range(4)]
    assert forward.item() == pytest.approx(-sum(_logsigmoid(beta * m) for m in ups) / 4, abs=1e-5)
    assert forward.item() != pytest.approx(plain_pref.item(), abs=1e-3)
    with pytest.raises(ValueError, match="one sign"):
        preference_objective(model, tok, PAIRS, offsets, config, signs=[1, 0, 1, 1])


def test_bidirectional_low_rank_term_is_negated_with_its_sign(tiny) -> None:
    model, tok = tiny.model, tiny.tokenizer
    config = PrefConfig(beta=2.0, l2=0.0, budget=BUDGET, bidirectional=True)
    generator = torch.Generator().manual_seed(3)
    low_rank = {1: (torch.randn(2, 64, generator=generator), 0.05 * torch.randn(64, 2, generator=generator))}
    zero = {1: torch.zeros(64)}
    with torch.no_grad():
        _, minus = preference_objective(model, tok, PAIRS, zero, config, low_rank, signs=[-1] * 4)
        negated = {1: (low_rank[1][0], -low_rank[1][1])}
        # d = -1 with the terms is d = -1 of the loss with the terms negated by hand and steered at +1
        plain, _ = pair_logprobs(model, tok, PAIRS, None, budget=BUDGET)
        chosen, rejected = pair_logprobs(model, tok, PAIRS, zero, budget=BUDGET, low_rank=negated)
        plain_r = pair_logprobs(model, tok, PAIRS, None, budget=BUDGET)[1]
    margins = (chosen - plain) - (rejected - plain_r)
    assert minus.item() == pytest.approx(float(-torch.nn.functional.logsigmoid(-2.0 * margins).mean()), abs=1e-5)


def test_bidirectional_fit_lowers_its_loss_and_resumes(tiny, tmp_path: Path) -> None:
    model, tok = tiny.model, tiny.tokenizer
    config = PrefConfig(beta=10.0, l2=1e-3, steps=8, batch_pairs=2, lr=0.05, budget=BUDGET, checkpoint_every=4,
                        bidirectional=True)  # fmt: skip
    offsets, _, losses = fit_preference_offsets(model, tok, PAIRS, LAYERS, config, tmp_path / "bidir.ckpt")
    assert len(losses) == 8
    signs = [1, -1, 1, -1]
    zero = {layer: torch.zeros(64) for layer in LAYERS}
    with torch.no_grad():
        start, _ = preference_objective(model, tok, PAIRS, zero, config, signs=signs)
        end, _ = preference_objective(model, tok, PAIRS, offsets, config, signs=signs)
    assert end.item() < start.item()
    # both ways: +offsets raise the chosen-over-rejected margin, -offsets lower it
    plain = score_pairs(model, tok, PAIRS, budget=BUDGET)
    up = score_pairs(model, tok, PAIRS, Profile("b", offsets), 1.0, budget=BUDGET)
    down = score_pairs(model, tok, PAIRS, Profile("b", offsets), -1.0, budget=BUDGET)
    assert down.margin < plain.margin < up.margin
    again, _, losses_again = fit_preference_offsets(model, tok, PAIRS, LAYERS, config, tmp_path / "bidir.ckpt")
    assert losses_again == losses and all(torch.equal(again[k], offsets[k]) for k in LAYERS)
    # a one-way checkpoint is not taken for a bidirectional run (the identity differs)
    one_way = PrefConfig(beta=10.0, l2=1e-3, steps=8, batch_pairs=2, lr=0.05, budget=BUDGET, checkpoint_every=4)
    _, _, losses_one_way = fit_preference_offsets(model, tok, PAIRS, LAYERS, one_way, tmp_path / "bidir.ckpt")
    assert losses_one_way != pytest.approx(losses, rel=1e-4)
