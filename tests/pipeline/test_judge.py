"""The generation judge's split, its two kinds' files, and the generation metrics, on hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from steering_vectors.core.models import load_model
from steering_vectors.training import genmetrics as gm
from steering_vectors.training.data import PreferencePair, load_pairs
from steering_vectors.training.judge import (
    HeadJudge,
    LoraJudge,
    LoraJudgeConfig,
    encode_reply,
    feature_layers,
    is_judge_prompt,
    judge_metadata,
    judge_split,
    load_judge,
    pair_accuracy,
    pair_sequences,
    pooled_features,
    save_judge,
    select_head,
    train_lora_judge,
    win_rate,
)
from steering_vectors.training.pipeline import split_training_pairs

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def _key(pair: PreferencePair) -> str:
    return json.dumps(pair.prompt, sort_keys=True)


def _write_pairs(path: Path, n_prompts: int, per_prompt: int = 2) -> Path:
    rows = [{"id": f"{i}.{j}", "prompt": f"question {i} please", "chosen": f"good {j}", "rejected": f"bad {j}"}
            for i in range(n_prompts) for j in range(per_prompt)]  # fmt: skip
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# -- the split ------------------------------------------------------------------------------------------


def test_judge_split_is_fixed_and_disjoint_by_prompt_from_fit_calibration_and_itself(tmp_path: Path) -> None:
    data = _write_pairs(tmp_path / "train.jsonl", 200)
    pairs = load_pairs(data)
    split = judge_split(pairs)
    again = judge_split(list(reversed(pairs)))  # by prompt alone, not by order or position
    assert {p.id for p in split.train} == {p.id for p in again.train}
    assert {p.id for p in split.held} == {p.id for p in again.held}
    train_prompts, held_prompts = {_key(p) for p in split.train}, {_key(p) for p in split.held}
    assert train_prompts and held_prompts and not train_prompts & held_prompts
    judge_prompts = train_prompts | held_prompts
    assert all(is_judge_prompt(p) == (_key(p) in judge_prompts) for p in pairs)
    assert 0.15 < len(judge_prompts) / 200 < 0.35  # JUDGE_SHARE = 0.25 of the prompts
    for seed in (0, 3):  # the pipeline's own split, with every pool pair taken: no prompt of the judge's
        run = split_training_pairs(data, max_pairs=10_000, calib_pairs=10_000, held_out=0.2, seed=seed)
        used = {_key(p) for p in run.pairs} | {_key(p) for p in run.calib}
        assert run.pairs and run.calib and not used & judge_prompts
        assert len(run.pairs) + len(run.calib) + len(split.train) + len(split.held) == len(pairs)  # nothing lost


@pytest.mark.skipif(not (SHARED / "hh_harmless" / "train.jsonl").is_file(), reason="no shared data here")
def test_judge_split_of_the_shipped_sets_is_disjoint_from_the_pipelines_pairs() -> None:
    for name in ("hh_harmless", "alpaca_helpful"):
        data = SHARED / name / "train.jsonl"
        split = judge_split(load_pairs(data))
        run = split_training_pairs(data, max_pairs=10_000, calib_pairs=10_000, held_out=0.1, seed=0)
        judge = {_key(p) for p in split.train + split.held}
        assert len(split.held) > 100 and not judge & ({_key(p) for p in run.pairs + run.calib})


# -- metrics against hand-computed values --------------------------------------------------------------------


def test_distinct_loop_length_and_refusal_rate_hand_computed() -> None:
    replies = [[1, 2, 3, 1, 2], [1, 2]]  # bigrams 12 23 31 12 | 12: 3 distinct of 5
    assert gm.distinct_n(replies, 2) == pytest.approx(3 / 5)
    assert gm.distinct_n([[1, 2, 3]], 2) == 1.0 and math.isnan(gm.distinct_n([[7]], 2))
    looping = [1, 2, 3, 4] * 3  # the 4-gram 1234 three times
    twice = [1, 2, 3, 4] * 2 + [5]  # twice only: not a loop
    assert gm.loop_rate([looping, twice, [1, 2, 3, 4, 5, 6], []]) == pytest.approx(1 / 4)
    assert gm.mean_length([looping, twice, [1, 2, 3, 4, 5, 6], []]) == pytest.approx((12 + 9 + 6 + 0) / 4)
    texts = ["I'm sorry, I can't help with that.", "Sure: preheat the oven.", "Please seek help.", "I\u2019m sorry."]
    assert [gm.refuses(t) for t in texts] == [True, False, True, True]
    assert gm.refusal_rate(texts) == pytest.approx(3 / 4)


def test_win_rate_counts_ties_half_with_a_paired_bootstrap_interval() -> None:
    a, b = [1.0, 2.0, 3.0, 4.0, 0.0], [0.0, 2.0, 5.0, 3.0, 0.3]
    same = [False, False, False, True, False]  # identical replies tie whatever their rewards
    assert gm.win_outcomes(a, b, same=same) == [1.0, 0.5, 0.0, 0.5, 0.0]
    assert gm.win_outcomes(a, b, same=same, tie=0.5) == [1.0, 0.5, 0.0, 0.5, 0.5]
    result = gm.win_rate_from_scores(a, b, same=same, samples=500, seed=1)
    assert result["win_rate"] == pytest.approx(2 / 5)
    assert (result["wins"], result["ties"], result["losses"], result["n"]) == (1, 2, 2, 5)
    assert 0.0 <= result["low"] <= 0.4 <= result["high"] <= 1.0
    assert result == gm.win_rate_from_scores(a, b, same=same, samples=500, seed=1)  # seeded
    assert gm.bootstrap_interval([0.5] * 6) == (0.5, 0.5)

    class LengthJudge:  # a stand-in judge: the longer reply is better
        kind = "length"

        def score(self, prompts, replies):
            return torch.tensor([float(len(r)) for r in replies])

    got = win_rate(LengthJudge(), ["p"] * 3, ["long reply", "same", "x"], ["short", "same", "longer"])
    assert got["win_rate"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_accuracy_interval_resamples_prompts_with_all_their_pairs() -> None:
    from steering_vectors.training.judge import accuracy_interval

    one, two = ({"role": "user", "content": "one"},), ({"role": "user", "content": "two"},)
    pairs = [PreferencePair(str(i), one if i < 3 else two, "a", "b") for i in range(4)]
    diff = torch.tensor([1.0, 1.0, 1.0, -1.0])  # prompt "one": 3 of 3 right; prompt "two": 0 of 1
    low, high = accuracy_interval(diff, pairs, samples=400)
    assert (low, high) == (0.0, 1.0)  # a draw is both copies of one prompt (0 or 1) or one of each (3/4)
    assert accuracy_interval(torch.ones(4), pairs) == (1.0, 1.0)


def _rows(score: list[float], looped: list[bool], nll: float) -> gm.GenerationRows:
    return gm.GenerationRows(score=score, looped=looped, nll=[(nll, 1)] * len(score))


def test_half_split_strength_choice_respects_loop_and_perplexity_limits() -> None:
    prompts = [f"prompt {i}" for i in range(8)]
    halves = ["a"] * 4 + ["b"] * 4
    rows = {
        0.0: _rows([0.5] * 8, [False, True, False, False] + [False] * 4, 2.0),  # unsteered: one loop on A
        0.5: _rows([1, 1, 0, 0.5] + [1, 0, 0, 0], [False] * 8, 2.05),  # A 0.625, ppl x1.051
        1.0: _rows([1, 1, 1, 0.5] + [1, 1, 0, 0.5], [True, False, False, False] + [True] * 4, 2.09),  # A 0.875
        1.5: _rows([1, 1, 1, 1] + [1] * 4, [False] * 8, 2.2),  # best on A but ppl x1.221 > 1.10
        2.0: _rows([1, 1, 1, 1] + [1] * 4, [True, True, False, False] + [False] * 4, 2.0),  # loops more than 0
    }
    choice = gm.choose_strength_half_split(prompts, rows, halves=halves)
    assert choice.strength == 1.0
    assert [s for s, a in choice.half_a.items() if a["meets"]] == [0.0, 0.5, 1.0]
    assert choice.half_a[1.0]["score"] == pytest.approx(0.875)
    assert choice.half_a[1.5]["perplexity"] == pytest.approx(math.exp(2.2))
    reported = choice.reported  # half B's numbers, which the choice never saw
    assert reported["score"] == pytest.approx(0.625) and reported["loop_rate"] == 1.0 and reported["n"] == 4
    assert reported["perplexity"] == pytest.approx(math.exp(2.09))
    # equal scores go to the weaker strength; nothing within the limits leaves the unsteered model
    even = {0.0: rows[0.0], 1.0: _rows([0.75] * 8, [False] * 8, 2.0), 0.5: _rows([0.75] * 8, [False] * 8, 2.0)}
    assert gm.choose_strength_half_split(prompts, even, halves=halves).strength == 0.5
    worse = {0.0: rows[0.0], 1.5: rows[1.5], 2.0: rows[2.0]}
    assert gm.choose_strength_half_split(prompts, worse, halves=halves).strength == 0.0
    with pytest.raises(ValueError, match="unsteered"):
        gm.choose_strength_half_split(prompts, {1.0: rows[1.0]}, halves=halves)


def test_unique_prompts_keeps_each_prompt_once_in_first_seen_order() -> None:
    pairs = [PreferencePair(str(i), ({"role": "user", "content": q},), "a", "b") for i, q in enumerate("xyxzy")]
    assert [p[0]["content"] for p in gm.unique_prompts(pairs)] == ["x", "y", "z"]


def test_dev_halves_are_fixed_by_the_prompt() -> None:
    prompts = [f"prompt {i}" for i in range(40)]
    halves = [gm.dev_half(p) for p in prompts]
    assert 10 < halves.count("a") < 30
    assert halves == [gm.dev_half([{"role": "user", "content": p}]) for p in prompts]  # a string is one user turn
    default = gm.choose_strength_half_split(prompts, {0.0: _rows([0.5] * 40, [False] * 40, 1.0)})
    assert default.half_a[0.0]["n"] == halves.count("a")


# -- the tiny model: perplexity, generation, and the two judge kinds ------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_model(tiny_model_dir)


def test_reply_nll_is_the_replys_token_nll_given_the_prompt(tiny) -> None:
    from steering_vectors.training.data import encode

    prompts, replies = ["hello there", [{"role": "user", "content": "hi"}]], ["abc def", ""]
    got = gm.reply_nll(tiny.model, tiny.tokenizer, prompts, replies)
    assert got[1] == (0.0, 0)  # an empty reply has no tokens to score
    encoded = encode(tiny.tokenizer, [{"role": "user", "content": "hello there"}], "abc def", budget=gm.REPLY_BUDGET)
    ids = torch.tensor([encoded.input_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(tiny.model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    picked = logprobs.gather(-1, ids[0, 1:].unsqueeze(-1)).squeeze(-1)[encoded.prompt_len - 1 :]
    assert got[0][1] == encoded.response_len == 7
    assert got[0][0] == pytest.approx(-float(picked.sum()), rel=1e-5)
    assert gm.pooled_perplexity([(2.0, 1), (4.0, 3), (0.0, 0)]) == pytest.approx(math.exp(6 / 4))


def test_generate_replies_greedy_matches_evaluate_and_samples_are_seeded_per_prompt(tiny) -> None:
    from steering_vectors.training.evaluate import generate

    prompts = ["tell me", "another one"]
    greedy = gm.generate_replies(tiny.model, tiny.tokenizer, prompts, max_new_tokens=6)
    assert greedy == generate(tiny.model, tiny.tokenizer, prompts, max_new_tokens=6)
    sampled = gm.generate_replies(tiny.model, tiny.tokenizer, prompts, max_new_tokens=6, sample=True, seed=3)
    alone = gm.generate_replies(tiny.model, tiny.tokenizer, prompts[:1], max_new_tokens=6, sample=True, seed=3)
    assert sampled[0] == alone[0]
    assert sampled == gm.generate_replies(tiny.model, tiny.tokenizer, prompts, max_new_tokens=6, sample=True, seed=3)


def _toy_pairs(n: int) -> list[PreferencePair]:
    # separable by the reply's content: "yes" replies are chosen
    return [PreferencePair(f"t{i}", ({"role": "user", "content": f"q{i % 7} {i}"},), "yes yes" + "." * (i % 3),
                           "no no" + "." * ((i + 1) % 3)) for i in range(n)]  # fmt: skip


def test_head_judge_learns_a_separable_toy_set_and_its_file_round_trips(tiny, tmp_path: Path) -> None:
    train, held = _toy_pairs(24), _toy_pairs(36)[24:]
    layers = feature_layers(4)
    examples = pair_sequences(tiny.tokenizer, train)
    features = pooled_features(tiny.model, examples, layers, pad=tiny.tokenizer.pad_token_id)
    head, table = select_head(features, train, layers, folds=3, l2_grid=(0.01,))
    assert len(table) == 9 and head.weight.shape[0] == features.shape[-1] * len(head.layers) * len(head.pools)
    judge = HeadJudge(tiny.model, tiny.tokenizer, head, list(head.layers))
    assert pair_accuracy(judge, held)["accuracy"] == 1.0
    path = tmp_path / "toy-head.safetensors"
    save_judge(path, judge, data_set="toy", fingerprint=tiny.fingerprint, report={"held_accuracy": 1.0})
    loaded = load_judge(path, tiny.model, tiny.tokenizer)
    prompts, replies = [p.prompt for p in held], [p.rejected for p in held]
    assert torch.equal(loaded.score(prompts, replies), judge.score(prompts, replies))
    meta = judge_metadata(path)
    assert (meta["kind"], meta["set"], meta["report"]["held_accuracy"]) == ("head", "toy", 1.0)
    assert meta["fingerprint"]["digest"] == tiny.fingerprint.digest and "sha256('judge:'" in meta["split_rule"]
    empty = encode_reply(tiny.tokenizer, "q", "")  # a model that stopped at once still gets a reward
    assert empty.response_len == 1 and empty.input_ids[-1] == tiny.tokenizer.eos_token_id


def test_lora_judge_trains_resumes_and_its_file_round_trips(tiny_model_dir: Path, tmp_path: Path) -> None:
    pairs = _toy_pairs(12)
    config = LoraJudgeConfig(lr=1e-2, head_lr=1e-2, batch_pairs=4, checkpoint_every=1, max_pairs=8, top_layers=2)
    first = load_model(tiny_model_dir)
    reward, losses = train_lora_judge(first.model, first.tokenizer, pairs, config, tmp_path / "ckpt.pt")
    assert len(losses) == 2 and losses[0] == pytest.approx(math.log(2), rel=1e-4)  # a zero head starts at ln 2
    again = load_model(tiny_model_dir)  # finds the finished checkpoint: no step left to take
    resumed, same = train_lora_judge(again.model, again.tokenizer, pairs, config, tmp_path / "ckpt.pt")
    assert same == losses
    judge = LoraJudge(reward, first.tokenizer)
    path = tmp_path / "toy-lora.safetensors"
    save_judge(path, judge, data_set="toy", fingerprint=first.fingerprint, report={})
    other = load_model(tiny_model_dir)
    loaded = load_judge(path, other.model, other.tokenizer)
    prompts, replies = [p.prompt for p in pairs], [p.chosen for p in pairs]
    assert torch.equal(loaded.score(prompts, replies), judge.score(prompts, replies))
    assert torch.equal(LoraJudge(resumed, again.tokenizer).score(prompts, replies), judge.score(prompts, replies))
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in loaded.reward.model.named_parameters() if "lora_A" in n}
    assert adapted == {"2", "3"}  # top_layers=2 of the tiny model's 4
