"""The lean decode step against the transformers forward it stands in for: bit-identical hidden states
for Llama, Qwen2 (q/k/v biases) and Mistral models, float and packed (fused int4 projections), steered
and unsteered, rows at different lengths; which models it refuses; the engine's start-up check."""

from __future__ import annotations

import asyncio

import pytest
import torch

from server.backends.base import GenerationRequest, RowSteering, SamplingParams
from server.backends.transformers.engine import ContinuousEngine
from server.backends.transformers.fastdecode import LlamaDecodeStep
from server.backends.transformers.packed import pack_model
from steering_vectors.core.hooks import Steerer, build_plan
from tests.conftest import TINY_HIDDEN, make_tiny_llama
from tests.engine.test_packed import snap_to_four_bits

SMALL = dict(
    vocab_size=300,
    hidden_size=TINY_HIDDEN,
    intermediate_size=2 * TINY_HIDDEN,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def tiny(kind: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(3)
    if kind == "llama":
        return make_tiny_llama(seed=3)
    if kind == "qwen2":
        config = transformers.Qwen2Config(**SMALL, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(config)
        for layer in model.model.layers:  # random, non-zero q/k/v biases
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.data.normal_()
        return model.eval()
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=None)).eval()
    raise ValueError(kind)


def history(engine: ContinuousEngine, lengths: list[int], seed: int = 0) -> None:
    """Fill rows 0..k-1 of the engine's cache with `lengths[i]` random decoded positions each."""
    generator = torch.Generator().manual_seed(seed)
    vocab = int(engine.config.vocab_size)
    with torch.inference_mode():
        for step in range(max(lengths)):
            rows = [i for i, length in enumerate(lengths) if length > step]
            n = len(rows)
            assert rows == list(range(n))  # longer rows first
            positions = torch.full((n,), step, dtype=torch.long)
            ids = torch.randint(vocab, (n,), generator=generator)
            engine.cache.for_decode(n, positions, step + 1)
            engine._transformers_decode(ids, positions, engine._decode_mask(positions, step + 1), None)


def both_paths(engine: ContinuousEngine, lengths: list[int], plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The next decode step of rows with `lengths` cached positions: transformers forward, lean step."""
    n = len(lengths)
    positions = torch.tensor(lengths)
    kv_len = max(lengths) + 1
    mask = engine._decode_mask(positions, kv_len)
    ids = torch.randint(int(engine.config.vocab_size), (n,), generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        engine.cache.for_decode(n, positions, kv_len)
        reference = engine._transformers_decode(ids, positions, mask, plan)
        keys = engine.cache.keys[0][:n, :, :kv_len].clone()
        engine.cache.for_decode(n, positions, kv_len)
        lean = engine.fast_decode(ids, positions, mask, engine.cache, plan)
        assert torch.equal(engine.cache.keys[0][:n, :, :kv_len], keys)  # the lean step wrote the same K
    return reference, lean


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("packed", [False, True])
def test_lean_step_is_bit_identical_to_the_transformers_forward(kind, packed):
    model = tiny(kind)
    if packed:
        snap_to_four_bits(model)
        assert pack_model(model, "auto", max_rows=8).mode == "int4"
    engine = ContinuousEngine(model, max_batch_size=4, max_seq_len=32)
    step = engine.fast_decode
    assert step is not None and engine.fast_decode_error == 0.0
    layers = model.config.num_hidden_layers
    # q/k/v and gate/up are fused only when packed, and only where this CPU's int4 kernel gives the
    # fused product bit for bit, group by group (AVX2-only CPUs: all of them; AVX-512 ones: none, or on
    # some (an AMD EPYC with avx512_bf16) the q/k/v products but not gate/up, 4 of 8). Either way the step
    # must be exact, which is what the rest asserts.
    assert 0 <= step.fused <= 2 * layers if packed else step.fused == 0
    assert step.max_rows == (8 if packed else None)
    lengths = [7, 4, 4, 1]
    history(engine, lengths)
    generator = torch.Generator().manual_seed(1)
    row_offsets = [
        {0: torch.randn(TINY_HIDDEN, generator=generator) * 3, layers - 1: torch.randn(TINY_HIDDEN) * 3},
        None,
        {1: torch.randn(TINY_HIDDEN, generator=generator) * 3},
        {0: torch.randn(TINY_HIDDEN, generator=generator) * 3},
    ]
    unsteered, lean_unsteered = both_paths(engine, lengths, None)
    assert torch.equal(lean_unsteered, unsteered)
    steered, lean_steered = both_paths(engine, lengths, build_plan(row_offsets))
    assert torch.equal(lean_steered, steered)
    assert torch.equal(steered[1], unsteered[1])  # the unsteered row is untouched
    assert not torch.equal(steered[0], unsteered[0])
    # per-row LoRA terms of q/k/v: added after the (fused) projection by the same function as the hooks
    sizes = engine.steerer.projections
    assert sorted(sizes) == ["k_proj", "q_proj", "v_proj"]

    def term(name: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(rank, TINY_HIDDEN, generator=generator)
        return a, 0.5 * torch.randn(sizes[name], rank, generator=generator)

    row_lora = [{0: {"q_proj": term("q_proj", 2), "v_proj": term("v_proj", 2)}}, None,
                {1: {"k_proj": term("k_proj", 3)}}, {layers - 1: {"v_proj": term("v_proj", 1)}}]  # fmt: skip
    zeros = [{layer: torch.zeros(TINY_HIDDEN) for layer in terms} if terms else None for terms in row_lora]
    loraed, lean_loraed = both_paths(engine, lengths, build_plan(zeros, row_lora=row_lora))
    assert torch.equal(lean_loraed, loraed)
    assert torch.equal(loraed[1], unsteered[1])
    assert all(not torch.equal(loraed[i], unsteered[i]) for i in (0, 2, 3))


def test_models_the_lean_step_does_not_take():
    """Sliding windows, other activations, q/k norms: no lean step, the engine uses transformers."""
    import transformers

    assert LlamaDecodeStep.build(make_tiny_llama()) is not None
    sliding = transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL, sliding_window=16))
    assert LlamaDecodeStep.build(sliding) is None
    gelu = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, hidden_act="gelu"))
    assert LlamaDecodeStep.build(gelu) is None
    qk_norms = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SMALL, head_dim=16))
    assert LlamaDecodeStep.build(qk_norms) is None
    assert ContinuousEngine(qk_norms).fast_decode is None  # served through the transformers forward


def test_engine_refuses_a_lean_step_that_disagrees(monkeypatch, tiny_model):
    original = LlamaDecodeStep.__call__

    def off_by_a_bit(self, *args, **kwargs):
        return original(self, *args, **kwargs) * 1.01

    monkeypatch.setattr(LlamaDecodeStep, "__call__", off_by_a_bit)
    engine = ContinuousEngine(tiny_model)
    assert engine.fast_decode is None and engine.fast_decode_error > 1e-3
    assert ContinuousEngine(tiny_model, fast_decode=False).fast_decode_error is None

    def broken(self, *args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(LlamaDecodeStep, "__call__", broken)
    engine = ContinuousEngine(tiny_model)  # still starts, on the transformers forward
    assert engine.fast_decode is None and engine.fast_decode_error is None
    engine.start()
    try:
        request = GenerationRequest("r", [1, 5, 9], SamplingParams(4, temperature=0.0))
        events = asyncio.run(_collect(engine, request))
        assert [t for e in events for t in e.token_ids] == tiny_model.generate(
            torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, 3:].tolist()
    finally:
        engine.shutdown(timeout=5)


async def _collect(engine: ContinuousEngine, request: GenerationRequest) -> list:
    return [event async for event in engine.generate(request)]


def test_engine_tokens_are_the_same_with_and_without_the_lean_step(tiny_model):
    """Four concurrent requests, steered differently, joining at different times: same greedy tokens."""
    generator = torch.Generator().manual_seed(5)
    offsets = [{1: torch.randn(TINY_HIDDEN, generator=generator) * 4} for _ in range(2)]

    def run(fast: bool) -> list[list[int]]:
        engine = ContinuousEngine(tiny_model, max_batch_size=4, prefill_chunk=8, fast_decode=fast)
        assert (engine.fast_decode is not None) == fast
        engine.start()

        async def one(i: int) -> list[int]:
            await asyncio.sleep(0.01 * i)
            steer = RowSteering(offsets[i % 2], model=Steerer.attach(tiny_model)) if i < 3 else None
            params = SamplingParams(12 + 3 * i, temperature=0.0)
            request = GenerationRequest(f"r{i}", [1, 10 + i, 20 * i + 3, 7], params, steer)
            return [t for event in [e async for e in engine.generate(request)] for t in event.token_ids]

        async def everyone() -> list[list[int]]:
            return list(await asyncio.gather(*(one(i) for i in range(4))))

        try:
            return asyncio.run(everyone())
        finally:
            engine.shutdown(timeout=5)

    lean, regular = run(True), run(False)
    assert lean == regular
    assert [len(tokens) for tokens in lean] == [12, 15, 18, 21]


@pytest.mark.parametrize("packed", [False, True])
def test_lean_step_with_low_rank_terms_is_bit_identical(packed):
    """Rows with low-rank terms of different ranks (padded in the plan), offsets only, and none."""
    model = tiny("llama")
    if packed:
        snap_to_four_bits(model)
        pack_model(model, "auto", max_rows=8)
    engine = ContinuousEngine(model, max_batch_size=4, max_seq_len=32)
    assert engine.fast_decode is not None and engine.fast_decode_error == 0.0  # the probe has a low-rank row
    lengths = [6, 5, 3, 2]
    history(engine, lengths)
    gen = torch.Generator().manual_seed(4)

    def term(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(rank, TINY_HIDDEN, generator=gen), torch.randn(TINY_HIDDEN, rank, generator=gen)

    row_offsets = [
        {1: torch.randn(TINY_HIDDEN, generator=gen), 2: torch.randn(TINY_HIDDEN, generator=gen)},
        {1: torch.randn(TINY_HIDDEN, generator=gen)},
        None,
        {2: torch.zeros(TINY_HIDDEN)},
    ]
    row_low_rank = [{1: term(2), 2: term(3)}, None, None, {2: term(1)}]
    unsteered, _ = both_paths(engine, lengths, None)
    offsets_only, _ = both_paths(engine, lengths, build_plan(row_offsets))
    steered, lean = both_paths(engine, lengths, build_plan(row_offsets, row_low_rank=row_low_rank))
    assert torch.equal(lean, steered)
    assert torch.equal(steered[1], offsets_only[1]) and torch.equal(steered[2], unsteered[2])
    assert not torch.equal(steered[0], offsets_only[0]) and not torch.equal(steered[3], unsteered[3])


def test_a_fused_projection_that_differs_from_its_parts_is_not_used(monkeypatch, caplog):
    """What happens on CPUs whose int4 kernel does not give the fused product bit for bit (AVX-512):
    the projections are called one by one, and the lean step is still exact."""
    from server.backends.transformers import fastdecode

    original = fastdecode._FusedInt4.__call__

    def off_by_one_ulp(self, x):
        return [torch.nextafter(part, torch.full_like(part, float("inf"))) for part in original(self, x)]

    monkeypatch.setattr(fastdecode._FusedInt4, "__call__", off_by_one_ulp)
    model = tiny("llama")
    snap_to_four_bits(model)
    pack_model(model, "auto", max_rows=8)
    with caplog.at_level("WARNING", logger=fastdecode.__name__):
        engine = ContinuousEngine(model, max_batch_size=4, max_seq_len=32)
    assert "fused int4 projection differs from its parts" in caplog.text
    assert engine.fast_decode is not None and engine.fast_decode.fused == 0
    lengths = [5, 3]
    history(engine, lengths)
    reference, lean = both_paths(engine, lengths, None)
    assert torch.equal(lean, reference)
