"""Weight-only int4/int8 linears: exact round trips for 4-bit group weights, the float path above
`max_rows`, what `auto` packs, steering on a packed model, and the engine on a packed model."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from server.backends.base import GenerationRequest, SamplingParams
from server.backends.transformers.engine import ContinuousEngine
from server.backends.transformers.packed import GROUP, PackedLinear, int4_error, pack_model
from steering_vectors.core.hooks import Steerer, build_plan
from steering_vectors.core.layers import find_decoder_layers
from tests.conftest import TINY_HIDDEN, make_tiny_llama

STEP = 2.0**-6  # exact in bf16, so scales and zeros of the groups below are exact too


def four_bit_weight(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """(N, K) weights that are 4-bit group values: (code - 8) * STEP, every group using codes 0 and 15."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_features, in_features), generator=generator)
    codes[:, ::GROUP] = 0
    codes[:, 1::GROUP] = 15
    return (codes - 8).float() * STEP


def snap_to_four_bits(model: nn.Module) -> None:
    """Replace every decoder linear's weight by 4-bit group values (what a Q4 GGUF dequantises to)."""
    for seed, module in enumerate(m for layer in find_decoder_layers(model) for m in layer.modules()):
        if type(module) is nn.Linear:
            module.weight.data = four_bit_weight(*module.weight.shape, seed=seed)


def test_int4_error_is_zero_only_for_four_bit_group_values():
    assert int4_error(four_bit_weight(48, 64, seed=0)) == 0.0
    assert int4_error(torch.randn(48, 64, generator=torch.Generator().manual_seed(0))) > 1e-3


@pytest.mark.parametrize("bits", [4, 8])
def test_packed_weight_and_kernel(bits):
    weight = four_bit_weight(96, 64, seed=1)
    linear = nn.Linear(64, 96, bias=True)
    linear.weight.data = weight
    packed = PackedLinear(linear, bits, max_rows=4)
    if bits == 4:
        assert torch.equal(packed.dequantized(), weight)  # 4-bit values with bf16-exact scales: lossless
    else:
        # per-channel int8: each row's largest |w| maps to 127 exactly
        assert torch.allclose(packed.dequantized(), weight, atol=(8 * STEP / 127) / 2 + 1e-7, rtol=0)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    expected = F.linear(x.bfloat16().float(), packed.dequantized(), linear.bias).detach()
    with torch.no_grad():
        got = packed(x)
    assert got.dtype == torch.float32 and got.shape == (3, 96)
    assert torch.allclose(got, expected, rtol=0, atol=1e-2 * float(expected.abs().max()))


def test_more_rows_than_max_rows_use_the_float_weight_exactly():
    linear = nn.Linear(64, 32)
    packed = PackedLinear(linear, 4, max_rows=4)
    assert packed.weight is linear.weight  # shared, not copied
    many = torch.randn(2, 3, 64)  # 6 rows > 4
    assert torch.equal(packed(many), F.linear(many, linear.weight, linear.bias))
    few = many[:1, :2]  # 2 rows: packed path, close but not equal
    assert not torch.equal(packed(few), F.linear(few, linear.weight, linear.bias))


def test_auto_leaves_float_models_alone():
    model = make_tiny_llama()
    report = pack_model(model, "auto")
    assert (report.mode, report.packed) == ("none", {})
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    assert pack_model(model, "none").mode == "none"


def test_auto_packs_four_bit_models_int4_with_an_int8_head():
    model = make_tiny_llama()
    snap_to_four_bits(model)
    ids = torch.tensor([[1, 17, 99, 23, 250, 7, 8, 9, 10]])
    with torch.no_grad():
        before = model(ids).logits
    report = pack_model(model, "auto", max_rows=4)
    assert report.mode == "int4" and report.packed == {4: 7 * 4, 8: 1} and report.kept == []
    assert model.lm_head.bits == 8
    assert all(m.bits == 4 for layer in model.model.layers for m in layer.modules() if isinstance(m, PackedLinear))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # 9 rows > 4: the float weights, bit for bit
        one = model(ids[:, :1]).logits  # 1 row: packed, bf16 activations inside the linears
    assert torch.allclose(one, before[:, :1], atol=0.05 * float(before.abs().max()))
    again = pack_model(model, "auto")
    assert again.reason == "already packed" and again.packed == report.packed


def test_explicit_modes_and_devices(caplog):
    model = make_tiny_llama()
    assert pack_model(model, "int8", max_rows=2).packed == {8: 7 * 4 + 1}
    meta = make_tiny_llama().to("meta")  # a model off the CPU: the packed kernels are CPU-only
    assert pack_model(meta, "auto").mode == "none"
    with caplog.at_level("WARNING", logger="server.backends.transformers.packed"):
        report = pack_model(meta, "int4")  # asked for explicitly: switched off, and said so
    assert (report.mode, report.packed, report.reason) == ("none", {}, "packed kernels are CPU-only (model on meta)")
    assert "weights not packed: packed kernels are CPU-only (model on meta)" in caplog.text
    assert not any(isinstance(m, PackedLinear) for m in meta.modules())


def test_steering_offsets_are_exact_on_a_packed_model():
    model = make_tiny_llama()
    snap_to_four_bits(model)
    pack_model(model, "int4", max_rows=64)  # every call packed
    steerer = Steerer.attach(model)
    offsets = {1: torch.randn(TINY_HIDDEN), 2: torch.randn(TINY_HIDDEN)}
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    plan = build_plan([offsets, None], dtype=torch.float32, device=torch.device("cpu"))
    # layer 1's output before and after the steering hook (hooks of our own around it: how transformers
    # records output_hidden_states relative to forward hooks differs between its versions)
    seen: dict[str, torch.Tensor] = {}
    layer = steerer.layers[1]
    handles = [
        layer.register_forward_hook(lambda m, a, out: seen.__setitem__("before", out.clone()), prepend=True),
        layer.register_forward_hook(lambda m, a, out: seen.__setitem__("after", out.clone())),
    ]
    try:
        with torch.no_grad():
            plain = model(ids).logits
            with steerer.steering(plan):
                steered = model(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(seen["after"][0], seen["before"][0] + offsets[1])  # output of layer 1, row 0 steered
    assert torch.equal(seen["after"][1], seen["before"][1])  # row 1 untouched
    assert not torch.equal(steered[0], plain[0])
    assert torch.equal(steered[1], plain[1])


def test_engine_on_a_packed_model_matches_generate_on_it():
    model = make_tiny_llama()
    snap_to_four_bits(model)
    pack_model(model, "auto", max_rows=4)
    engine = ContinuousEngine(model, max_batch_size=2, prefill_chunk=64)
    engine.start()
    try:
        prompt = [1, 17, 99, 23, 250, 7]

        async def run() -> list[int]:
            request = GenerationRequest("p", prompt, SamplingParams(max_new_tokens=10, temperature=0.0))
            return [t for event in [e async for e in engine.generate(request)] for t in event.token_ids]

        got = asyncio.run(run())
    finally:
        engine.shutdown(timeout=5)
    expected = model.generate(
        torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert got == expected[0, len(prompt) :].tolist()
