"""The continuous-batching engine on the tiny random Llama: exact greedy equality between a request run
alone and the same request joining or leaving a running batch (steered and unsteered), cancellation,
the queue limit, max_tokens, stop token ids, prompt logprobs and shutdown."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from server.backends.base import (
    EngineEvent,
    EngineOverloadedError,
    EngineShutdownError,
    GenerationRequest,
    RowSteering,
    SamplingParams,
)
from server.backends.sampling import prompt_logprobs
from server.backends.transformers.engine import ContinuousEngine
from steering_vectors.core.profile import ModelFingerprint
from tests.conftest import TINY_HIDDEN, TINY_LAYERS

SHAPE = ModelFingerprint("llama", TINY_HIDDEN, TINY_LAYERS)  # what steering is validated against

PROMPTS = [
    [1, 17, 99, 23, 250, 7],
    [1, 300, 4],
    [1, 42, 50, 60, 70, 80, 90, 100, 110, 120, 130, 140, 150, 160, 170, 180, 190, 200, 210],
    [1, 5],
]


def greedy(max_new_tokens: int = 16, **kwargs: object) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, **kwargs)


def steering(seed: int, mode: str = "all", scale: float = 4.0) -> RowSteering:
    generator = torch.Generator().manual_seed(seed)
    offsets = {layer: torch.randn(TINY_HIDDEN, generator=generator) * scale for layer in (1, 2)}
    return RowSteering(offsets, model=SHAPE, position_mode=mode)


async def collect(engine: ContinuousEngine, request: GenerationRequest) -> list[EngineEvent]:
    return [event async for event in engine.generate(request)]


def tokens(events: list[EngineEvent]) -> list[int]:
    return [token for event in events for token in event.token_ids]


def run_alone(engine: ContinuousEngine, prompt: list[int], params: SamplingParams, steer=None) -> list[int]:
    return tokens(asyncio.run(collect(engine, GenerationRequest("alone", prompt, params, steer))))


def reference(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def test_alone_matches_transformers_generate(tiny_model, make_engine):
    engine = make_engine(max_batch_size=4, prefill_chunk=4)  # several prefill chunks per prompt
    for prompt in PROMPTS:
        assert run_alone(engine, prompt, greedy(12)) == reference(tiny_model, prompt, 12)


@pytest.mark.parametrize("steered", [False, True], ids=["unsteered", "steered"])
def test_joining_and_leaving_mid_batch_keeps_greedy_output(make_engine, steered):
    engine = make_engine(max_batch_size=4, prefill_chunk=5)
    lengths = [24, 6, 17, 30]  # rows leave at different steps; others keep decoding
    steers = [steering(i, mode="generated" if i % 2 else "all") if steered else None for i in range(4)]
    alone = [run_alone(engine, p, greedy(n), s) for p, n, s in zip(PROMPTS, lengths, steers, strict=True)]

    async def staggered() -> list[list[int]]:
        async def late(i: int, delay_tokens: int, first: asyncio.Task) -> list[int]:
            # join once the first request has produced `delay_tokens` tokens
            while len(progress) < delay_tokens:
                await asyncio.sleep(0.001)
            return tokens(await collect(engine, GenerationRequest(f"r{i}", PROMPTS[i], greedy(lengths[i]), steers[i])))

        progress: list[int] = []

        async def first() -> list[int]:
            request = GenerationRequest("r0", PROMPTS[0], greedy(lengths[0]), steers[0])
            async for event in engine.generate(request):
                progress.extend(event.token_ids)
            return progress

        task = asyncio.create_task(first())
        others = [asyncio.create_task(late(i, 3 * i, task)) for i in (1, 2, 3)]
        return [await task, *[await other for other in others]]

    assert asyncio.run(staggered()) == alone
    assert engine.stats()["running"] == 0


def test_steered_rows_in_a_mixed_batch_match_single_runs(make_engine):
    engine = make_engine(max_batch_size=8)
    cases = [(p, steering(i, scale=2.0 + i)) for i, p in enumerate(PROMPTS)] + [(p, None) for p in PROMPTS]
    alone = [run_alone(engine, p, greedy(14), s) for p, s in cases]

    async def together() -> list[list[int]]:
        requests = [GenerationRequest(f"r{i}", p, greedy(14), s) for i, (p, s) in enumerate(cases)]
        return [tokens(events) for events in await asyncio.gather(*(collect(engine, r) for r in requests))]

    batched = asyncio.run(together())
    assert batched == alone
    assert alone[0] != alone[len(PROMPTS)]  # the steering changes the output


def test_generated_mode_leaves_the_prompt_unsteered(make_engine):
    engine = make_engine(max_batch_size=2)
    params = greedy(1, prompt_logprobs=True, logprobs=True)
    plain = asyncio.run(collect(engine, GenerationRequest("a", PROMPTS[2], params)))
    steered = asyncio.run(collect(engine, GenerationRequest("b", PROMPTS[2], params, steering(3, "generated"))))
    assert plain[0].prompt_logprobs == steered[0].prompt_logprobs
    everywhere = asyncio.run(collect(engine, GenerationRequest("c", PROMPTS[2], params, steering(3, "all"))))
    assert everywhere[0].prompt_logprobs != plain[0].prompt_logprobs


def test_max_tokens_and_stop_token_ids(make_engine):
    engine = make_engine(max_batch_size=2)
    events = asyncio.run(collect(engine, GenerationRequest("a", PROMPTS[0], greedy(5))))
    assert len(tokens(events)) == 5 and events[-1].finish_reason == "length"
    assert all(event.finish_reason is None for event in events[:-1])

    full = tokens(events)
    stop = full[3]
    first_stop = full.index(stop)
    params = greedy(5, stop_token_ids=frozenset({stop}))
    stopped = asyncio.run(collect(engine, GenerationRequest("b", PROMPTS[0], params)))
    assert tokens(stopped) == full[: first_stop + 1]  # ends with the stop token, as the simple engine does
    assert stopped[-1].finish_reason == "stop"


def test_cancellation_frees_the_slot(make_engine):
    engine = make_engine(max_batch_size=1, max_queue=4)

    async def scenario() -> list[int]:
        stream = engine.generate(GenerationRequest("long", PROMPTS[0], greedy(400)))
        await stream.__anext__()
        assert engine.stats()["running"] == 1
        await stream.aclose()  # the client went away
        # the only slot is free again: a second request runs to completion
        return tokens(await collect(engine, GenerationRequest("next", PROMPTS[1], greedy(6))))

    assert len(asyncio.run(scenario())) == 6
    assert engine.stats() == {"running": 0, "waiting": 0, "slots": 1}


def test_cancelling_the_task_frees_the_slot(make_engine):
    engine = make_engine(max_batch_size=1, max_queue=0)

    async def scenario() -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate(GenerationRequest("long", PROMPTS[0], greedy(400))):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)
        assert len(tokens(await collect(engine, GenerationRequest("next", PROMPTS[1], greedy(3))))) == 3

    asyncio.run(scenario())


def test_queue_limit_raises_overloaded(make_engine):
    engine = make_engine(max_batch_size=1, max_queue=1, retry_after=2.5)

    async def scenario() -> None:
        running = engine.generate(GenerationRequest("a", PROMPTS[0], greedy(300)))
        await running.__anext__()
        waiting = asyncio.create_task(collect(engine, GenerationRequest("b", PROMPTS[1], greedy(2))))
        await asyncio.sleep(0.05)
        with pytest.raises(EngineOverloadedError) as refused:
            await collect(engine, GenerationRequest("c", PROMPTS[1], greedy(2)))
        assert refused.value.retry_after == 2.5
        await running.aclose()
        assert len(tokens(await waiting)) == 2

    asyncio.run(scenario())


def test_prompt_logprobs_match_a_full_forward(tiny_model, make_engine):
    engine = make_engine(max_batch_size=2, prefill_chunk=4)
    prompt = PROMPTS[2]
    events = asyncio.run(collect(engine, GenerationRequest("p", prompt, greedy(0, prompt_logprobs=True))))
    assert events[-1].finish_reason == "length" and tokens(events) == []
    with torch.inference_mode():
        logits = tiny_model(torch.tensor([prompt])).logits[0]
    expected = prompt_logprobs(logits, prompt, 0)
    got = events[0].prompt_logprobs
    assert got[0] is None and len(got) == len(prompt)
    for mine, ref in zip(got[1:], expected[1:], strict=True):
        assert mine.token_id == ref.token_id
        assert mine.logprob == pytest.approx(ref.logprob, abs=1e-4)


def test_seeded_sampling_does_not_depend_on_batch_neighbours(make_engine):
    engine = make_engine(max_batch_size=4)
    params = SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    alone = run_alone(engine, PROMPTS[0], params)

    async def crowded() -> list[int]:
        neighbours = [collect(engine, GenerationRequest(f"n{i}", PROMPTS[i], greedy(10))) for i in (1, 2, 3)]
        results = await asyncio.gather(collect(engine, GenerationRequest("s", PROMPTS[0], params)), *neighbours)
        return tokens(results[0])

    assert asyncio.run(crowded()) == alone


def test_shutdown_refuses_new_work_and_stops_the_thread(tiny_model):
    engine = ContinuousEngine(tiny_model, max_batch_size=2)
    engine.start()
    assert len(run_alone(engine, PROMPTS[1], greedy(3))) == 3
    engine.shutdown(timeout=5)
    assert not any(thread.name == "rahf-engine" and thread.is_alive() for thread in threading.enumerate())
    with pytest.raises(EngineShutdownError):
        run_alone(engine, PROMPTS[1], greedy(3))


def test_shutdown_lets_running_requests_finish(tiny_model):
    engine = ContinuousEngine(tiny_model, max_batch_size=2)
    engine.start()

    async def scenario() -> list[EngineEvent]:
        task = asyncio.create_task(collect(engine, GenerationRequest("a", PROMPTS[0], greedy(20))))
        await asyncio.sleep(0.01)
        await asyncio.to_thread(engine.shutdown, 10.0)
        return await task

    events = asyncio.run(scenario())
    assert len(tokens(events)) == 20 and events[-1].finish_reason == "length"


def test_prompts_prefilled_together_match_single_runs(tiny_model, make_engine):
    reference_engine = make_engine(max_batch_size=4)
    cases = [(PROMPTS[0], greedy(9), None), (PROMPTS[1], greedy(1), steering(1)), (PROMPTS[2], greedy(7), steering(2))]
    cases.append((PROMPTS[3], greedy(8), steering(3, "generated")))
    alone = [run_alone(reference_engine, p, params, s) for p, params, s in cases]
    engine = ContinuousEngine(tiny_model, max_batch_size=4)
    engine._accepting = True  # queue everything before the thread starts: one batched prefill

    async def together() -> list[list[int]]:
        tasks = [
            asyncio.create_task(collect(engine, GenerationRequest(f"r{i}", p, params, s)))
            for i, (p, params, s) in enumerate(cases)
        ]
        await asyncio.sleep(0.05)
        assert len(engine._inbox) == 4
        engine.start()
        return [tokens(await task) for task in tasks]

    try:
        assert asyncio.run(together()) == alone  # row 1 finishes at its first token; rows 2-3 move down
    finally:
        engine.shutdown(timeout=5)


def low_rank_steering(seed: int, rank: int, scale: float = 2.0) -> RowSteering:
    generator = torch.Generator().manual_seed(seed)
    offsets = {layer: torch.randn(TINY_HIDDEN, generator=generator) for layer in (1, 2)}
    low_rank = {}
    for layer in (1, 2):
        down = torch.randn(rank, TINY_HIDDEN, generator=generator)
        low_rank[layer] = (down, scale * torch.randn(TINY_HIDDEN, rank, generator=generator))
    return RowSteering(offsets, model=SHAPE, low_rank=low_rank)


def test_low_rank_rows_match_the_hooks_alone_and_in_a_mixed_batch(tiny_model, make_engine):
    from steering_vectors.core.hooks import Steerer, build_plan

    engine = make_engine(max_batch_size=8, prefill_chunk=4)
    steer = low_rank_steering(1, rank=3)
    # alone: the same greedy tokens as transformers' generate under the hooks with the same plan
    plan = build_plan([dict(steer.offsets)], row_low_rank=[dict(steer.low_rank)])
    with Steerer.attach(tiny_model).steering(plan):
        expected = reference(tiny_model, PROMPTS[2], 12)
    alone = run_alone(engine, PROMPTS[2], greedy(12), steer)
    assert alone == expected
    offsets_only = run_alone(engine, PROMPTS[2], greedy(12), RowSteering(steer.offsets, model=SHAPE))
    assert alone != offsets_only  # the low-rank term takes part

    cases = [
        (PROMPTS[0], low_rank_steering(2, rank=1)),
        (PROMPTS[1], steering(3)),
        (PROMPTS[2], steer),
        (PROMPTS[3], None),
        (PROMPTS[0], low_rank_steering(4, rank=4)),
    ]
    single = [run_alone(engine, p, greedy(10), s) for p, s in cases]

    async def together() -> list[list[int]]:
        requests = [GenerationRequest(f"r{i}", p, greedy(10), s) for i, (p, s) in enumerate(cases)]
        return [tokens(events) for events in await asyncio.gather(*(collect(engine, r) for r in requests))]

    assert asyncio.run(together()) == single


def lora_steering(seed: int, rank: int, scale: float = 0.5) -> RowSteering:
    generator = torch.Generator().manual_seed(seed)
    sizes = {"q_proj": TINY_HIDDEN, "v_proj": TINY_HIDDEN // 2}  # 2 key/value heads of 16
    lora = {
        layer: {name: (torch.randn(rank, TINY_HIDDEN, generator=generator),
                       scale * torch.randn(out, rank, generator=generator)) for name, out in sizes.items()}
        for layer in (0, 2)
    }  # fmt: skip
    zeros = {layer: torch.zeros(TINY_HIDDEN) for layer in lora}
    return RowSteering(zeros, model=SHAPE, lora=lora)


def test_lora_rows_match_the_hooks_alone_and_in_a_mixed_batch(tiny_model, make_engine):
    from steering_vectors.core.hooks import Steerer, build_plan

    engine = make_engine(max_batch_size=8, prefill_chunk=4)
    assert engine.fast_decode is not None  # its start-up probe includes LoRA terms on every projection
    steer = lora_steering(1, rank=2)
    # alone: the same greedy tokens as transformers' generate under the hooks with the same plan
    plan = build_plan([dict(steer.offsets)], row_lora=[steer.lora])
    with Steerer.attach(tiny_model).steering(plan):
        expected = reference(tiny_model, PROMPTS[2], 12)
    alone = run_alone(engine, PROMPTS[2], greedy(12), steer)
    assert alone == expected and alone != reference(tiny_model, PROMPTS[2], 12)

    cases = [
        (PROMPTS[0], lora_steering(2, rank=1)),
        (PROMPTS[1], low_rank_steering(3, rank=2)),
        (PROMPTS[2], steer),
        (PROMPTS[3], None),
        (PROMPTS[0], lora_steering(4, rank=4, scale=1.0)),
    ]
    single = [run_alone(engine, p, greedy(10), s) for p, s in cases]

    async def together() -> list[list[int]]:
        requests = [GenerationRequest(f"r{i}", p, greedy(10), s) for i, (p, s) in enumerate(cases)]
        return [tokens(events) for events in await asyncio.gather(*(collect(engine, r) for r in requests))]

    assert asyncio.run(together()) == single


def test_steering_is_validated_once_and_the_engine_refuses_steering_for_another_model(make_engine):
    from steering_vectors.core.errors import PlanError

    good = low_rank_steering(5, rank=2)
    down, up = good.low_rank[1]
    cases = {
        "expected": dict(offsets=good.offsets, low_rank={1: (down, up[:, :1])}),  # ranks differ
        "no offset": dict(offsets={2: good.offsets[2]}, low_rank={1: (down, up)}),
        r"layers \[4\], but the loaded model has layers 0..3": dict(offsets={4: good.offsets[1]}),
        "hidden size is 64": dict(offsets={1: torch.zeros(TINY_HIDDEN + 1)}),
    }
    for message, terms in cases.items():
        with pytest.raises(PlanError, match=message):
            RowSteering(terms["offsets"], model=SHAPE, low_rank=terms.get("low_rank"))
    with pytest.raises(PlanError, match="position mode"):
        RowSteering(good.offsets, model=SHAPE, position_mode="sometimes")

    engine = make_engine(max_batch_size=2)
    bigger = ModelFingerprint("llama", TINY_HIDDEN, TINY_LAYERS + 2)
    other_model = RowSteering(good.offsets, model=bigger)  # fits that model's shape, not this engine's
    with pytest.raises(PlanError, match="made for a model with 6 layers"):
        run_alone(engine, PROMPTS[1], greedy(2), other_model)
    assert engine.stats()["running"] == 0
    assert len(run_alone(engine, PROMPTS[1], greedy(2), good)) == 2  # the engine still serves


def test_sampling_generators_follow_the_logits_device(monkeypatch, make_engine):
    """Each sampled row's generator is made on the device of the logits it samples from, and a
    generator on another device is refused with a clear message (torch's own error on CUDA logits with
    a CPU generator came from deep inside multinomial, and failed every running request)."""
    from server.backends import sampling
    from server.backends.transformers import engine as engine_module

    assert sampling.make_generator(7, "cpu").device == torch.device("cpu")
    seeded = SamplingParams(max_new_tokens=1, temperature=1.0, seed=7)
    on_meta = torch.zeros(16, device="meta")  # logits on a device other than the generator's
    with pytest.raises(ValueError, match="generator is on cpu but the logits are on meta"):
        sampling.select_token(on_meta, seeded, sampling.make_generator(7, "cpu"))

    made: list[tuple[int | None, torch.device]] = []

    def recording(seed, device="cpu"):
        made.append((seed, torch.device(device)))
        return sampling.make_generator(seed, device)

    monkeypatch.setattr(engine_module, "make_generator", recording)
    engine = make_engine(max_batch_size=2)
    params = SamplingParams(max_new_tokens=5, temperature=0.8, seed=11)
    assert len(run_alone(engine, PROMPTS[0], params)) == 5
    assert made == [(11, engine.lm_head.weight.device)]  # once per request, where the logits are
    run_alone(engine, PROMPTS[0], greedy(3))
    assert len(made) == 1  # greedy rows draw nothing and get no generator


def test_one_failing_request_fails_alone(monkeypatch, tiny_model, make_engine):
    """A request whose prefill fails (token ids outside the vocabulary) or whose sampling fails gets
    an error; the requests running beside it finish with the tokens they get alone."""
    from server.backends.base import EngineError
    from server.backends.transformers import engine as engine_module

    original = engine_module.select_tokens

    def failing_for_seed_13(logits, params, generators, output_ids, prompt_ids=None, allowed=None):
        if any(p.seed == 13 for p in params):
            raise RuntimeError("probability tensor contains nan")
        return original(logits, params, generators, output_ids, prompt_ids, allowed)

    monkeypatch.setattr(engine_module, "select_tokens", failing_for_seed_13)
    reference_engine = make_engine(max_batch_size=4)
    cases = [(PROMPTS[0], greedy(9)), (PROMPTS[2], greedy(7)), (PROMPTS[3], greedy(8))]
    alone = [run_alone(reference_engine, p, params) for p, params in cases]
    bad_prompt = [1, 5, 100_000, 7]  # the tiny model's vocabulary has 512 tokens
    bad_sampling = SamplingParams(max_new_tokens=6, temperature=0.7, seed=13)

    async def everyone(engine, with_bad_prompt: bool = True) -> list:
        requests = [GenerationRequest(f"r{i}", p, params) for i, (p, params) in enumerate(cases)]
        if with_bad_prompt:
            requests.insert(1, GenerationRequest("bad-prompt", bad_prompt, greedy(5)))
        requests.insert(3 if with_bad_prompt else 1, GenerationRequest("bad-sampling", PROMPTS[1], bad_sampling))
        return await asyncio.gather(*(collect(engine, r) for r in requests), return_exceptions=True)

    # concurrent arrivals (prefilled one by one or together, as they come) ...
    engine = make_engine(max_batch_size=8)
    results = asyncio.run(everyone(engine))
    # ... and all queued before the thread starts: one batched prefill that fails, then one by one
    queued = ContinuousEngine(tiny_model, max_batch_size=8)
    queued._accepting = True

    async def queued_first() -> list:
        task = asyncio.create_task(everyone(queued))
        await asyncio.sleep(0.05)
        queued.start()
        return await task

    try:
        results_queued = asyncio.run(queued_first())
    finally:
        queued.shutdown(timeout=5)
    # ... and a batched prefill that succeeds, with one row whose first token cannot be sampled
    together = ContinuousEngine(tiny_model, max_batch_size=8)
    together._accepting = True

    async def together_first() -> list:
        task = asyncio.create_task(everyone(together, with_bad_prompt=False))
        await asyncio.sleep(0.05)
        together.start()
        return await task

    try:
        results_together = asyncio.run(together_first())
    finally:
        together.shutdown(timeout=5)
    assert isinstance(results_together[1], EngineError) and "nan" in str(results_together[1])
    assert [tokens(results_together[i]) for i in (0, 2, 3)] == alone
    for got in (results, results_queued):
        assert isinstance(got[1], EngineError) and "request failed" in str(got[1])
        assert isinstance(got[3], EngineError) and "nan" in str(got[3])
        assert [tokens(got[i]) for i in (0, 2, 4)] == alone
    assert engine.stats() == {"running": 0, "waiting": 0, "slots": 8}
    assert len(run_alone(engine, PROMPTS[1], greedy(4))) == 4  # and the engine goes on serving


def prompt_mode_reference(model, prompt: list[int], steer: RowSteering, max_new_tokens: int) -> list[int]:
    """Greedy tokens by hand: the prompt's forward steered at every position (its cache kept), then every
    generated token's forward unsteered over that cache."""
    from server.backends.transformers.compat import cache_keyword
    from steering_vectors.core.hooks import Steerer, plan_for_rows

    steerer, keyword = Steerer.attach(model), cache_keyword(model)
    plan = plan_for_rows([steer], positions=torch.arange(len(prompt))[None], prompt_lengths=[len(prompt)])
    assert plan.mask is None  # every prompt position steered
    with torch.inference_mode():
        with steerer.steering(plan):
            out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        generated = [int(out.logits[0, -1].argmax())]
        cache = out.past_key_values
        while len(generated) < max_new_tokens:
            out = model(input_ids=torch.tensor([[generated[-1]]]), use_cache=True, **{keyword: cache})
            generated.append(int(out.logits[0, -1].argmax()))
    return generated


