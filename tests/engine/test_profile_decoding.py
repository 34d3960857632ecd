"""A profile's decoding defaults (`Profile.decoding`) on the continuous-batching engine (tiny random Llama, fp32,
exact): where the request leaves repetition_penalty open, a row steered by a profile that carries one decodes
exactly as a request that sets that penalty itself; a request that sets its own keeps it; a conditional profile's
penalty applies only once its condition fires (a row whose condition does not fire is the unsteered row, bit for
bit); `with_profile_decoding` fills only open fields, once."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.backends.base import GenerationRequest, SamplingParams, with_profile_decoding
from steering_vectors.core.hooks import RowSteering
from steering_vectors.core.profile import Condition, Profile
from tests.engine.test_conditions import OTHER, PROMPT, SHAPE, condition, run

PENALTY = 1.8
OPEN = frozenset({"repetition_penalty"})


def profile(name: str = "p", *, decoding: dict | None = None, cond: Condition | None = None) -> Profile:
    g = torch.Generator().manual_seed(5)
    offsets = {layer: torch.randn(SHAPE.hidden_size, generator=g) * 2 for layer in (1, 2)}  # the same for every name
    return Profile(name=name, offsets=offsets, decoding=decoding or {}, condition=cond)


def request(rid: str, steering: RowSteering | None, *, penalty: float = 1.0, open_sampling=frozenset(),
            prompt=PROMPT) -> GenerationRequest:  # fmt: skip
    sampling = SamplingParams(max_new_tokens=16, temperature=0.0, logprobs=True, top_logprobs=2,
                              repetition_penalty=penalty)  # fmt: skip
    return GenerationRequest(rid, list(prompt), sampling, steering=steering, open_sampling=open_sampling)


def steer(p: Profile, strength: float = 1.0) -> RowSteering:
    return RowSteering.from_profiles([(p, strength)], model=SHAPE)


def test_an_open_penalty_takes_the_profiles_and_a_set_one_stays(make_engine) -> None:
    engine = make_engine(max_batch_size=4, prefill_chunk=64)
    carrying, bare = profile(decoding={"repetition_penalty": PENALTY}), profile()
    taken, set_by_request, neighbour = run(
        engine,
        request("open", steer(carrying), open_sampling=OPEN),
        request("set", steer(carrying), penalty=1.0),  # the request's own value (1: off) wins
        request("u", None, open_sampling=OPEN, prompt=OTHER),  # unsteered and open: the server's 1
    )
    by_hand, plain, unsteered = run(engine, request("h", steer(bare), penalty=PENALTY),
                                    request("b", steer(bare), penalty=1.0),
                                    request("u2", None, prompt=OTHER))  # fmt: skip
    assert taken[:2] == by_hand[:2]  # tokens and logprobs, bit for bit
    assert set_by_request[:2] == plain[:2]
    assert neighbour[:2] == unsteered[:2]
    assert taken[0] != plain[0]  # the penalty changes this reply: the comparison above can fail


def test_a_conditional_profiles_penalty_waits_for_its_condition(make_engine) -> None:
    engine = make_engine(max_batch_size=4, prefill_chunk=6)
    always = profile("always", decoding={"repetition_penalty": PENALTY}, cond=condition(4, threshold=-2.0))
    never = profile("never", decoding={"repetition_penalty": PENALTY}, cond=condition(4, threshold=2.0))

    def conditional(p: Profile) -> RowSteering:
        return RowSteering.from_profiles([], model=SHAPE, conditional=[(p, 1.0)])

    fired, quiet = run(engine, request("c", conditional(always), open_sampling=OPEN),
                       request("q", conditional(never), open_sampling=OPEN))  # fmt: skip
    by_hand, unsteered = run(engine, request("h", steer(profile()), penalty=PENALTY), request("u", None))
    assert fired[2][0].applied is True and quiet[2][0].applied is False
    assert fired[:2] == by_hand[:2]
    assert quiet[:2] == unsteered[:2]  # not fired: no steering, no penalty


def test_with_profile_decoding_fills_open_fields_of_acting_profiles_once() -> None:
    carrying = profile(decoding={"repetition_penalty": PENALTY})
    milder = profile("m", decoding={"repetition_penalty": 1.2})
    req = request("r", RowSteering.from_profiles([(carrying, 0.5), (milder, 1.0)], model=SHAPE), open_sampling=OPEN)
    filled = with_profile_decoding(req, req.steering)
    assert filled.sampling == dataclasses.replace(req.sampling, repetition_penalty=PENALTY)  # the largest
    assert filled.open_sampling == frozenset() and req.sampling.repetition_penalty == 1.0  # a new request
    assert with_profile_decoding(filled, filled.steering) is filled
    closed = request("c", req.steering, penalty=1.1)
    assert with_profile_decoding(closed, closed.steering) is closed
    # a profile at strength 0 does not act, so neither does its penalty; nor does an unsteered row get one
    idle = request("z", RowSteering.from_profiles([(carrying, 0.0), (profile("b"), 1.0)], model=SHAPE),
                   open_sampling=OPEN)  # fmt: skip
    assert with_profile_decoding(idle, idle.steering).sampling == idle.sampling
    assert with_profile_decoding(request("n", None, open_sampling=OPEN), None).sampling.repetition_penalty == 1.0


@pytest.mark.parametrize("strength", [1.0, -1.0])
def test_a_negative_strength_acts_too(strength) -> None:
    carrying = profile(decoding={"repetition_penalty": PENALTY})
    req = request("r", steer(carrying, strength), open_sampling=OPEN)
    assert with_profile_decoding(req, req.steering).sampling.repetition_penalty == PENALTY
