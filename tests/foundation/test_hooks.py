"""Per-row steering through the hooks: exactness, isolation of unsteered rows, combination rules."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from steering_vectors import PlanError, Profile, Steerer, build_plan, combine_offsets, positions_from_attention_mask
from steering_vectors.core.hooks import SteeringPlan
from tests.conftest import TINY_HIDDEN, TINY_LAYERS


def _profile(name: str, layers: list[int], seed: int) -> Profile:
    gen = torch.Generator().manual_seed(seed)
    return Profile(name=name, offsets={layer: torch.randn(TINY_HIDDEN, generator=gen) for layer in layers})


def _left_padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = [7, 4, 6, 7, 3]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, 500, (length,), generator=gen)
        mask[row, width - length :] = 1
    return ids, mask


def _forward(model, ids, mask):
    positions = positions_from_attention_mask(mask).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


class _Recorder:
    """Records each layer's output before (prepended hook) and after the steering hook."""

    def __init__(self, steerer: Steerer) -> None:
        self.before: dict[int, torch.Tensor] = {}
        self.after: dict[int, torch.Tensor] = {}
        self.handles = []
        for index, layer in enumerate(steerer.layers):
            self.handles.append(layer.register_forward_hook(self._store(self.before, index), prepend=True))
            self.handles.append(layer.register_forward_hook(self._store(self.after, index)))

    @staticmethod
    def _store(target: dict, index: int):
        def hook(module, args, output):
            target[index] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.fixture()
def steerer(tiny_model):
    return Steerer.attach(tiny_model)


def test_attach_installs_once(tiny_model):
    first = Steerer.attach(tiny_model)
    assert Steerer.attach(tiny_model) is first
    assert first.num_layers == TINY_LAYERS
    assert all(len(layer._forward_hooks) >= 1 for layer in first.layers)


def test_mixed_batch_is_exact_and_unsteered_rows_are_bit_identical(tiny_model, steerer):
    a = _profile("a", [0, 2], seed=1)
    b = _profile("b", [1, 2, 3], seed=2)
    ids, mask = _left_padded_batch()
    # row 0: a@1.5; row 1: unsteered; row 2: a@-0.5 + b@2; row 3: unsteered; row 4: b@0.25 (generated only)
    rows = [[(a, 1.5)], [], [(a, -0.5), (b, 2.0)], [], [(b, 0.25)]]
    modes = ["all", "all", "all", "all", "generated"]
    prompt_lengths = [7, 4, 6, 7, 1]  # row 4: the last two of its three tokens count as generated
    positions = positions_from_attention_mask(mask)
    plan = build_plan([combine_offsets(r) or None for r in rows], modes=modes, positions=positions,
                      prompt_lengths=prompt_lengths)

    plain = _forward(tiny_model, ids, mask)
    recorder = _Recorder(steerer)
    try:
        with steerer.steering(plan):
            steered = _forward(tiny_model, ids, mask)
    finally:
        recorder.remove()

    for layer in range(TINY_LAYERS):
        for row, entries in enumerate(rows):
            expected_offset = torch.zeros(TINY_HIDDEN)
            for profile, strength in entries:
                if layer in profile.offsets:
                    expected_offset = expected_offset + profile.offsets[layer] * strength
            for t in range(ids.shape[1]):
                steer_here = bool(mask[row, t]) and (modes[row] == "all" or positions[row, t] >= prompt_lengths[row])
                before = recorder.before[layer][row, t]
                after = recorder.after[layer][row, t]
                if steer_here and any(layer in p.offsets for p, _ in entries):
                    assert torch.equal(after, before + expected_offset), (layer, row, t)
                else:
                    assert torch.equal(after, before), (layer, row, t)

    for row in (1, 3):
        assert torch.equal(steered[row], plain[row])
    for row in (0, 2):
        assert not torch.allclose(steered[row], plain[row])
    # row 4 steers only its last two positions: the first real position's logits are untouched
    assert torch.equal(steered[4, -3], plain[4, -3])
    assert not torch.allclose(steered[4, -1], plain[4, -1])


def test_generated_mode_leaves_a_whole_prompt_untouched(tiny_model, steerer):
    ids, mask = _left_padded_batch()
    profile = _profile("a", [0, 1, 2, 3], seed=3)
    prompt_lengths = mask.sum(dim=1).tolist()  # prefill of prompts only
    plan = build_plan([combine_offsets([(profile, 3.0)])] * ids.shape[0], modes=["generated"] * ids.shape[0],
                      positions=positions_from_attention_mask(mask), prompt_lengths=prompt_lengths)
    with steerer.steering(plan):
        steered = _forward(tiny_model, ids, mask)
    assert torch.equal(steered, _forward(tiny_model, ids, mask))