def test_prompt_mode_steers_the_prompt_and_leaves_generated_tokens_unsteered(tiny_model, make_engine):
    engine = make_engine(max_batch_size=4, prefill_chunk=5)  # the long prompt spans four chunks
    steer = steering(3, "prompt")
    params = greedy(14, prompt_logprobs=True, logprobs=True)
    prompt_only = asyncio.run(collect(engine, GenerationRequest("p", PROMPTS[2], params, steer)))
    everywhere = asyncio.run(collect(engine, GenerationRequest("a", PROMPTS[2], params, steering(3, "all"))))
    plain = asyncio.run(collect(engine, GenerationRequest("u", PROMPTS[2], params)))
    assert tokens(prompt_only) == prompt_mode_reference(tiny_model, PROMPTS[2], steer, 14)
    # the prompt is steered as in "all" mode: its logprobs and the first token (from its last state) are those
    assert prompt_only[0].prompt_logprobs == everywhere[0].prompt_logprobs != plain[0].prompt_logprobs
    assert tokens(prompt_only)[0] == tokens(everywhere)[0]
    assert tokens(prompt_only) != tokens(everywhere)  # ... and the generated tokens are not
    assert tokens(prompt_only) != tokens(plain)


def test_prompt_mode_rows_in_a_mixed_batch_match_single_runs(tiny_model, make_engine):
    """Decode steps leave prompt-mode rows unsteered while the other rows of the batch stay steered."""
    engine = make_engine(max_batch_size=8, prefill_chunk=7)
    cases = [(PROMPTS[0], steering(1, "prompt")), (PROMPTS[1], steering(2, "all")), (PROMPTS[2], steering(3, "prompt")),
             (PROMPTS[3], steering(4, "generated")), (PROMPTS[0], None), (PROMPTS[3], steering(5, "prompt"))]
    lengths = [12, 9, 16, 14, 10, 11]
    alone = [run_alone(engine, p, greedy(n), s) for (p, s), n in zip(cases, lengths, strict=True)]
    for (prompt, steer), n, got in zip(cases, lengths, alone, strict=True):
        if steer is not None and steer.position_mode == "prompt":
            assert got == prompt_mode_reference(tiny_model, prompt, steer, n)
    assert alone[1] != run_alone(engine, PROMPTS[1], greedy(9))  # the "all" row is steered

    async def together() -> list[list[int]]:
        requests = [GenerationRequest(f"r{i}", p, greedy(n), s)
                    for i, ((p, s), n) in enumerate(zip(cases, lengths, strict=True))]
        return [tokens(events) for events in await asyncio.gather(*(collect(engine, r) for r in requests))]

    assert asyncio.run(together()) == alone

    # the same rows prefilled together in one padded forward (queued before the thread starts)
    batched = ContinuousEngine(tiny_model, max_batch_size=8)
    batched._accepting = True

    async def prefilled_together() -> list[list[int]]:
        tasks = [asyncio.create_task(collect(batched, GenerationRequest(f"b{i}", p, greedy(n), s)))
                 for i, ((p, s), n) in enumerate(zip(cases, lengths, strict=True))]
        await asyncio.sleep(0.05)
        assert len(batched._inbox) == len(cases)
        batched.start()
        return [tokens(await task) for task in tasks]

    try:
        assert asyncio.run(prefilled_together()) == alone
    finally:
        batched.shutdown(timeout=5)
