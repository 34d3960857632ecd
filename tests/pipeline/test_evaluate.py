"""Evaluation on a tiny random Llama: preference scores, perplexity and the report files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steering_vectors.core.models import load_model
from steering_vectors.core.profile import Profile
from steering_vectors.training.data import PreferencePair, TokenBudget, encode
from steering_vectors.training.evaluate import perplexity, score_pairs, write_report

BUDGET = TokenBudget(prompt=30, response=8)
PAIRS = [
    PreferencePair("a", ({"role": "user", "content": "hi"},), "hello there", "go"),
    PreferencePair("b", ({"role": "user", "content": "help"},), "sure", "no way at all"),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_model(tiny_model_dir)


def _mean_logprob(model, ids: tuple[int, ...], start: int) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(sum(logprobs[t - 1, ids[t]] for t in range(start, len(ids))) / (len(ids) - start))


def test_score_pairs_equals_direct_computation(tiny) -> None:
    model, tok = tiny.model, tiny.tokenizer
    score = score_pairs(model, tok, PAIRS, budget=BUDGET)
    for i, pair in enumerate(PAIRS):
        for reply, got in ((pair.chosen, score.chosen[i]), (pair.rejected, score.rejected[i])):
            enc = encode(tok, pair.prompt, reply, budget=BUDGET)
            assert got == pytest.approx(_mean_logprob(model, enc.input_ids, enc.prompt_len), abs=1e-5)
    diffs = [c - r for c, r in zip(score.chosen, score.rejected, strict=True)]
    assert score.accuracy == sum(d > 0 for d in diffs) / 2
    assert score.margin == pytest.approx(sum(diffs) / 2, abs=1e-6)


def test_steering_changes_scores_and_zero_strength_does_not(tiny) -> None:
    model, tok = tiny.model, tiny.tokenizer
    profile = Profile("push", {1: torch.ones(64)})
    plain = score_pairs(model, tok, PAIRS, budget=BUDGET)
    assert score_pairs(model, tok, PAIRS, profile, 0.0, budget=BUDGET).chosen == plain.chosen
    assert score_pairs(model, tok, PAIRS, profile, 2.0, budget=BUDGET).chosen != plain.chosen
    text = "the cat sat on the mat. " * 5
    assert perplexity(model, tok, text, profile, 0.0) == perplexity(model, tok, text)
    assert perplexity(model, tok, text, profile, 2.0) != perplexity(model, tok, text)


def test_write_report(tmp_path: Path) -> None:
    row = {"strength": 1.0, "accuracy": 0.75, "margin": 0.1, "perplexity": 11.0, "accuracy_gain": 0.25,
           "perplexity_rise": 0.1}
    results = {
        "n_pairs": 4, "budget": {"prompt": 8, "response": 4}, "bf16_autocast": False,
        "baseline": {"accuracy": 0.5, "margin": 0.0, "perplexity": 10.0},
        "profiles": {"p": {"fit": "rahf", "grid": [row], "default": row, "accepted": True}},
        "generations": {"prompts": ["q"], "unsteered": ["a"], "p": ["b"]},
        "repetition": {"unsteered": 0.0, "p": 0.25},
        "looping": {"unsteered": 0, "p": 1},
        "generation": {"max_new_tokens": 96, "repetition_penalty": 1.15},
    }
    path = write_report(results, tmp_path, "T", command="rahf eval x")
    text = path.read_text()
    assert "Share of repeated token 4-grams in these replies (loops; 0 = none): unsteered 0.000, p 0.250." in text
    assert "Up to 96 new tokens; repetition_penalty 1.15." in text
    assert "Replies with some token 4-gram three or more times (looping), of 1: unsteered 0, p 1." in text
    assert "| p | rahf | 1 | 75.0 % | +25.0 | 0.1000 | 11.00 | +10.0 % | yes |" in text
    assert "- **p**: b" in text
    assert json.loads((tmp_path / "report.json").read_text())["baseline"]["accuracy"] == 0.5
    assert (tmp_path / "strength.png").stat().st_size > 1000


def test_repeated_ngram_share_counts_repeats_within_each_reply() -> None:
    from steering_vectors.training.evaluate import repeated_ngram_share

    # 1 2 3 4 1 2 3 4: five 4-grams, (1, 2, 3, 4) twice -> one repeat
    assert repeated_ngram_share([[1, 2, 3, 4, 1, 2, 3, 4]]) == pytest.approx(1 / 5)
    # the same 4-gram in two different replies is no repeat; pooled over both replies: 1 of 5 + 1 grams
    assert repeated_ngram_share([[1, 2, 3, 4, 1, 2, 3, 4], [1, 2, 3, 4]]) == pytest.approx(1 / 6)
    assert repeated_ngram_share([[7] * 10], n=2) == pytest.approx(8 / 9)
    assert repeated_ngram_share([[1, 2, 3], []]) == 0.0  # no 4-gram at all
    assert repeated_ngram_share([list(range(20))]) == 0.0


def test_loops_needs_one_ngram_three_times_in_one_reply() -> None:
    from steering_vectors.training.evaluate import loops

    assert loops([1, 2, 3, 4] * 3)  # (1, 2, 3, 4) three times
    assert not loops([1, 2, 3, 4] * 2 + [9])  # twice is a repeat, not a loop
    assert not loops([1, 2, 3])  # no 4-gram at all
    assert not loops(list(range(50)))
    assert loops([5] * 6)  # (5, 5, 5, 5) at offsets 0, 1, 2
    assert not loops([5] * 5)  # only twice
    assert loops([1, 2, 1, 2, 1, 2], n=2, times=3) and not loops([1, 2, 1, 2, 1, 2], n=2, times=4)


def test_evaluation_reports_the_repetition_of_its_greedy_replies(tiny) -> None:
    from steering_vectors.training.evaluate import evaluate_profiles, generate, loops, repeated_ngram_share

    hidden = tiny.model.config.hidden_size
    generator = torch.Generator().manual_seed(3)
    profile = Profile(name="p", offsets={1: torch.randn(hidden, generator=generator)}, default_strength=2.0)
    prompts = ["hi", "tell me more"]
    results = evaluate_profiles(tiny.model, tiny.tokenizer, PAIRS, [profile], [1.0], budget=BUDGET,
                                prompts=prompts, max_new_tokens=12)  # fmt: skip
    assert results["baseline"]["accuracy"] == score_pairs(tiny.model, tiny.tokenizer, PAIRS, budget=BUDGET).accuracy
    assert [r["strength"] for r in results["profiles"]["p"]["grid"]] == [1.0, 2.0]  # the default joins the grid
    steered = generate(tiny.model, tiny.tokenizer, prompts, profile, 2.0, max_new_tokens=12)
    assert results["generations"]["p"] == steered
    tokens = {name: [tiny.tokenizer(r, add_special_tokens=False)["input_ids"] for r in results["generations"][name]]
              for name in ("unsteered", "p")}  # fmt: skip
    assert results["repetition"] == {name: repeated_ngram_share(ids) for name, ids in tokens.items()}
    assert results["looping"] == {name: sum(loops(i) for i in ids) for name, ids in tokens.items()}
    assert all(0.0 <= value <= 1.0 for value in results["repetition"].values())


def test_generation_with_a_repetition_penalty_is_the_servers_rule(tiny) -> None:
    """`generate(..., repetition_penalty=p)` picks, at each step, the best token after dividing positive and
    multiplying negative logits of every token seen so far (prompt included) by p: the server's rule."""
    from steering_vectors.training.evaluate import generate

    model, tok = tiny.model, tiny.tokenizer
    prompt = "tell me more"
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(12):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            seen = torch.tensor(sorted(set(ids)))
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / 1.8, logits[seen] * 1.8)
            token = int(torch.argmax(logits))
            if token == tok.eos_token_id:
                break
            out.append(token)
            ids.append(token)
    penalised = generate(model, tok, [prompt], max_new_tokens=12, repetition_penalty=1.8)
    assert penalised == [tok.decode(out, skip_special_tokens=True).strip()]
    assert penalised != generate(model, tok, [prompt], max_new_tokens=12)  # the penalty changes this reply


