"""Per-row token constraints in the continuous-batching engine (tiny random Llama, no grammar library):
a constrained row picks only allowed tokens, ends with "stop" when its constraint is done (or "length"
first), and shares batches with steered and plain rows that come out exactly as they do alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.backends.base import EngineError, GenerationRequest, SamplingParams, TokenConstraint
from server.backends.sampling import constrain, select_tokens

from .test_continuous import PROMPTS, collect, greedy, run_alone, steering, tokens

VOCAB = 512


class Allowed(TokenConstraint):
    """Allows one set of tokens at each step (the last set repeats); done after `length` tokens."""

    def __init__(self, steps: list[set[int]], length: int) -> None:
        self.steps = steps
        self.length = length
        self.taken: list[int] = []
        self.asked = 0

    def allowed(self) -> torch.Tensor:
        self.asked += 1
        mask = torch.zeros(VOCAB - 12, dtype=torch.bool)  # shorter than the vocabulary: the rest is refused
        mask[sorted(self.steps[min(len(self.taken), len(self.steps) - 1)])] = True
        return mask

    def advance(self, token_id: int) -> None:
        if token_id not in self.steps[min(len(self.taken), len(self.steps) - 1)]:
            raise ValueError(f"token {token_id} is not allowed here")
        self.taken.append(token_id)

    @property
    def done(self) -> bool:
        return len(self.taken) >= self.length


def forced(sequence: list[int]) -> Allowed:
    return Allowed([{t} for t in sequence], len(sequence))


def test_constrain_masks_a_row_and_refuses_an_empty_mask() -> None:
    logits = torch.tensor([3.0, 1.0, 2.0, 0.5])
    got = constrain(logits, torch.tensor([False, True, True]))  # id 3 is past the mask: refused
    assert got.tolist() == [float("-inf"), 1.0, 2.0, float("-inf")]
    with pytest.raises(ValueError, match="allows no token"):
        constrain(logits, torch.tensor([False, False, False]))
    assert constrain(logits, None) is logits


def test_select_tokens_masks_only_the_constrained_rows() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [0.0, 5.0, 1.0, 2.0], [0.0, 5.0, 1.0, 2.0]])
    rows = [SamplingParams(max_new_tokens=1, temperature=0.0)] * 2 + [
        SamplingParams(max_new_tokens=1, temperature=0.0, logprobs=True, top_logprobs=3)
    ]
    masks = [None, torch.tensor([True, False, True, True]), torch.tensor([False, False, True, True])]
    picked = select_tokens(logits, rows, [None, None, None], [[], [], []], None, masks)
    assert [token for token, _ in picked] == [1, 3, 3]
    # logprobs of the constrained distribution: two tokens left, ruled-out ones never listed
    lp = picked[2][1]
    expected = torch.log_softmax(torch.tensor([1.0, 2.0]), dim=0)
    assert lp.logprob == pytest.approx(float(expected[1]))
    assert [t for t, _ in lp.top] == [3, 2]
    assert logits[1].tolist() == [0.0, 5.0, 1.0, 2.0]  # the caller's logits are left alone


def test_constrained_rows_follow_their_constraint_and_stop_when_done(make_engine) -> None:
    engine = make_engine(max_batch_size=4)
    sequence = [40, 41, 42, 43, 44]
    events = asyncio.run(collect(engine, GenerationRequest("c", PROMPTS[0], greedy(20), constraint=forced(sequence))))
    assert tokens(events) == sequence
    assert events[-1].finish_reason == "stop"
    # max_new_tokens first: "length", the constraint not done
    events = asyncio.run(collect(engine, GenerationRequest("c", PROMPTS[0], greedy(3), constraint=forced(sequence))))
    assert tokens(events) == sequence[:3] and events[-1].finish_reason == "length"
    # sampled rows pick among the allowed tokens only
    choices = Allowed([{7, 8, 9}], 12)
    params = SamplingParams(max_new_tokens=30, temperature=1.5, seed=3)
    events = asyncio.run(collect(engine, GenerationRequest("s", PROMPTS[1], params, constraint=choices)))
    assert len(tokens(events)) == 12 and set(tokens(events)) <= {7, 8, 9} and len(set(tokens(events))) > 1
    assert events[-1].finish_reason == "stop"


def test_constrained_steered_and_plain_rows_share_a_batch(monkeypatch, make_engine) -> None:
    """A constrained row beside steered and plain rows: every unconstrained row gives exactly the tokens
    it gives alone, the constrained one follows its constraint, and they did share decode steps."""
    from server.backends.transformers import engine as engine_module

    engine = make_engine(max_batch_size=8)
    cases = [(PROMPTS[0], steering(1)), (PROMPTS[2], None), (PROMPTS[3], steering(2, mode="generated"))]
    alone = [run_alone(engine, p, greedy(14), s) for p, s in cases]
    # the constrained row: any of the tiny model's top few tokens after each of its steps is fine; take
    # a set that does not contain its own greedy choice, so the mask must change the pick
    free = run_alone(engine, PROMPTS[1], greedy(10))
    allowed = [{(free[0] + 1) % VOCAB, (free[0] + 2) % VOCAB}, {100, 101, 102}]
    batches: list[tuple[int, int]] = []  # (rows, constrained rows) of each selection
    original = engine_module.select_tokens

    def recording(logits, params, generators, output_ids, prompt_ids=None, masks=None):
        batches.append((len(params), sum(m is not None for m in masks or [])))
        return original(logits, params, generators, output_ids, prompt_ids, masks)

    monkeypatch.setattr(engine_module, "select_tokens", recording)
    constraint = Allowed(allowed, 10)

    async def together() -> list[list[int]]:
        requests = [GenerationRequest(f"r{i}", p, greedy(14), s) for i, (p, s) in enumerate(cases)]
        requests.insert(1, GenerationRequest("c", PROMPTS[1], greedy(14), constraint=constraint))
        results = await asyncio.gather(*(collect(engine, r) for r in requests))
        return [tokens(events) for events in results]

    batched = asyncio.run(together())
    constrained = batched.pop(1)
    assert batched == alone
    assert constrained == constraint.taken and len(constrained) == 10
    assert constrained[0] in allowed[0] and set(constrained[1:]) <= allowed[1]
    assert constrained[0] != free[0]
    assert any(rows == 4 and masked == 1 for rows, masked in batches), batches  # one decode step for all four


def test_a_failing_constraint_fails_its_row_alone(make_engine) -> None:
    class Refusing(Allowed):
        def advance(self, token_id: int) -> None:
            if len(self.taken) == 2:
                raise ValueError("the grammar refused the token")
            super().advance(token_id)

    engine = make_engine(max_batch_size=4)
    alone = run_alone(engine, PROMPTS[0], greedy(8))

    async def both() -> list:
        good = GenerationRequest("good", PROMPTS[0], greedy(8))
        bad = GenerationRequest("bad", PROMPTS[1], greedy(8), constraint=Refusing([{5, 6}], 6))
        return await asyncio.gather(collect(engine, good), collect(engine, bad), return_exceptions=True)

    good, bad = asyncio.run(both())
    assert tokens(good) == alone
    assert isinstance(bad, EngineError) and "the grammar refused the token" in str(bad)
    assert engine.stats()["running"] == 0