def test_strength_zero_equals_no_steering(tiny_model, steerer):
    ids, mask = _left_padded_batch()
    profile = _profile("a", [0, 1, 2, 3], seed=4)
    plan = build_plan([combine_offsets([(profile, 0.0)])] * ids.shape[0],
                      positions=positions_from_attention_mask(mask))
    assert plan is not None
    with steerer.steering(plan):
        steered = _forward(tiny_model, ids, mask)
    assert torch.equal(steered, _forward(tiny_model, ids, mask))


def test_two_profiles_equal_their_weighted_sum(tiny_model, steerer):
    ids, mask = _left_padded_batch()
    a, b = _profile("a", [0, 2], seed=5), _profile("b", [2, 3], seed=6)
    layers = sorted(set(a.offsets) | set(b.offsets))
    zero = torch.zeros(TINY_HIDDEN)
    merged = Profile(name="ab", offsets={
        layer: a.offsets.get(layer, zero) * 0.7 + b.offsets.get(layer, zero) * -1.3 for layer in layers
    })
    positions = positions_from_attention_mask(mask)
    rows = ids.shape[0]
    with steerer.steering(build_plan([combine_offsets([(a, 0.7), (b, -1.3)])] * rows, positions=positions)):
        combined = _forward(tiny_model, ids, mask)
    with steerer.steering(build_plan([combine_offsets([(merged, 1.0)])] * rows, positions=positions)):
        single = _forward(tiny_model, ids, mask)
    torch.testing.assert_close(combined, single, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(combined, _forward(tiny_model, ids, mask))


def test_empty_plan_and_no_plan_change_nothing(tiny_model, steerer):
    ids, mask = _left_padded_batch()
    assert build_plan([None, {}, None]) is None
    reference = _forward(tiny_model, ids, mask)
    with steerer.steering(None):
        assert torch.equal(_forward(tiny_model, ids, mask), reference)
    with steerer.steering(SteeringPlan(offsets={})):
        assert torch.equal(_forward(tiny_model, ids, mask), reference)


def test_plan_is_per_thread(tiny_model, steerer):
    ids, mask = _left_padded_batch()
    reference = _forward(tiny_model, ids, mask)
    profile = _profile("a", [1], seed=7)
    plan = build_plan([combine_offsets([(profile, 5.0)])] * ids.shape[0], positions=positions_from_attention_mask(mask))
    seen: list[torch.Tensor] = []
    with steerer.steering(plan):
        worker = threading.Thread(target=lambda: seen.append(_forward(tiny_model, ids, mask)))
        worker.start()
        worker.join()
        steered = _forward(tiny_model, ids, mask)
    assert torch.equal(seen[0], reference)
    assert not torch.allclose(steered, reference)
    assert steerer.plan is None


def test_plan_errors(tiny_model, steerer):
    ids, mask = _left_padded_batch()
    profile = _profile("a", [1], seed=8)
    wrong_rows = build_plan([combine_offsets([(profile, 1.0)])] * 2)
    with steerer.steering(wrong_rows), pytest.raises(PlanError, match="rows"):
        _forward(tiny_model, ids, mask)
    with pytest.raises(PlanError, match="layers"):
        steerer.plan = SteeringPlan(offsets={TINY_LAYERS: torch.zeros(1, 1, TINY_HIDDEN)})
    with pytest.raises(PlanError, match="positions"):
        build_plan([combine_offsets([(profile, 1.0)])], modes=["generated"])
    with pytest.raises(PlanError, match="mode"):
        build_plan([combine_offsets([(profile, 1.0)])], modes=["sometimes"])


# -- low-rank (input-dependent) terms ---------------------------------------------------------------


def _low_rank_profile(name: str, layers: list[int], rank: int, seed: int) -> Profile:
    gen = torch.Generator().manual_seed(seed)
    return Profile(
        name=name,
        offsets={layer: torch.randn(TINY_HIDDEN, generator=gen) for layer in layers},
        low_rank={
            layer: (torch.randn(rank, TINY_HIDDEN, generator=gen), torch.randn(TINY_HIDDEN, rank, generator=gen))
            for layer in layers
        },
    )


def test_low_rank_delta_equals_a_hand_computation():
    from steering_vectors.core.hooks import low_rank_delta

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, TINY_HIDDEN, generator=gen) * 40  # large states: the input is normalised
    down, up = torch.randn(2, 4, TINY_HIDDEN, generator=gen), torch.randn(2, TINY_HIDDEN, 4, generator=gen)
    got = low_rank_delta(hidden, down, up)
    x = hidden.double().numpy()
    x = x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + 1e-6)
    hand = np.einsum("bhr,brk,btk->bth", up.double().numpy(), down.double().numpy(), x)
    np.testing.assert_allclose(got.numpy(), hand, rtol=1e-4, atol=1e-4)
    assert torch.allclose(low_rank_delta(hidden * 7, down, up), got, atol=1e-4)  # scale-free in h