def _mean_logprob_prompt_steered(model, ids: tuple[int, ...], start: int, layer: int, offset: torch.Tensor) -> float:
    """`_mean_logprob` with `offset` added after decoder `layer` at the prompt's positions only, by a plain hook."""
    def add(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = torch.cat([hidden[:, :start] + offset, hidden[:, start:]], dim=1)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = model.model.layers[layer].register_forward_hook(add)
    try:
        return _mean_logprob(model, ids, start)
    finally:
        handle.remove()


def test_prompt_mode_scores_steer_only_the_prompt_tokens(tiny) -> None:
    from steering_vectors.training.evaluate import pair_logprobs

    model, tok = tiny.model, tiny.tokenizer
    offset = torch.randn(64, generator=torch.Generator().manual_seed(0))
    profile = Profile("push", {1: offset}, position_mode="prompt")
    score = score_pairs(model, tok, PAIRS, profile, 2.0, budget=BUDGET)  # a right-padded batch
    for i, pair in enumerate(PAIRS):
        for reply, got in ((pair.chosen, score.chosen[i]), (pair.rejected, score.rejected[i])):
            enc = encode(tok, pair.prompt, reply, budget=BUDGET)
            expected = _mean_logprob_prompt_steered(model, enc.input_ids, enc.prompt_len, 1, 2.0 * offset)
            assert got == pytest.approx(expected, abs=1e-5)
    others = {mode: score_pairs(model, tok, PAIRS, Profile("push", {1: offset}, position_mode=mode), 2.0,
                                budget=BUDGET).chosen for mode in ("all", "generated")}
    assert score.chosen != others["all"] and score.chosen != others["generated"]
    # differentiable in the offsets, as the fits need
    delta = {1: (2.0 * offset).clone().requires_grad_(True)}
    chosen, rejected = pair_logprobs(model, tok, PAIRS, delta, "prompt", budget=BUDGET)
    torch.testing.assert_close(chosen, torch.tensor(score.chosen), atol=1e-5, rtol=0)
    (chosen - rejected).sum().backward()
    assert delta[1].grad is not None and float(delta[1].grad.abs().sum()) > 0
