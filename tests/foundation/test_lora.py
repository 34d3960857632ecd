"""LoRA terms of attention projections as a per-row profile kind (format version 3): the file format and
its checks, the exact arithmetic of the hooks against peft's adapter, rows that do not carry a term, and
the export of a trained adapter into a profile."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from steering_vectors.core.errors import PlanError, ProfileFormatError, ProfileShapeError, ProfileValueError
from steering_vectors.core.hooks import RowSteering, Steerer, build_plan, combine_lora, plan_for_rows
from steering_vectors.core.models import model_fingerprint, projection_sizes
from steering_vectors.core.profile import ModelFingerprint, Profile
from tests.conftest import TINY_HIDDEN, make_tiny_llama

KV_OUT = 32  # the tiny Llama: 2 key/value heads of 16


def _lora(seed: int, rank: int = 2, layers=(1, 2), names=("q_proj", "v_proj")) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {"q_proj": TINY_HIDDEN, "k_proj": KV_OUT, "v_proj": KV_OUT}
    return {
        layer: {name: (torch.randn(rank, TINY_HIDDEN, generator=g), torch.randn(out[name], rank, generator=g))
                for name in names}
        for layer in layers
    }  # fmt: skip


def _profile(name: str = "lora", seed: int = 0, **kwargs) -> Profile:
    lora = kwargs.pop("lora", _lora(seed))
    offsets = kwargs.pop("offsets", {layer: torch.zeros(TINY_HIDDEN) for layer in lora})
    return Profile(name=name, offsets=offsets, lora=lora, **kwargs)


def test_a_lora_profile_round_trips_as_format_3_and_other_profiles_keep_their_version() -> None:
    profile = _profile(default_strength=0.5)
    assert profile.format_version == 3
    assert profile.lora_ranks() == {1: {"q_proj": 2, "v_proj": 2}, 2: {"q_proj": 2, "v_proj": 2}}
    back = Profile.from_bytes(profile.to_bytes())
    assert back.format_version == 3 and back.default_strength == 0.5
    for layer, terms in profile.lora.items():
        for name, (a, b) in terms.items():
            assert torch.equal(back.lora[layer][name][0], a) and torch.equal(back.lora[layer][name][1], b)
    assert back.summary()["lora"] == {"1": {"q_proj": 2, "v_proj": 2}, "2": {"q_proj": 2, "v_proj": 2}}
    plain = Profile(name="plain", offsets={1: torch.ones(TINY_HIDDEN)})
    assert plain.format_version == 1 and Profile.from_bytes(plain.to_bytes()).lora == {}
    renamed = profile.renamed("again")
    assert renamed.lora.keys() == profile.lora.keys()


def test_lora_terms_are_checked_when_made_and_when_read() -> None:
    with pytest.raises(ProfileFormatError, match="o_proj"):
        _profile(lora={1: {"o_proj": (torch.ones(2, TINY_HIDDEN), torch.ones(TINY_HIDDEN, 2))}})
    with pytest.raises(ProfileFormatError, match=r"expected \(rank, 64\)"):
        _profile(lora={1: {"q_proj": (torch.ones(2, 63), torch.ones(TINY_HIDDEN, 2))}})
    with pytest.raises(ProfileFormatError, match=r"expected \(rank, 64\)"):
        _profile(lora={1: {"q_proj": (torch.ones(2, TINY_HIDDEN), torch.ones(TINY_HIDDEN, 3))}})
    with pytest.raises(ProfileFormatError, match="no offset"):
        _profile(offsets={2: torch.zeros(TINY_HIDDEN)}, lora=_lora(0, layers=(1,)))
    nan = _lora(0)
    nan[1]["q_proj"][1][0, 0] = float("nan")
    with pytest.raises(ProfileValueError, match="NaN"):
        _profile(lora=nan)

    from safetensors.torch import save

    good = _profile()
    tensors = {"offset.1": torch.zeros(TINY_HIDDEN), "lora_a.1.q_proj": torch.ones(2, TINY_HIDDEN)}
    with pytest.raises(ProfileFormatError, match="only one of lora_a and lora_b"):
        Profile.from_bytes(save(tensors, metadata=good.metadata()))
    tensors = {"offset.1": torch.zeros(TINY_HIDDEN), "lora_a.1.q_proj": torch.ones(TINY_HIDDEN)}
    with pytest.raises(ProfileShapeError, match="2-D"):
        Profile.from_bytes(save(tensors, metadata=good.metadata()))


def test_lora_output_sizes_are_checked_against_the_loaded_model() -> None:
    model = make_tiny_llama()
    fingerprint = model_fingerprint(model)
    assert dict(fingerprint.projections) == projection_sizes(model) == {
        "q_proj": TINY_HIDDEN, "k_proj": KV_OUT, "v_proj": KV_OUT}  # fmt: skip
    # the projections travel with the fingerprint but are not part of its identity
    back = ModelFingerprint.from_json(fingerprint.to_json())
    assert back.projections == fingerprint.projections
    assert dataclasses.replace(fingerprint, projections=()) == fingerprint
    assert fingerprint.identity() == dataclasses.replace(fingerprint, projections=()).identity()  # stage keys
    assert set(fingerprint.identity()) == {"architecture", "hidden_size", "num_layers", "digest"}
    assert "projections" not in ModelFingerprint("llama", 4, 2).to_json()

    wrong = _lora(0)
    wrong[1]["v_proj"] = (wrong[1]["v_proj"][0], torch.ones(TINY_HIDDEN, 2))  # q's size on v
    profile = _profile(lora=wrong)  # a file alone cannot tell
    with pytest.raises(ProfileShapeError, match="v_proj outputs 64 features, but the loaded model's v_proj outputs 32"):
        profile.validate_for(fingerprint)
    with pytest.raises(PlanError, match="outputs 64 features"):
        RowSteering.from_profiles([(profile, 1.0)], model=fingerprint)
    with pytest.raises(PlanError, match="outputs 64 features"):
        RowSteering.from_profiles([(profile, 1.0)], model=Steerer.attach(model))
    _profile().validate_for(fingerprint)  # the right sizes pass


def _adapter_model(seed: int = 3):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        make_tiny_llama(),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        adapter_name="rahf",
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and ("layers.3." not in name):  # layer 3 stays untrained (B = 0)
                param.copy_(0.2 * torch.randn(param.shape, generator=g))
    return model.eval()


IDS = torch.tensor([[1, 17, 99, 23, 250, 7], [1, 300, 4, 42, 50, 60]])


def test_exported_adapter_through_the_hooks_equals_the_adapter_on_its_row_and_leaves_the_other_alone() -> None:
    from steering_vectors.training.fit import lora_terms

    wrapped = _adapter_model()
    offsets, terms = lora_terms(wrapped, "rahf")
    assert sorted(terms) == [0, 1, 2] and all(sorted(t) == ["q_proj", "v_proj"] for t in terms.values())
    module = wrapped.base_model.model.model.layers[1].self_attn.v_proj
    a, b = terms[1]["v_proj"]
    assert torch.equal(a, module.lora_A["rahf"].weight) and module.scaling["rahf"] == 2.0
    assert torch.equal(b, 2.0 * module.lora_B["rahf"].weight)
    with torch.no_grad():
        adapted = wrapped(input_ids=IDS).logits
    base = wrapped.unload()
    with torch.no_grad():
        plain = base(input_ids=IDS).logits
    assert not torch.allclose(adapted, plain, atol=1e-3)

    profile = Profile(name="adapter", offsets=offsets, lora=terms, fingerprint=model_fingerprint(base))
    profile = Profile.from_bytes(profile.to_bytes())
    steerer = Steerer.attach(base)
    row = RowSteering.from_profiles([(profile, 1.0)], model=steerer)
    plan = plan_for_rows([row, None])
    assert set(plan.lora) == {(layer, name) for layer in (0, 1, 2) for name in ("q_proj", "v_proj")}
    with torch.no_grad(), steerer.steering(plan):
        steered = base(input_ids=IDS).logits
    torch.testing.assert_close(steered[0], adapted[0], rtol=1e-5, atol=1e-5)  # row 0: the adapter
    assert torch.equal(steered[1], plain[1])  # row 1: untouched, bit for bit
    with torch.no_grad():
        assert torch.equal(base(input_ids=IDS).logits, plain)  # no plan: nothing added

    # strengths scale the term linearly and profiles add: 0.5 + 0.5 of one profile is the profile at 1
    halves = RowSteering.from_profiles([(profile, 0.5), (profile.renamed("twin"), 0.5)], model=steerer)
    assert {name: a.shape[0] for name, (a, _) in halves.lora[1].items()} == {"q_proj": 8, "v_proj": 8}
    with torch.no_grad(), steerer.steering(plan_for_rows([halves, None])):
        summed = base(input_ids=IDS).logits
    torch.testing.assert_close(summed, steered, rtol=1e-5, atol=1e-5)


def test_plans_pad_lora_ranks_and_refuse_terms_the_model_cannot_take() -> None:
    model = make_tiny_llama()
    steerer = Steerer.attach(model)
    small, large = _lora(1, rank=1, layers=(1,)), _lora(2, rank=3, layers=(1, 2), names=("v_proj",))
    zeros = {1: torch.zeros(TINY_HIDDEN), 2: torch.zeros(TINY_HIDDEN)}
    plan = build_plan([zeros, None, zeros], row_lora=[small, None, large])
    a, b = plan.lora[(1, "v_proj")]
    assert a.shape == (3, 3, TINY_HIDDEN) and b.shape == (3, KV_OUT, 3)
    assert torch.equal(a[0, :1], small[1]["v_proj"][0]) and not a[0, 1:].any() and not a[1].any()
    assert plan.lora[(1, "q_proj")][0].shape == (3, 1, TINY_HIDDEN) and not plan.lora[(1, "q_proj")][0][2].any()
    with pytest.raises(PlanError, match="no offset"):
        build_plan([{2: torch.zeros(TINY_HIDDEN)}], row_lora=[small])
    lone = make_tiny_llama(layers=2)
    for layer in lone.model.layers:
        del layer.self_attn.k_proj  # a model without the projection a term names
    with pytest.raises(PlanError, match="k_proj"):
        Steerer.attach(lone).plan = build_plan(
            [{1: torch.zeros(TINY_HIDDEN)}], row_lora=[_lora(3, layers=(1,), names=("k_proj",))]
        )
    with pytest.raises(PlanError, match="rows"):
        build_plan([zeros], row_lora=[small, small])
    assert combine_lora([]) == {} and steerer.projections["v_proj"] == KV_OUT


def test_gguf_export_refuses_lora_terms() -> None:
    from steering_vectors.core.gguf_io import write_control_vector

    with pytest.raises(ProfileFormatError, match="LoRA terms of attention projections at layers \\[1, 2\\]"):
        write_control_vector(_profile())