def test_low_rank_rows_are_exact_and_other_rows_untouched(tiny_model, steerer):
    """Rows with a low-rank profile, an offset-only profile and none, in one padded batch."""
    from steering_vectors.core.hooks import combine_low_rank, low_rank_delta

    ids, mask = _left_padded_batch()
    lr, flat = _low_rank_profile("lr", [1, 2], rank=3, seed=1), _profile("flat", [2], seed=2)
    rows = [[(lr, 0.5)], [(flat, 1.0)], [], [(lr, 0.5), (flat, 1.0)], []]
    plan = build_plan(
        [combine_offsets(r) or None for r in rows],
        row_low_rank=[combine_low_rank(r) or None for r in rows],
        positions=positions_from_attention_mask(mask),
    )
    assert plan.low_rank[1][0].shape == (5, 3, TINY_HIDDEN)  # rank padded to the largest (3) with zeros
    recorder = _Recorder(steerer)
    try:
        with steerer.steering(plan):
            _forward(tiny_model, ids, mask)
    finally:
        recorder.remove()
    real = mask.bool()
    for layer in range(TINY_LAYERS):
        before, after = recorder.before[layer], recorder.after[layer]
        for row, entries in enumerate(rows):
            expected = before[row].clone()
            for profile, strength in entries:
                if layer in profile.offsets:
                    expected = expected + strength * profile.offsets[layer]
                if layer in profile.low_rank:
                    down, up = profile.low_rank[layer]
                    expected = expected + low_rank_delta(before[row][None], down[None], (strength * up)[None])[0]
            keep = real[row]
            torch.testing.assert_close(after[row][keep], expected[keep], rtol=1e-5, atol=1e-5)
            if not entries:
                assert torch.equal(after[row], before[row])  # unsteered rows bit-identical


def test_low_rank_plans_refuse_a_term_without_an_offset():
    lr = _low_rank_profile("lr", [1], rank=2, seed=0)
    with pytest.raises(PlanError, match="no offset"):
        build_plan([{2: torch.zeros(TINY_HIDDEN)}], row_low_rank=[dict(lr.low_rank)])
    with pytest.raises(PlanError, match="2 low-rank entries for 1 rows"):
        build_plan([dict(lr.offsets)], row_low_rank=[dict(lr.low_rank), None])


# -- devices, the one apply function, validated rows ------------------------------------------------


