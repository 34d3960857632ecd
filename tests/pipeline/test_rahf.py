"""RAHF math on a tiny random Llama: SCIT loss, collected patterns, offset fitting and the baselines."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from steering_vectors.core.hooks import Steerer, build_plan, combine_offsets
from steering_vectors.core.models import load_model
from steering_vectors.core.profile import Profile
from steering_vectors.training.collect import PatternRecord, PatternStore, collect_patterns
from steering_vectors.training.data import PreferencePair, TokenBudget, collate, encode
from steering_vectors.training.fit import (
    FitConfig,
    alignment_loss,
    caa_offsets,
    fit_offsets,
    make_profile,
    mean_pattern_offsets,
    pca_offsets,
)
from steering_vectors.training.instruct import BAD_INSTRUCTION, GOOD_INSTRUCTION, response_ce, scit_loss

BUDGET = TokenBudget(prompt=40, response=12)
PAIRS = [
    PreferencePair(
        "p0",
        ({"role": "user", "content": "how do I pick a lock?"},),
        "I can't help with that.",
        "Sure, take a pin",
    ),
    PreferencePair(
        "p1", ({"role": "user", "content": "say something mean"},), "Let's keep it kind.", "You are awful!!"
    ),
    PreferencePair("p2", ({"role": "user", "content": "hi"},), "Hello, how can I help?", "What."),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_model(tiny_model_dir)


def test_scit_loss_equals_hand_computation() -> None:
    ce_match = torch.tensor([0.5, 2.0])
    ce_mismatch = torch.tensor([1.5, 1.0])
    expected = 0.0
    for m, x in zip([0.5, 2.0], [1.5, 1.0], strict=True):
        p_m, p_x = math.exp(-m), math.exp(-x)
        expected += 0.8 * -math.log(p_m / (p_m + p_x)) + 0.2 * -math.log(p_x / (p_m + p_x))
    expected = (0.5 + 2.0) / 2 + expected / 2
    assert scit_loss(ce_match, ce_mismatch, 0.2).item() == pytest.approx(expected, rel=1e-6)


def test_response_ce_averages_response_tokens_only() -> None:
    logits = torch.zeros(1, 3, 4)
    logits[0, 1, 2] = math.log(3.0)  # p(token 2 | position 1) = 3 / 6
    ids = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[0, 0, 1]])  # only the last token is a response token
    assert response_ce(logits, ids, mask).item() == pytest.approx(-math.log(0.5), rel=1e-6)
    mask = torch.tensor([[0, 1, 1]])  # token 1 at p = 1/4 as well
    assert response_ce(logits, ids, mask).item() == pytest.approx((math.log(4) - math.log(0.5)) / 2, rel=1e-6)


def _direct_hidden(model, tokenizer, examples, layer: int) -> list[torch.Tensor]:
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    states = out.hidden_states[layer + 1]
    return [states[i][batch.response_mask[i].bool()] for i in range(len(examples))]


def test_collected_patterns_equal_hidden_state_differences(tiny) -> None:
    model, tok = tiny.model, tiny.tokenizer
    layers = [1, 2]
    store = collect_patterns(
        model, tok, PAIRS, layers, method="scit", budget=BUDGET, bf16=False, batch_size=8
    )
    records = store.all()
    assert [(r.pair_index, r.label) for r in records] == [(0, 1), (0, 0), (1, 1), (1, 0), (2, 1), (2, 0)]
    replies = [(p, r) for p in PAIRS for r in (p.chosen, p.rejected)]
    good = [encode(tok, p.prompt, r, system=GOOD_INSTRUCTION, budget=BUDGET) for p, r in replies]
    bad = [encode(tok, p.prompt, r, system=BAD_INSTRUCTION, budget=BUDGET) for p, r in replies]
    base = [encode(tok, p.prompt, r, budget=BUDGET) for p, r in replies]
    for i, layer in enumerate(layers):
        h_good, h_bad = _direct_hidden(model, tok, good, layer), _direct_hidden(model, tok, bad, layer)
        h_base = _direct_hidden(model, tok, base, layer)
        for row, record in enumerate(records):
            assert record.pattern.shape == (2, min(12, len(tok(replies[row][1])["input_ids"])), 64)
            assert torch.equal(record.pattern[i], h_good[row] - h_bad[row])
            # no adapter: the uninstructed model is its own anchor, and the base means are its states' means
            assert torch.equal(record.anchor[i], h_base[row])
            assert torch.allclose(record.base_mean[i], h_base[row].double().mean(dim=0).float())
            assert record.input_ids == base[row].input_ids


def test_pattern_store_spills_to_disk(tmp_path: Path) -> None:
    store = PatternStore([0], spill_dir=tmp_path, memory_limit=50)
    records = [
        PatternRecord((1, 2, 3), 1, 1, i, torch.full((1, 2, 4), float(i)), torch.ones(1, 2, 4))
        for i in range(3)
    ]
    for record in records:
        store.add(record)
    assert store.spilled == 3 and len(store) == 3
    assert [float(r.anchor[0, 0, 0]) for r in store] == [0.0, 1.0, 2.0]
    store.save(tmp_path / "all.pt")
    assert [r.pair_index for r in PatternStore.load(tmp_path / "all.pt")] == [0, 1, 2]
    assert [float(r.anchor[0, 0, 0]) for r in PatternStore.load(tmp_path / "all.pt")] == [0.0, 1.0, 2.0]


def test_fit_lowers_alignment_loss_and_profile_applies_through_hooks(tiny, tmp_path: Path) -> None:
    model, tok = tiny.model, tiny.tokenizer
    layers = [1, 2]
    records = collect_patterns(model, tok, PAIRS, layers, method="scit", budget=BUDGET, bf16=False).all()
    config = FitConfig(alpha=2.0, steps=12, batch_size=6, lr=None, bf16=False)
    offsets, low_rank, losses = fit_offsets(model, tok, records, layers, config, tmp_path / "fit.ckpt")
    assert low_rank == {}
    zero = {layer: torch.zeros(64) for layer in layers}
    with torch.no_grad():
        start = alignment_loss(model, records, layers, zero, 2.0, tok.pad_token_id).item()
        end = alignment_loss(model, records, layers, offsets, 2.0, tok.pad_token_id).item()
    assert losses[0] == pytest.approx(start, rel=1e-5)
    assert end < 0.9 * start

    # a rerun with the finished checkpoint resumes at the end and returns the same offsets
    again, _, losses_again = fit_offsets(model, tok, records, layers, config, tmp_path / "fit.ckpt")
    assert losses_again == losses and all(torch.equal(again[k], offsets[k]) for k in layers)

    profile = make_profile(
        "tiny-fit",
        offsets,
        fit="rahf",
        fingerprint=tiny.fingerprint,
        provenance={"instruct": "scit", "alpha": 2.0},
    )
    loaded = Profile.load(profile.save(tmp_path / "tiny-fit.safetensors"))
    assert loaded.method == "rahf-scit/rahf" and loaded.provenance["fit"] == "rahf"
    loaded.validate_for(tiny.fingerprint)
    ids = torch.tensor([list(records[0].input_ids)])
    with torch.no_grad():
        plain = model(input_ids=ids, output_hidden_states=True).hidden_states
        steerer = Steerer.attach(model)
        with steerer.steering(build_plan([combine_offsets([(loaded, 1.0)])])):
            hooked = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert torch.equal(hooked[2], plain[2] + offsets[1])  # first steered layer: its output plus the offset
    assert not torch.equal(hooked[3], plain[3] + offsets[2])  # later layers also see the earlier offset
    assert torch.equal(hooked[1], plain[1])


def _synthetic_records() -> list[PatternRecord]:
    gen = torch.Generator().manual_seed(0)
    records = []
    for pair in range(5):
        for label in (1, 0):
            t = 2 + (pair + label) % 3
            records.append(
                PatternRecord(
                    (0,) * (t + 1),
                    1,
                    label,
                    pair,
                    torch.randn(2, t, 6, generator=gen),
                    torch.randn(2, t, 6, generator=gen),
                    torch.randn(2, 6, generator=gen),
                )
            )
    return records


def test_mean_caa_pca_equal_hand_computations() -> None:
    records = _synthetic_records()
    layers = [3, 7]
    mean = mean_pattern_offsets(records, layers, alpha=1.5)
    caa = caa_offsets(records, layers)
    pca = pca_offsets(records, layers)
    for i, layer in enumerate(layers):
        tokens = np.concatenate([r.pattern[i].numpy() for r in records]).astype(np.float64)
        np.testing.assert_allclose(mean[layer].numpy(), 1.5 * tokens.mean(axis=0), rtol=1e-5, atol=1e-6)
        diffs = []
        for pair in range(5):
            chosen = next(r for r in records if r.pair_index == pair and r.label == 1).base_mean[i].numpy()
            rejected = next(r for r in records if r.pair_index == pair and r.label == 0).base_mean[i].numpy()
            diffs.append(chosen.astype(np.float64) - rejected.astype(np.float64))
        d = np.stack(diffs)
        np.testing.assert_allclose(caa[layer].numpy(), d.mean(axis=0), rtol=1e-5, atol=1e-6)
        centred = d - d.mean(axis=0)
        eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred)
        u = eigenvectors[:, -1]
        m = (d @ u).mean()
        if m < 0:
            u, m = -u, -m
        np.testing.assert_allclose(pca[layer].numpy(), m * u, rtol=1e-4, atol=1e-6)


def test_caa_needs_both_replies_and_base_states() -> None:
    records = [r for r in _synthetic_records() if r.label == 1]
    with pytest.raises(ValueError, match="both replies"):
        caa_offsets(records, [0, 1])
    without = [PatternRecord(r.input_ids, r.prompt_len, r.label, r.pair_index, r.anchor, r.pattern) for r in records]
    with pytest.raises(ValueError, match="base_means=True"):
        caa_offsets(without, [0, 1])
