"""Conditional profiles on the continuous-batching engine (tiny random Llama, fp32, exact): the probe's score
equals a cosine computed with plain transformers (mean over the prompt and last token, over several prefill
chunks), a row whose condition does not fire is bit-identical to an unsteered run in a batch with rows whose
conditions fire, a condition that always fires behaves exactly like the profile unconditional — in `all` mode
(the prompt prefilled again, steered: tokens, logprobs and prompt logprobs alike), in `prompt` mode (the same
second prefill, generated tokens unsteered) and in `generated` mode —
and several conditional profiles of one request each follow their own condition."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.backends.base import GenerationRequest, SamplingParams
from steering_vectors.core.hooks import RowSteering
from steering_vectors.core.profile import Condition, ModelFingerprint, Profile
from tests.conftest import TINY_HIDDEN, TINY_LAYERS

SHAPE = ModelFingerprint("llama", TINY_HIDDEN, TINY_LAYERS)
PROMPT = [1, 42, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150, 160, 170, 180, 190]
OTHER = [1, 17, 99, 23, 250, 7, 8, 9]


def profile(name: str, seed: int, condition: Condition | None = None, mode: str = "all") -> Profile:
    g = torch.Generator().manual_seed(seed)
    return Profile(name=name, offsets={layer: torch.randn(TINY_HIDDEN, generator=g) * 4 for layer in (1, 2)},
                   condition=condition, position_mode=mode)


def condition(seed: int, threshold: float, comparison: str = ">", reads: str = "mean", layer: int = 1) -> Condition:
    g = torch.Generator().manual_seed(100 + seed)
    return Condition(layer=layer, direction=torch.randn(TINY_HIDDEN, generator=g), threshold=threshold,
                     comparison=comparison, reads=reads)


def conditional(*entries: tuple[Profile, float], mode: str | None = None) -> RowSteering:
    return RowSteering.from_profiles([], model=SHAPE, conditional=list(entries), position_mode=mode)


def request(rid: str, prompt=PROMPT, steering=None, n: int = 12, echo: bool = False) -> GenerationRequest:
    return GenerationRequest(rid, list(prompt), SamplingParams(max_new_tokens=n, temperature=0.0, logprobs=True,
                                                               top_logprobs=2, prompt_logprobs=echo),
                             steering=steering)


def run(engine, *requests, echo: bool = False):
    async def one(req):
        events = [event async for event in engine.generate(req)]
        tokens = [t for e in events for t in e.token_ids]
        logprobs = [(lp.token_id, lp.logprob, lp.top) for e in events for lp in (e.logprobs or [])]
        if echo:
            prompt = [None if lp is None else (lp.token_id, lp.logprob, lp.top) for lp in events[0].prompt_logprobs]
            return tokens, logprobs, events[0].conditions, prompt
        return tokens, logprobs, events[0].conditions

    async def main():
        return await asyncio.gather(*(one(r) for r in requests))

    return asyncio.run(main())


def reference_state(model, prompt: list[int], layer: int, reads: str) -> torch.Tensor:
    with torch.inference_mode():
        states = model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states[layer + 1][0]
    return states.mean(dim=0) if reads == "mean" else states[-1]


@pytest.mark.parametrize("reads", ["mean", "last"])
def test_the_probe_score_equals_a_transformers_reference(tiny_model, make_engine, reads) -> None:
    engine = make_engine(max_batch_size=4, prefill_chunk=5)  # the prompt spans four prefill chunks
    cond = condition(1, threshold=0.0, reads=reads, layer=2)
    ((_, _, results),) = run(engine, request("p", steering=conditional((profile("c", 1, cond), 1.0))))
    (result,) = results
    state = reference_state(tiny_model, PROMPT, 2, reads)
    expected = float(torch.nn.functional.cosine_similarity(state, cond.direction, dim=0))
    assert result.profile == "c" and result.score == pytest.approx(expected, abs=1e-5)
    assert result.applied == (expected > 0.0)


def test_a_row_whose_condition_does_not_fire_is_bit_identical_to_unsteered(make_engine) -> None:
    engine = make_engine(max_batch_size=4, prefill_chunk=64)
    never = profile("never", 2, condition(2, threshold=2.0))  # a cosine is never above 2
    always = profile("always", 3, condition(3, threshold=-2.0))  # ... and always above -2
    neighbours = [request("a", prompt=OTHER, steering=conditional((always, 1.5))),
                  request("a2", steering=conditional((always, -1.0)))]
    rows = run(engine, request("n", steering=conditional((never, 1.5))), *neighbours)
    neighbours = [request(r.request_id + "'", r.prompt_ids, r.steering) for r in neighbours]
    plain = run(engine, request("u"), *neighbours)[0]  # the same batch with an unsteered row in its place
    assert rows[0][:2] == plain[:2]  # tokens and logprobs, bit for bit
    assert rows[0][2][0].applied is False and rows[1][2][0].applied is True
    assert rows[2][0] != plain[0]  # the fired profile steers the same prompt


def test_a_condition_that_always_fires_is_the_profile_unconditional_in_all_mode(make_engine) -> None:
    engine = make_engine(max_batch_size=4, prefill_chunk=6)  # the prompt spans three chunks, run twice
    always = profile("always", 4, condition(4, threshold=-2.0))
    never = profile("never", 9, condition(9, threshold=2.0))
    # beside a row whose condition does not fire, and one that is not steered (both decode meanwhile)
    fired, quiet, alone = run(engine, request("c", steering=conditional((always, 2.0)), echo=True),
                              request("q", prompt=OTHER, steering=conditional((never, 2.0)), echo=True),
                              request("o", prompt=OTHER, n=20, echo=True), echo=True)
    unconditional = RowSteering.from_profiles([(always, 2.0)], model=SHAPE)
    assert unconditional.position_mode == "all"
    plain_profile = run(engine, request("a", steering=unconditional, echo=True), echo=True)[0]
    assert fired[2][0].applied is True and quiet[2][0].applied is False
    assert (fired[0], fired[1], fired[3]) == (plain_profile[0], plain_profile[1], plain_profile[3])
    unsteered = run(engine, request("u", echo=True), echo=True)[0]
    assert fired[3] != unsteered[3]  # the prompt's logprobs are the steered prompt's


def test_a_condition_that_always_fires_is_the_profile_unconditional_in_generated_mode(make_engine) -> None:
    engine = make_engine(max_batch_size=4, prefill_chunk=6)
    always = profile("always", 4, condition(4, threshold=-2.0))
    fired = run(engine, request("c", steering=conditional((always, 2.0), mode="generated")))[0]
    generated = RowSteering.from_profiles([(always, 2.0)], model=SHAPE, position_mode="generated")
    plain_profile = run(engine, request("g", steering=generated))[0]
    assert fired[:2] == plain_profile[:2]
    with_all = RowSteering.from_profiles([(always, 2.0)], model=SHAPE, position_mode="all")
    assert run(engine, request("a", steering=with_all))[0][0] != fired[0]  # prompt steering: another reply


def test_a_condition_that_always_fires_is_the_profile_unconditional_in_prompt_mode(make_engine) -> None:
    engine = make_engine(max_batch_size=4, prefill_chunk=6)  # the prompt spans three chunks, run twice
    always = profile("always", 4, condition(4, threshold=-2.0), mode="prompt")
    never = profile("never", 9, condition(9, threshold=2.0), mode="prompt")
    fired, quiet = run(engine, request("c", steering=conditional((always, 2.0)), echo=True),
                       request("q", prompt=OTHER, steering=conditional((never, 2.0)), echo=True), echo=True)
    unconditional = RowSteering.from_profiles([(always, 2.0)], model=SHAPE)
    assert unconditional.position_mode == "prompt"
    # the same batch shape (logprobs are compared bit for bit)
    plain_profile, unsteered = run(engine, request("p", steering=unconditional, echo=True),
                                   request("u", prompt=OTHER, echo=True), echo=True)
    assert fired[2][0].applied is True and quiet[2][0].applied is False
    # the prompt prefilled again, steered; the generated tokens unsteered: exactly the unconditional profile's
    assert (fired[0], fired[1], fired[3]) == (plain_profile[0], plain_profile[1], plain_profile[3])
    assert (quiet[0], quiet[1], quiet[3]) == (unsteered[0], unsteered[1], unsteered[3])
    with_all = RowSteering.from_profiles([(always, 2.0)], model=SHAPE, position_mode="all")
    everywhere = run(engine, request("a", steering=with_all, echo=True), echo=True)[0]
    assert fired[3] == everywhere[3] and fired[0] != everywhere[0]  # same prompt, unsteered generated tokens


def test_each_conditional_profile_follows_its_own_condition(make_engine) -> None:
    engine = make_engine(max_batch_size=4, prefill_chunk=64)
    yes = profile("yes", 5, condition(5, threshold=-2.0))
    no = profile("no", 6, condition(6, threshold=2.0, comparison=">"))
    low = profile("low", 7, condition(7, threshold=2.0, comparison="<", reads="last"))  # below 2: fires
    unconditional = profile("plain", 8)
    mixed = RowSteering.from_profiles([(unconditional, 1.0)], model=SHAPE, position_mode="all",
                                      conditional=[(yes, 1.0), (no, 1.0), (low, 0.5)])
    tokens, logprobs, results = run(engine, request("m", steering=mixed))[0]
    assert [(r.profile, r.applied) for r in results] == [("yes", True), ("no", False), ("low", True)]
    # = the unconditional profile plus yes and low, on the prompt (prefilled again) and every token
    expected = RowSteering.from_profiles([(unconditional, 1.0), (yes, 1.0), (low, 0.5)], model=SHAPE,
                                         position_mode="all")
    assert (tokens, logprobs) == tuple(run(engine, request("e", steering=expected))[0][:2])
    first = RowSteering.from_profiles([(unconditional, 1.0)], model=SHAPE, position_mode="all")
    assert tokens != run(engine, request("f", steering=first))[0][0]


def test_conditional_steering_of_a_profile_without_condition_is_refused() -> None:
    from steering_vectors.core.errors import PlanError

    with pytest.raises(PlanError, match="no condition"):
        conditional((profile("plain", 1), 1.0))