class _Stack(nn.Module):
    """The smallest model the steerer takes: `model.layers` of linears and a config with hidden_size (no
    transformers code, so it runs on any device, 'meta' included)."""

    def __init__(self, layers: int = TINY_LAYERS, hidden: int = TINY_HIDDEN) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(layers))
        self.config = SimpleNamespace(hidden_size=hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.model.layers:
            x = layer(x)
        return x


def test_plans_follow_the_hidden_states_device():
    """A plan built on the CPU steers a model on another device (here 'meta', which needs no
    accelerator): the hook moves the plan to the hidden states' device once and keeps the copy."""
    model = _Stack().to("meta")
    steerer = Steerer.attach(model)
    lr = _low_rank_profile("lr", [1, 2], rank=2, seed=3)
    plan = build_plan([dict(lr.offsets), None], row_low_rank=[dict(lr.low_rank), None],
                      modes=["all", "all"], positions=torch.tensor([[0, 1, 2], [-1, 0, 1]]))
    assert plan.device == torch.device("cpu") and plan.mask is not None
    with steerer.steering(plan):  # raised "Tensor on device cpu is not on the expected device meta" before
        hidden = model(torch.zeros(2, 3, TINY_HIDDEN, device="meta"))
    assert hidden.device.type == "meta" and hidden.shape == (2, 3, TINY_HIDDEN)
    moved = plan.to("meta")
    assert moved is plan.to(torch.device("meta"))  # made once per device, reused by every layer and step
    assert {t.device.type for t in moved.offsets.values()} == {"meta"}
    assert moved.mask.device.type == "meta"
    assert {t.device.type for pair in moved.low_rank.values() for t in pair} == {"meta"}
    assert plan.to("cpu") is plan

    # on the CPU the same stand-in model gets exactly h + offset at the steered layers
    cpu = _Stack()
    x = torch.randn(2, 3, TINY_HIDDEN, generator=torch.Generator().manual_seed(0))
    only_offsets = build_plan([dict(lr.offsets), None])
    with Steerer.attach(cpu).steering(only_offsets):
        steered = cpu(x)
    h = cpu.model.layers[0](x)
    h = cpu.model.layers[1](h)
    h = h + torch.stack([lr.offsets[1], torch.zeros(TINY_HIDDEN)]).unsqueeze(1)
    h = cpu.model.layers[2](h)
    h = h + torch.stack([lr.offsets[2], torch.zeros(TINY_HIDDEN)]).unsqueeze(1)
    assert torch.equal(steered, cpu.model.layers[3](h))


def test_apply_plan_is_exactly_what_the_hook_adds(tiny_model, steerer):
    from steering_vectors.core.hooks import apply_plan

    ids, mask = _left_padded_batch()
    lr = _low_rank_profile("lr", [2], rank=3, seed=9)
    rows = ids.shape[0]
    plan = build_plan([dict(lr.offsets)] * rows, row_low_rank=[dict(lr.low_rank)] * rows, modes=["all"] * rows,
                      positions=positions_from_attention_mask(mask))
    recorder = _Recorder(steerer)
    try:
        with steerer.steering(plan):
            _forward(tiny_model, ids, mask)
    finally:
        recorder.remove()
    assert torch.equal(recorder.after[2], apply_plan(recorder.before[2], plan, 2))
    assert apply_plan(recorder.before[1], plan, 1) is recorder.before[1]  # layer not steered: untouched
    assert apply_plan(recorder.before[1], None, 1) is recorder.before[1]


def test_row_steering_is_validated_once_against_the_model(tiny_model):
    from steering_vectors import ProfileLayerError, ProfileShapeError
    from steering_vectors.core.hooks import RowSteering, plan_for_rows
    from steering_vectors.core.models import model_fingerprint

    shape = model_fingerprint(tiny_model)
    a, late = _profile("a", [0, 2], seed=1), _profile("late", [1], seed=2)
    late.position_mode = "generated"
    row = RowSteering.from_profiles([(a, 2.0)], model=shape)
    assert (row.position_mode, row.applied, row.fits(shape)) == ("all", (("a", 2.0),), True)
    assert torch.equal(row.offsets[2], a.offsets[2] * 2.0)
    with pytest.raises(PlanError, match="different token-position modes"):
        RowSteering.from_profiles([(a, 1.0), (late, 1.0)], model=shape)
    assert RowSteering.from_profiles([(a, 1.0), (late, 1.0)], model=shape, position_mode="all").position_mode == "all"
    with pytest.raises(PlanError, match=f"layers \\[{TINY_LAYERS}\\]"):
        RowSteering({TINY_LAYERS: torch.zeros(TINY_HIDDEN)}, model=shape)
    with pytest.raises(PlanError, match=f"hidden size is {TINY_HIDDEN}"):
        RowSteering({0: torch.zeros(TINY_HIDDEN, 2)}, model=shape)
    with pytest.raises(PlanError, match="without offsets"):
        RowSteering({}, model=shape)
    # the same rules as a profile against a fingerprint (profile.check_terms), with the profile's errors
    too_deep = Profile(name="deep", offsets={TINY_LAYERS: torch.zeros(TINY_HIDDEN)})
    with pytest.raises(ProfileLayerError, match=f"layers \\[{TINY_LAYERS}\\]"):
        too_deep.validate_for(shape)
    with pytest.raises(ProfileShapeError, match=f"hidden size is {TINY_HIDDEN}"):
        Profile(name="wide", offsets={0: torch.zeros(TINY_HIDDEN + 1)}).validate_for(shape)
    # a decode plan steers "generated" rows everywhere; a prefill plan masks their prompt
    generated = RowSteering(dict(late.offsets), model=shape, position_mode="generated")
    assert plan_for_rows([generated, None], decode=True).mask is None
    prefill = plan_for_rows([generated], positions=torch.tensor([[0, 1, 2, 3]]), prompt_lengths=[3])
    assert prefill.mask[0, :, 0].tolist() == [0.0, 0.0, 0.0, 1.0]


# -- "prompt" mode: only the prompt's tokens ---------------------------------------------------------


def test_prompt_mode_masks_exactly_the_prompt_positions():
    from steering_vectors.core.hooks import RowSteering, plan_for_rows
    from steering_vectors.core.profile import ModelFingerprint

    offsets = {1: torch.ones(TINY_HIDDEN)}
    positions = torch.tensor([[-1, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5], [-1, -1, 0, 1, 2, 3]])
    plan = build_plan([offsets] * 4, modes=["prompt", "generated", "all", "prompt"], positions=positions,
                      prompt_lengths=[3, 3, 3, 10])
    assert plan.mask[:, :, 0].tolist() == [
        [0, 1, 1, 1, 0, 0],  # positions 0..2: padding, and positions at or past the prompt, unsteered
        [0, 0, 0, 1, 1, 1],  # generated: the complement within the real tokens
        [1, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 1],  # the whole input is prompt
    ]
    with pytest.raises(PlanError, match="'prompt' mode need token positions"):
        build_plan([offsets], modes=["prompt"])
    with pytest.raises(PlanError, match="prompt lengths"):
        build_plan([offsets], modes=["prompt"], positions=torch.tensor([[0, 1]]))

    # decode: one token past every prompt, so a "prompt" row is left out and the others keep their offsets
    shape = ModelFingerprint("llama", TINY_HIDDEN, TINY_LAYERS)
    rows = [RowSteering(offsets, model=shape, position_mode=mode) for mode in ("prompt", "all", "generated")]
    decode = plan_for_rows([*rows, None], decode=True)
    assert decode.mask is None
    assert decode.offsets[1][:, 0].tolist() == [[0.0] * TINY_HIDDEN, [1.0] * TINY_HIDDEN, [1.0] * TINY_HIDDEN,
                                                [0.0] * TINY_HIDDEN]
    assert plan_for_rows([rows[0], None], decode=True) is None  # nothing steers generated tokens
    prefill = plan_for_rows([rows[0]], positions=torch.tensor([[0, 1, 2, 3]]), prompt_lengths=[3])
    assert prefill.mask[0, :, 0].tolist() == [1.0, 1.0, 1.0, 0.0]


def test_prompt_mode_steers_the_prompt_as_all_mode_and_nothing_after(tiny_model, steerer):
    """Rows in "prompt", "all" and "generated" mode in one left-padded batch: each layer's output is
    exactly h + offset at a prompt-mode row's prompt positions and exactly h after them."""
    ids, mask = _left_padded_batch()
    profile = _profile("a", [0, 2, 3], seed=11)
    offsets = combine_offsets([(profile, 2.0)])
    modes = ["prompt", "all", "prompt", "generated", "prompt"]
    prompt_lengths = [4, 4, 6, 4, 1]  # row 2's whole input is prompt; row 4's last two tokens are generated
    positions = positions_from_attention_mask(mask)
    plan = build_plan([offsets] * 5, modes=modes, positions=positions, prompt_lengths=prompt_lengths)
    recorder = _Recorder(steerer)
    try:
        with steerer.steering(plan):
            steered = _forward(tiny_model, ids, mask)
    finally:
        recorder.remove()
    for layer in range(TINY_LAYERS):
        for row in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                in_prompt = 0 <= int(positions[row, t]) < prompt_lengths[row]
                steer_here = bool(mask[row, t]) and {
                    "all": True, "prompt": in_prompt, "generated": not in_prompt}[modes[row]]
                before, after = recorder.before[layer][row, t], recorder.after[layer][row, t]
                if steer_here and layer in offsets:
                    assert torch.equal(after, before + offsets[layer]), (layer, row, t)
                else:
                    assert torch.equal(after, before), (layer, row, t)
    # the whole-prompt row equals the same row in "all" mode
    every = build_plan([offsets] * 5, positions=positions)
    with steerer.steering(every):
        assert torch.equal(steered[2], _forward(tiny_model, ids, mask)[2])
