"""The vLLM backend's engine on a tiny random Llama (fp32, greedy, exact token equality where the batch
shape is the same): unsteered rows are untouched by steered neighbours, a steered row gets the same tokens
alone and in a batch with other profiles, the steered residual stream equals the transformers backend's at
the steered layers (offsets, low-rank and LoRA terms), position modes (a "prompt"-mode row's decode states equal
the unsteered computation over its steered prompt), snapshots of replaced profiles,
profile slots, the prefix-cache salt, cancellation, overload, max_tokens 0 scoring, and a profile's
repetition_penalty filling a request that sets none."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.backends.base import EngineOverloadedError, GenerationRequest, SamplingParams
from server.backends.vllm.engine import SlotTable, cache_salt
from steering_vectors.core.hooks import RowSteering, Steerer, plan_for_rows
from steering_vectors.core.layers import find_decoder_layers
from steering_vectors.core.profile import Profile

PROMPT = list(range(5, 21))
OTHER = [7, 3, 9, 11, 40, 41, 42, 100, 7, 8]


def profile(backend, name: str, seed: int, *, scale: float = 4.0, layers=(1, 2), low_rank: bool = False,
            lora: bool = False, mode: str = "all") -> Profile:
    g = torch.Generator().manual_seed(seed)
    hidden = backend.fingerprint.hidden_size
    offsets = {layer: torch.randn(hidden, generator=g) * scale for layer in layers}
    terms = {}
    if low_rank:
        terms["low_rank"] = {layers[0]: (torch.randn(2, hidden, generator=g), torch.randn(hidden, 2, generator=g) * 2)}
    if lora:
        sizes = dict(backend.fingerprint.projections)
        terms["lora"] = {layers[0]: {
            "q_proj": (torch.randn(2, hidden, generator=g) * 0.5, torch.randn(sizes["q_proj"], 2, generator=g) * 0.5),
            "v_proj": (torch.randn(3, hidden, generator=g) * 0.5, torch.randn(sizes["v_proj"], 3, generator=g) * 0.5),
        }}
    return Profile(name=name, offsets=offsets, fingerprint=backend.fingerprint, position_mode=mode, **terms)


def steer(backend, *entries: tuple[Profile, float]) -> RowSteering:
    return RowSteering.from_profiles(list(entries), model=backend.fingerprint)


def request(rid: str, prompt=PROMPT, steering=None, tokens: int = 12, **sampling) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=tokens, temperature=sampling.pop("temperature", 0.0), **sampling)
    return GenerationRequest(rid, list(prompt), params, steering=steering)


async def _collect(engine, req):
    tokens, reason, events = [], None, []
    async for event in engine.generate(req):
        tokens += event.token_ids
        reason = event.finish_reason
        events.append(event)
    return tokens, reason, events


def run(backend, *requests) -> list[list[int]]:
    """Greedy tokens of `requests`, submitted together."""
    async def main():
        return await asyncio.gather(*(_collect(backend.engine, r) for r in requests))

    return [tokens for tokens, _, _ in asyncio.run(main())]


def test_unsteered_rows_are_untouched_by_steered_neighbours(vllm_backend) -> None:
    a, b = profile(vllm_backend, "a", 1), profile(vllm_backend, "b", 2, low_rank=True)
    together = run(vllm_backend, request("u1"), request("s1", steering=steer(vllm_backend, (a, 1.0))),
                   request("s2", prompt=OTHER, steering=steer(vllm_backend, (b, -2.0))))
    plain = run(vllm_backend, request("u2"), request("u3"), request("u4", prompt=OTHER))  # same batch shape
    assert together[0] == plain[0] and plain[0] == plain[1]
    assert together[1] != plain[1]  # steering changes the steered row
    assert together[2] != plain[2]


def test_strength_zero_is_unsteered(vllm_backend) -> None:
    a = profile(vllm_backend, "a", 1)
    zero, plain = run(vllm_backend, request("z", steering=steer(vllm_backend, (a, 0.0))), request("p"))
    assert zero == plain


def test_a_profiles_repetition_penalty_fills_a_request_that_sets_none(vllm_backend) -> None:
    import dataclasses

    bare = profile(vllm_backend, "a", 1)
    carrying = dataclasses.replace(bare, decoding={"repetition_penalty": 1.8}, offsets=dict(bare.offsets))
    opened = request("o", steering=steer(vllm_backend, (carrying, 1.0)))
    opened.open_sampling = frozenset({"repetition_penalty"})
    own = request("s", steering=steer(vllm_backend, (carrying, 1.0)))  # sets 1 (off) itself
    taken, kept = run(vllm_backend, opened, own)
    by_hand, plain = run(vllm_backend, request("h", steering=steer(vllm_backend, (bare, 1.0)), repetition_penalty=1.8),
                         request("p", steering=steer(vllm_backend, (bare, 1.0))))  # fmt: skip
    assert taken == by_hand and kept == plain
    assert taken != plain  # the penalty changes this reply


def test_a_steered_row_alone_equals_it_in_a_batch_with_other_profiles(vllm_backend) -> None:
    a = profile(vllm_backend, "a", 1)
    b = profile(vllm_backend, "b", 2, low_rank=True)
    c = profile(vllm_backend, "c", 3, lora=True)
    g = profile(vllm_backend, "g", 4, mode="generated")
    rows = [
        request("r0", steering=steer(vllm_backend, (a, 1.5))),
        request("r1", prompt=OTHER, steering=steer(vllm_backend, (b, 1.0), (c, 0.5))),  # a combination
        request("r2", steering=steer(vllm_backend, (g, 2.0))),
        request("r3", prompt=OTHER),
        request("r4", steering=steer(vllm_backend, (c, -1.0))),
        request("r5", prompt=OTHER, steering=RowSteering.from_profiles(  # a's slot, in prompt mode
            [(a, 2.5)], model=vllm_backend.fingerprint, position_mode="prompt")),
    ]
    alone = [run(vllm_backend, r)[0] for r in rows]
    rows = [request(r.request_id + "b", r.prompt_ids, r.steering) for r in rows]
    assert run(vllm_backend, *rows) == alone
    assert len({tuple(t) for t in alone}) == len(alone)  # every steering made its own reply


def _vllm_streams(backend, req, layers) -> dict[int, torch.Tensor]:
    """The residual stream after `layers` in the prefill of `req` (one forward: max_new_tokens 1)."""
    backend.engine.on_workers("rahf_capture", list(layers))
    try:
        run(backend, req)
        (captured,) = backend.engine.on_workers("rahf_captured")
    finally:
        backend.engine.on_workers("rahf_capture", None)
    return {layer: torch.tensor(captured[layer][0]) for layer in layers}


def _hf_streams(hf, steering, prompt, layers) -> dict[int, torch.Tensor]:
    model = hf.model
    steerer = Steerer.attach(model)
    decoder = find_decoder_layers(model)
    seen: dict[int, torch.Tensor] = {}
    handles = [decoder[layer].register_forward_hook(
        lambda m, a, out, layer=layer: seen.__setitem__(layer, (out[0] if isinstance(out, tuple) else out)[0].clone()))
        for layer in layers]
    try:
        ids = torch.tensor([prompt])
        plan = None if steering is None else plan_for_rows(
            [steering], positions=torch.arange(len(prompt))[None], prompt_lengths=[len(prompt)])
        with torch.inference_mode(), steerer.steering(plan):
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("terms", ["offsets", "low_rank", "lora", "combination"])
def test_the_steered_stream_equals_the_transformers_backends(vllm_backend, hf_tiny, terms) -> None:
    layers = (0, 1, 2, 3)
    kinds = {"offsets": {}, "low_rank": {"low_rank": True}, "lora": {"lora": True}}
    if terms == "combination":
        steering = steer(vllm_backend, (profile(vllm_backend, "x", 5, low_rank=True), 0.7),
                         (profile(vllm_backend, "y", 6, lora=True, layers=(2,)), -1.3))
    else:
        steering = steer(vllm_backend, (profile(vllm_backend, "x", 5, **kinds[terms]), 1.5))
    ours = _vllm_streams(vllm_backend, request("h", steering=steering, tokens=1), layers)
    theirs = _hf_streams(hf_tiny, steering, PROMPT, layers)
    plain = _hf_streams(hf_tiny, None, PROMPT, layers)
    for layer in layers:
        scale = float(theirs[layer].abs().max())
        error = float((ours[layer] - theirs[layer]).abs().max())
        assert error <= 1e-5 * scale, (layer, error, scale)  # tolerance: 1e-5 of the stream's largest value
    # the steering is far larger than the tolerance (the comparison can fail)
    assert float((theirs[2] - plain[2]).abs().max()) > 1e-2 * float(plain[2].abs().max())


def test_generated_mode_leaves_the_prompt_unsteered(vllm_backend) -> None:
    g = profile(vllm_backend, "g", 4, mode="generated")
    a = profile(vllm_backend, "g", 4, mode="all")
    layers = (1, 2)
    plain = _vllm_streams(vllm_backend, request("p", tokens=1), layers)
    generated = _vllm_streams(vllm_backend, request("g", steering=steer(vllm_backend, (g, 2.0)), tokens=1), layers)
    every = _vllm_streams(vllm_backend, request("a", steering=steer(vllm_backend, (a, 2.0)), tokens=1), layers)
    assert all(torch.equal(generated[layer], plain[layer]) for layer in layers)
    assert not torch.equal(every[2], plain[2])
    # the first token comes from the unsteered prompt; later ones are steered
    gen, unsteered = run(vllm_backend, request("g2", steering=steer(vllm_backend, (g, 2.0))), request("u"))
    assert gen[0] == unsteered[0] and gen != unsteered


def _vllm_step_streams(backend, req, layers) -> tuple[list[int], dict[int, list[torch.Tensor]]]:
    """The greedy tokens of `req` and the residual stream after `layers` at each of its forwards (the prefill's
    first, then one per decoded token)."""
    backend.engine.on_workers("rahf_capture", list(layers))
    try:
        (tokens,) = run(backend, req)
        (captured,) = backend.engine.on_workers("rahf_captured")
    finally:
        backend.engine.on_workers("rahf_capture", None)
    return tokens, {layer: [torch.tensor(step) for step in captured[layer]] for layer in layers}


def _hf_decode_streams(hf, steering, prompt, tokens, layers, *, steer_decode: bool) -> dict[int, list[torch.Tensor]]:
    """The transformers reference of `_vllm_step_streams`: the prompt's forward steered, then the decode of
    `tokens` (teacher-forced) over its cache, steered as in "all" mode only when `steer_decode`."""
    from server.backends.transformers.compat import cache_keyword

    model = hf.model
    steerer, keyword = Steerer.attach(model), cache_keyword(model)
    decoder = find_decoder_layers(model)
    seen: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    handles = [decoder[layer].register_forward_hook(
        lambda m, a, out, layer=layer: seen[layer].append((out[0] if isinstance(out, tuple) else out)[0].clone()))
        for layer in layers]
    prefill = plan_for_rows([steering], positions=torch.arange(len(prompt))[None], prompt_lengths=[len(prompt)])
    every = RowSteering(steering.offsets, model=hf.fingerprint, position_mode="all")
    decode = plan_for_rows([every if steer_decode else steering], decode=True)
    try:
        with torch.inference_mode():
            with steerer.steering(prefill):
                cache = model(input_ids=torch.tensor([prompt]), use_cache=True).past_key_values
            with steerer.steering(decode):
                for token in tokens[:-1]:
                    model(input_ids=torch.tensor([[token]]), use_cache=True, **{keyword: cache})
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_prompt_mode_steers_the_prompt_and_leaves_generated_tokens_unsteered(vllm_backend, hf_tiny) -> None:
    p = profile(vllm_backend, "pm", 4, mode="prompt")
    a = profile(vllm_backend, "pm", 4, mode="all")
    layers = (1, 2)
    steering = steer(vllm_backend, (p, 2.0))
    assert steering.position_mode == "prompt"
    # the prompt's states are exactly "all" mode's
    prompt_only = _vllm_streams(vllm_backend, request("p", steering=steering, tokens=1), layers)
    every = _vllm_streams(vllm_backend, request("a", steering=steer(vllm_backend, (a, 2.0)), tokens=1), layers)
    plain = _vllm_streams(vllm_backend, request("u", tokens=1), layers)
    assert all(torch.equal(prompt_only[layer], every[layer]) for layer in layers)
    assert not torch.equal(prompt_only[2], plain[2])
    # every decoded token's states are the unsteered computation over the steered prompt's cache
    tokens, streams = _vllm_step_streams(vllm_backend, request("p2", steering=steering, tokens=6), layers)
    assert len(streams[2]) == len(tokens) == 6
    unsteered = _hf_decode_streams(hf_tiny, steering, PROMPT, tokens, layers, steer_decode=False)
    steered = _hf_decode_streams(hf_tiny, steering, PROMPT, tokens, layers, steer_decode=True)
    for layer in layers:
        for step in range(1, len(tokens)):
            ours, theirs = streams[layer][step][-1], unsteered[layer][step][-1]
            scale = float(theirs.abs().max())
            assert float((ours - theirs).abs().max()) <= 1e-5 * scale, (layer, step)
            # the comparison can fail: steering the decode moves the state far beyond the tolerance
            assert float((steered[layer][step][-1] - theirs).abs().max()) > 1e-2 * scale, (layer, step)
    # the first token comes from the steered prompt; the later ones are not steered
    tokens_all, tokens_plain = run(vllm_backend, request("a2", steering=steer(vllm_backend, (a, 2.0))),
                                   request("u2"))
    again = run(vllm_backend, request("p3", steering=steering))[0]
    assert again[0] == tokens_all[0] and again != tokens_all and again != tokens_plain


def test_the_request_steering_wire_format() -> None:
    from server.backends.vllm.worker import RequestSteering

    for mode in ("all", "generated", "prompt"):
        spec = RequestSteering((1, 3), (0.5, -2.0), mode)
        assert RequestSteering.from_extra({"rahf": spec.to_extra()}) == spec
    assert RequestSteering.from_extra({"rahf": {"slots": [1], "strengths": [1.0]}}).mode == "all"
    assert RequestSteering.from_extra({}) is None and RequestSteering.from_extra(None) is None
    with pytest.raises(ValueError, match="position mode"):
        RequestSteering((1,), (1.0,), "sometimes")


def test_a_profile_replaced_mid_stream_keeps_the_requests_snapshot(vllm_backend) -> None:
    old = profile(vllm_backend, "p", 7)
    new = profile(vllm_backend, "p", 8)  # same name, other content: another digest, another slot
    expect_old, expect_new = run(vllm_backend, request("o", steering=steer(vllm_backend, (old, 1.0)), tokens=24),
                                 request("n", steering=steer(vllm_backend, (new, 1.0)), tokens=24))

    async def main():
        first = vllm_backend.engine.generate(request("o2", steering=steer(vllm_backend, (old, 1.0)), tokens=24))
        tokens = list((await first.__anext__()).token_ids)
        later = asyncio.create_task(_collect(vllm_backend.engine, request(
            "n2", steering=steer(vllm_backend, (new, 1.0)), tokens=24)))
        async for event in first:
            tokens += event.token_ids
        return tokens, (await later)[0]

    assert asyncio.run(main()) == (expect_old, expect_new)
    assert expect_old != expect_new


def test_more_profiles_than_slots_over_time(vllm_backend) -> None:
    profiles = [profile(vllm_backend, f"p{i}", 20 + i) for i in range(7)]  # 4 slots
    first = [run(vllm_backend, request(f"a{i}", steering=steer(vllm_backend, (p, 1.0))))[0]
             for i, p in enumerate(profiles)]
    again = [run(vllm_backend, request(f"b{i}", steering=steer(vllm_backend, (p, 1.0))))[0]
             for i, p in enumerate(profiles)]  # evicted profiles are loaded again
    assert first == again


def test_all_slots_in_use_is_an_overload_for_that_request_alone(vllm_backend) -> None:
    profiles = [profile(vllm_backend, f"q{i}", 40 + i) for i in range(5)]  # 5 at once, 4 slots

    async def main():
        return await asyncio.gather(*(_collect(vllm_backend.engine, request(
            f"q{i}", steering=steer(vllm_backend, (p, 1.0)), tokens=16)) for i, p in enumerate(profiles)),
            return_exceptions=True)

    results = asyncio.run(main())
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], EngineOverloadedError)
    assert "profile slots" in str(failed[0])
    assert all(len(r[0]) == 16 for r in results if not isinstance(r, BaseException))


def test_slot_table_reuses_the_least_recently_used_idle_slot() -> None:
    table = SlotTable(3)  # slots 1 and 2
    assert table.acquire("a") == (1, True)
    assert table.acquire("b") == (2, True)
    assert table.acquire("a") == (1, False)
    with pytest.raises(EngineOverloadedError):
        table.acquire("c")
    table.release([1, 1])  # "a" idle, "b" still used
    assert table.acquire("c") == (1, True) and "a" not in table.slot_of
    table.release([2])
    table.forget("c")
    assert sorted(table.free) == [1] and table.acquire("d") == (1, True)


def test_prefix_cache_never_mixes_steered_and_unsteered_blocks(vllm_backend) -> None:
    llm = vllm_backend.engine.llm
    config = llm.vllm_config.cache_config
    assert config.enable_prefix_caching
    long = [5 + (i * 7) % 400 for i in range(3 * config.block_size + 5)]  # several full blocks
    a = profile(vllm_backend, "a", 1)
    assert vllm_backend.engine.between_steps(llm.reset_prefix_cache)
    run(vllm_backend, request("u", prompt=long, tokens=4))  # caches the unsteered blocks
    after_unsteered = run(vllm_backend, request("s", prompt=long, steering=steer(vllm_backend, (a, 1.0)), tokens=8))
    assert vllm_backend.engine.between_steps(llm.reset_prefix_cache)
    fresh = run(vllm_backend, request("s2", prompt=long, steering=steer(vllm_backend, (a, 1.0)), tokens=8))
    assert after_unsteered == fresh
    assert cache_salt(["d"], [1.0], "all") != cache_salt(["d"], [2.0], "all") != cache_salt(["d"], [2.0], "generated")


def test_cancelling_frees_the_row(vllm_backend) -> None:
    async def main():
        stream = vllm_backend.engine.generate(request("c", tokens=400))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):
            if vllm_backend.engine.stats()["running"] == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run(main())
    assert len(run(vllm_backend, request("next", tokens=3))[0]) == 3


def test_overload_beyond_rows_and_queue(vllm_backend) -> None:
    engine = vllm_backend.engine
    limit = engine.max_batch_size + engine.max_queue

    async def main():
        streams = [engine.generate(request(f"o{i}", tokens=200)) for i in range(limit + 1)]
        firsts = await asyncio.gather(*(s.__anext__() for s in streams), return_exceptions=True)
        for s in streams:
            await s.aclose()
        return firsts

    firsts = asyncio.run(main())
    errors = [f for f in firsts if isinstance(f, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], EngineOverloadedError)


def test_max_tokens_zero_scores_the_prompt(vllm_backend, hf_tiny) -> None:
    async def main():
        return await _collect(vllm_backend.engine, request("score", tokens=0, prompt_logprobs=True, top_logprobs=2))

    tokens, reason, events = asyncio.run(main())
    assert tokens == [] and reason == "length"
    scored = events[0].prompt_logprobs
    assert scored[0] is None and [s.token_id for s in scored[1:]] == PROMPT[1:]
    with torch.inference_mode():
        logits = hf_tiny.model(input_ids=torch.tensor([PROMPT])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)
    for position, entry in enumerate(scored[1:], start=1):
        assert entry.logprob == pytest.approx(float(reference[position - 1, PROMPT[position]]), abs=1e-4)
        assert [t for t, _ in entry.top] == reference[position - 1].topk(2).indices.tolist()


def test_logprobs_and_seeded_sampling(vllm_backend) -> None:
    async def main(rid, seed):
        return await _collect(vllm_backend.engine, request(rid, temperature=1.0, seed=seed, logprobs=True,
                                                           top_logprobs=3))

    first = asyncio.run(main("s1", 11))
    second = asyncio.run(main("s2", 11))
    other = asyncio.run(main("s3", 12))
    assert first[0] == second[0] and first[0] != other[0]
    logprobs = [lp for event in first[2] for lp in (event.logprobs or [])]
    assert [lp.token_id for lp in logprobs] == first[0]
    assert all(len(lp.top) == 3 and lp.top[0][1] >= lp.top[-1][1] for lp in logprobs)
