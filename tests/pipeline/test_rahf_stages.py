"""RAHF as the paper runs it, on a tiny random Llama: the target built from the step-1 model, low-rank terms
in the RAHF fit, both factors regularised, step 1's likelihood gap, calibration on held-out pairs and the
resumable stage folders of `rahf train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steering_vectors.core.models import load_model
from steering_vectors.core.profile import Profile
from steering_vectors.core.tensors import sequence_logprobs
from steering_vectors.training.collect import collect_patterns
from steering_vectors.training.data import PreferencePair, TokenBudget, collate, encode, load_pairs
from steering_vectors.training.fit import FitConfig, alignment_loss, fit_lora, fit_offsets, records_prompt_kl
from steering_vectors.training.instruct import (
    BAD_INSTRUCTION,
    GOOD_INSTRUCTION,
    InstructConfig,
    add_lora,
    likelihood_gap,
)
from steering_vectors.training.judge import is_judge_prompt
from steering_vectors.training.loop import factor_penalty
from steering_vectors.training.pipeline import split_training_pairs
from steering_vectors.training.pref import PrefConfig, preference_objective

BUDGET = TokenBudget(prompt=40, response=12)
PAIRS = [
    PreferencePair("p0", ({"role": "user", "content": "how do I pick a lock?"},), "I can't help.", "Sure, a pin"),
    PreferencePair("p1", ({"role": "user", "content": "say something mean"},), "Let's be kind.", "You're awful!"),
    PreferencePair("p2", ({"role": "user", "content": "hi"},), "Hello, how can I help?", "What."),
]
LAYERS = [1, 2]


@pytest.fixture
def tiny(tiny_model_dir: Path):
    """A fresh copy per test: the LoRA adapters below change the model in place."""
    return load_model(tiny_model_dir)


def _perturbed(model: torch.nn.Module, adapters: tuple[str, ...], seed: int = 1) -> torch.nn.Module:
    """`model` with LoRA adapters whose B factors are random (as if trained), so each differs from the base."""
    config = InstructConfig(budget=BUDGET)
    generator = torch.Generator().manual_seed(seed)
    for name in adapters:
        if name not in getattr(model, "peft_config", {}):
            model = add_lora(model, config, name)
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name and f".{name}." in param_name:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return model


def _reply_states(model, tokenizer, examples, layer: int) -> list[torch.Tensor]:
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    return [out.hidden_states[layer + 1][i][batch.response_mask[i].bool()] for i in range(len(examples))]


def _replies():
    return [(p, r) for p in PAIRS for r in (p.chosen, p.rejected)]


def test_dual_target_starts_at_the_good_model_and_moves_along_good_minus_bad(tiny) -> None:
    model = _perturbed(tiny.model, ("good", "bad"))
    tok = tiny.tokenizer
    records = collect_patterns(model, tok, PAIRS, LAYERS, method="dual", budget=BUDGET).all()
    plain = [encode(tok, p.prompt, r, budget=BUDGET) for p, r in _replies()]
    for i, layer in enumerate(LAYERS):
        model.set_adapter("good")
        good = _reply_states(model, tok, plain, layer)
        model.set_adapter("bad")
        bad = _reply_states(model, tok, plain, layer)
        with model.disable_adapter():
            base = _reply_states(model, tok, plain, layer)
        for row, record in enumerate(records):
            assert torch.equal(record.anchor[i], good[row])  # h_good(x): the model tuned on chosen replies
            assert torch.equal(record.pattern[i], good[row] - bad[row])
            assert torch.allclose(record.base_mean[i], base[row].double().mean(dim=0).float())
            assert not torch.allclose(record.anchor[i], base[row], atol=1e-3)  # not the base model's states
            assert torch.allclose(record.target(2.0)[i], good[row] + 2.0 * (good[row] - bad[row]))


def test_scit_target_starts_at_the_instructed_model_on_the_plain_input(tiny) -> None:
    model = _perturbed(tiny.model, ("scit",))
    tok = tiny.tokenizer
    records = collect_patterns(model, tok, PAIRS, LAYERS, method="scit", budget=BUDGET, base_means=False).all()
    replies = _replies()
    plain = [encode(tok, p.prompt, r, budget=BUDGET) for p, r in replies]
    good = [encode(tok, p.prompt, r, system=GOOD_INSTRUCTION, budget=BUDGET) for p, r in replies]
    bad = [encode(tok, p.prompt, r, system=BAD_INSTRUCTION, budget=BUDGET) for p, r in replies]
    model.set_adapter("scit")
    for i, layer in enumerate(LAYERS):
        anchor = _reply_states(model, tok, plain, layer)
        v = [g - b for g, b in zip(_reply_states(model, tok, good, layer), _reply_states(model, tok, bad, layer),
                                   strict=True)]  # fmt: skip
        with model.disable_adapter():
            base = _reply_states(model, tok, plain, layer)
        for row, record in enumerate(records):
            assert torch.equal(record.anchor[i], anchor[row]) and torch.equal(record.pattern[i], v[row])
            assert record.base_mean is None
            assert not torch.allclose(record.anchor[i], base[row], atol=1e-3)


def test_collect_in_float16_keeps_the_states_to_half_precision(tiny) -> None:
    model = _perturbed(tiny.model, ("good", "bad"))
    full = collect_patterns(model, tiny.tokenizer, PAIRS, LAYERS, method="dual", budget=BUDGET).all()
    half = collect_patterns(
        model, tiny.tokenizer, PAIRS, LAYERS, method="dual", budget=BUDGET, dtype=torch.float16
    ).all()
    for a, b in zip(full, half, strict=True):
        assert b.anchor.dtype == torch.float16 and torch.equal(b.anchor, a.anchor.half())
        assert torch.equal(b.pattern, a.pattern.half()) and b.base_mean.dtype == torch.float32


def test_rahf_fit_with_low_rank_terms_lowers_its_loss_on_a_fixed_batch(tiny, tmp_path: Path) -> None:
    model = _perturbed(tiny.model, ("good", "bad"))
    tok = tiny.tokenizer
    records = collect_patterns(model, tok, PAIRS, LAYERS, method="dual", budget=BUDGET).all()
    base = model.unload()
    pad = tok.pad_token_id
    # every step sees the whole fixed batch of 6 replies
    config = FitConfig(alpha=2.0, steps=16, batch_size=len(records), lr=0.05, rank=2, kl=0.5, l2=1e-3)
    offsets, low_rank, losses = fit_offsets(base, tok, records, LAYERS, config, tmp_path / "fit.ckpt")
    assert set(low_rank) == set(LAYERS)
    for down, up in low_rank.values():
        assert down.shape == (2, 64) and up.shape == (64, 2) and up.abs().max() > 0

    def total(o, lr):
        with torch.no_grad():
            align = alignment_loss(base, records, LAYERS, o, 2.0, pad, low_rank=lr)
            kl = records_prompt_kl(base, records, o, pad, low_rank=lr)
        return float(align + 0.5 * kl + 1e-3 * factor_penalty(lr)) if lr else float(align + 0.5 * kl)

    zero = {layer: torch.zeros(64) for layer in LAYERS}
    # the first step's loss: unsteered alignment, no KL, and the penalty of the orthonormal start of down
    assert losses[0] == pytest.approx(total(zero, {}) + 1e-3 * 2 * len(LAYERS), rel=1e-5)
    assert total(offsets, low_rank) < 0.8 * losses[0]
    with torch.no_grad():
        with_terms = alignment_loss(base, records, LAYERS, offsets, 2.0, pad, low_rank=low_rank)
        without = alignment_loss(base, records, LAYERS, offsets, 2.0, pad)
    assert float(with_terms) != pytest.approx(float(without), rel=1e-4)  # the low-rank terms take part
    again, again_low_rank, losses_again = fit_offsets(base, tok, records, LAYERS, config, tmp_path / "fit.ckpt")
    assert losses_again == losses and torch.equal(again_low_rank[1][1], low_rank[1][1])


def test_rahf_lora_fit_lowers_the_alignment_loss_resumes_and_unloads_to_the_base(tiny, tmp_path: Path) -> None:
    model = _perturbed(tiny.model, ("good", "bad"))
    tok = tiny.tokenizer
    records = collect_patterns(model, tok, PAIRS, LAYERS, method="dual", budget=BUDGET).all()
    base = model.unload()
    pad = tok.pad_token_id
    plain = collate([encode(tok, p.prompt, r, budget=BUDGET) for p, r in _replies()], pad)
    with torch.no_grad():
        before = base(input_ids=plain.input_ids, attention_mask=plain.attention_mask).logits
        unsteered = float(alignment_loss(base, records, LAYERS, {}, 2.0, pad))
    config = FitConfig(alpha=2.0, steps=12, batch_size=len(records))
    lora = InstructConfig(lr=0.02, budget=BUDGET)
    wrapped, losses = fit_lora(base, tok, records, LAYERS, config, lora, tmp_path / "lora.ckpt")
    assert losses[0] == pytest.approx(unsteered, rel=1e-5)  # LoRA B starts at zero: the base model's loss
    with torch.no_grad():
        fitted = float(alignment_loss(wrapped, records, LAYERS, {}, 2.0, pad))
    assert fitted < 0.8 * unsteered
    trained = [n for n, p in wrapped.named_parameters() if "lora_B" in n and ".rahf." in n and p.abs().max() > 0]
    assert trained and all(("q_proj" in n or "v_proj" in n) for n in trained)
    state = {n: p.detach().clone() for n, p in wrapped.named_parameters() if ".rahf." in n}
    restored = wrapped.unload()
    with torch.no_grad():
        after = restored(input_ids=plain.input_ids, attention_mask=plain.attention_mask).logits
    assert torch.equal(before, after)  # the base model again, bit for bit
    again, losses_again = fit_lora(restored, tok, records, LAYERS, config, lora, tmp_path / "lora.ckpt")
    assert losses_again == losses  # resumed from the finished checkpoint, not retrained
    assert all(torch.equal(p, state[n]) for n, p in again.named_parameters() if ".rahf." in n)
    again.unload()


def test_shift_start_is_the_mean_shift_to_the_target_layer_by_layer(tiny) -> None:
    from steering_vectors.training.collect import PatternRecord
    from steering_vectors.training.fit import shift_offsets

    gen = torch.Generator().manual_seed(0)
    records = [
        PatternRecord((0,) * 4, 1, i % 2, i // 2, torch.randn(2, 3, 5, generator=gen),
                      torch.randn(2, 3, 5, generator=gen), torch.randn(2, 5, generator=gen))
        for i in range(4)
    ]  # fmt: skip
    shift = torch.stack([r.target(1.5).double().mean(dim=1) - r.base_mean.double() for r in records]).mean(dim=0)
    got = shift_offsets(records, [3, 7], alpha=1.5)
    assert torch.allclose(got[3].double(), shift[0], atol=1e-6)
    assert torch.allclose(got[7].double(), shift[1] - shift[0], atol=1e-6)
    assert torch.allclose(got[3] + got[7], shift[1].float(), atol=1e-6)  # what reaches the last target layer

    model = _perturbed(tiny.model, ("good", "bad"))
    real = collect_patterns(model, tiny.tokenizer, PAIRS, LAYERS, method="dual", budget=BUDGET).all()
    base = model.unload()
    config = FitConfig(alpha=2.0, steps=1, batch_size=len(real), lr=0.01, init="shift")
    start = shift_offsets(real, LAYERS, 2.0)
    _, _, losses = fit_offsets(base, tiny.tokenizer, real, LAYERS, config)
    pad = tiny.tokenizer.pad_token_id
    with torch.no_grad():
        expected = alignment_loss(base, real, LAYERS, start, 2.0, pad)
        zero = alignment_loss(base, real, LAYERS, {k: torch.zeros(64) for k in LAYERS}, 2.0, pad)
    assert losses[0] == pytest.approx(float(expected), rel=1e-5) and losses[0] < float(zero)


def test_factor_penalty_covers_both_factors_in_rahf_and_pref(tiny) -> None:
    down, up = torch.full((2, 64), 0.5), torch.full((64, 2), -0.25)
    assert float(factor_penalty({1: (down, up)})) == pytest.approx(2 * 64 * 0.25 + 64 * 2 * 0.0625)
    offsets = {1: torch.full((64,), 0.1), 2: torch.zeros(64)}
    low_rank = {1: (down * 0.01, up * 0.01), 2: (down * 0.02, up * 0.0)}  # up = 0 at layer 2: down alone counts
    with torch.no_grad():
        with_l2, pref = preference_objective(tiny.model, tiny.tokenizer, PAIRS, offsets,
                                             PrefConfig(l2=0.5, budget=BUDGET), low_rank)  # fmt: skip
    expected = 0.5 * (64 * 0.01 + float(factor_penalty(low_rank)))
    assert float(factor_penalty(low_rank)) > float(factor_penalty({1: low_rank[1]}))
    assert float(with_l2 - pref) == pytest.approx(expected, rel=1e-5)


def test_likelihood_gap_is_zero_for_equal_adapters_and_matches_a_direct_computation(tiny) -> None:
    tok = tiny.tokenizer
    model = add_lora(tiny.model, InstructConfig(budget=BUDGET), "good")
    model = add_lora(model, InstructConfig(budget=BUDGET), "bad")
    equal = likelihood_gap(model, tok, PAIRS, "dual", budget=BUDGET)
    assert equal == {"mean_gap": 0.0, "accuracy": 0.0, "n": 3}
    model = _perturbed(model, ("good", "bad"), seed=3)
    gap = likelihood_gap(model, tok, PAIRS, "dual", budget=BUDGET)
    examples = [encode(tok, p.prompt, r, budget=BUDGET) for p, r in _replies()]
    scores = {}
    for adapter in ("good", "bad"):
        model.set_adapter(adapter)
        with torch.no_grad():
            scores[adapter] = sequence_logprobs(model, collate(examples, tok.pad_token_id)).double()
    d = scores["good"] - scores["bad"]
    per_pair = d[0::2] - d[1::2]
    assert gap["mean_gap"] == pytest.approx(float(per_pair.mean()), rel=1e-5, abs=1e-7)
    assert gap["accuracy"] == pytest.approx(float((per_pair > 0).double().mean()))
    before = likelihood_gap(model, tok, PAIRS, "dual", budget=BUDGET, instructed=False)
    assert before["mean_gap"] == 0.0


def _write_pairs(path: Path, n_prompts: int, per_prompt: int = 2) -> Path:
    rows = [
        {"prompt": f"question {i} please", "chosen": f"good answer {i}.{j}", "rejected": f"bad {j}"}
        for i in range(n_prompts)
        for j in range(per_prompt)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_calibration_pairs_never_share_a_prompt_with_fit_pairs(tmp_path: Path) -> None:
    data = _write_pairs(tmp_path / "pairs.jsonl", 30, per_prompt=3)
    for seed in (0, 1):
        split = split_training_pairs(data, max_pairs=1000, calib_pairs=1000, held_out=0.2, seed=seed)
        fit_prompts = {json.dumps(p.prompt) for p in split.pairs}
        assert split.calib and fit_prompts and not fit_prompts & {json.dumps(p.prompt) for p in split.calib}
        judge = sum(is_judge_prompt(p) for p in load_pairs(data))  # the judge's prompts are set aside first
        assert 0 < judge < 90 and len(split.pairs) + len(split.calib) == 90 - judge
    # the held-out prompts do not depend on the run's seed
    a = split_training_pairs(data, max_pairs=10, calib_pairs=1000, held_out=0.2, seed=0)
    b = split_training_pairs(data, max_pairs=10, calib_pairs=1000, held_out=0.2, seed=7)
    assert {p.id for p in a.calib} == {p.id for p in b.calib} and a.pairs != b.pairs


def test_train_command_runs_rahf_dual_with_rank_in_resumable_stages(
    tiny_model_dir: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    import steering_vectors.training.evaluate as evaluate
    from steering_vectors.cli import main

    calibrated: list[set[str]] = []
    real = evaluate.calibrate_strength

    def spy(model, tokenizer, pairs, *args, **kwargs):
        calibrated.append({p.id for p in pairs})
        return real(model, tokenizer, pairs, *args, **kwargs)

    monkeypatch.setattr(evaluate, "calibrate_strength", spy)
    data = _write_pairs(tmp_path / "pairs.jsonl", 12)
    out, work = tmp_path / "profiles", tmp_path / "work"
    argv = ["train", "--data", str(data), "--name", "tiny", "--out", str(out), "--model", str(tiny_model_dir),
            "--method", "dual", "--fit", "rahf,caa", "--rank", "2", "--kl", "0.5", "--layers", "1,2",
            "--max-pairs", "8", "--held-out", "0.3", "--calib-pairs", "3", "--gap-pairs", "2", "--fit-steps", "3",
            "--fit-batch", "4", "--prompt-tokens", "40", "--response-tokens", "12", "--eval-response-tokens", "20",
            "--strengths", "0.5,1", "--work-dir", str(work), "--bf16", "off"]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    kinds = sorted(p.name.rsplit("-", 1)[0] for p in work.iterdir())
    assert kinds == ["fit-rahf", "instruct", "patterns"]
    instruct = next(work.glob("instruct-*"))
    fit_pairs = set(json.loads((instruct / "settings.json").read_text())["pairs"])
    assert len(fit_pairs) == 8 and len(calibrated) == 2
    assert all(len(ids) == 3 and not ids & fit_pairs for ids in calibrated)  # calibration never sees fit pairs

    profile = Profile.load(out / "tiny.safetensors")
    assert profile.method == "rahf-dual/rahf" and profile.ranks() == {1: 2, 2: 2}
    assert profile.provenance["rahf"]["rank"] == 2 and profile.provenance["rahf"]["kl"] == 0.5
    gap = profile.provenance["instruct_gap"]
    assert gap["gap_before"]["mean_gap"] == 0.0 and gap["gap_after"]["n"] == 2
    assert summary["instruct_gap"] == gap
    calibration = profile.provenance["calibration"]
    assert calibration["held_out"] and calibration["pairs"] == 3 and calibration["response_tokens"] == 20
    assert set(calibration["unsteered"]) == {"accuracy", "margin", "perplexity"}
    caa = Profile.load(out / "baselines" / "tiny-caa.safetensors")
    assert caa.method == "rahf-dual/caa" and caa.ranks() == {}

    # a rerun resumes every stage: no checkpoint is written again, and the profile comes out the same
    stamps = {p: p.stat().st_mtime_ns for p in work.rglob("*.ckpt")}
    assert main(argv) == 0
    capsys.readouterr()
    assert {p: p.stat().st_mtime_ns for p in work.rglob("*.ckpt")} == stamps
    again = Profile.load(out / "tiny.safetensors")
    assert all(torch.equal(again.offsets[k], profile.offsets[k]) for k in (1, 2))
    assert all(torch.equal(again.low_rank[k][1], profile.low_rank[k][1]) for k in (1, 2))
