"""Per-row steering through forward hooks on decoder layers.

Knows how to add offsets to decoder-layer outputs, row by row and position by position. Knows nothing
about where offsets come from (see `profile`), how requests are scheduled (the server's engine) or HTTP.

One `Steerer` is installed per model and keeps one forward hook per decoder layer. Each forward pass
reads the *steering plan* of the calling thread: for each steered layer a ``(batch, 1, hidden)`` offset
(each row's profiles already multiplied by their strengths and summed), optionally a low-rank term
``(down (batch, R, hidden), up (batch, hidden, R))`` whose contribution depends on the hidden state (see
`low_rank_delta`; each row's profiles' ranks concatenated, strengths folded into ``up``, unused ranks
zero), and an optional ``(batch, seq, 1)`` position mask. With no plan the hooks return at once. Rows
whose offset and low-rank factors are zero get ``h + 0.0``, which is bit-identical to ``h``.

A plan may also carry LoRA terms of attention projections (``q_proj``, ``k_proj``, ``v_proj``): per
(layer, projection) ``(a (batch, R, hidden), b (batch, out, R))``, added to that projection's output as
``b @ a @ x`` of its input (see `lora_delta`), each row its own. Their hooks sit on the projections and
are installed the first time a plan with LoRA terms is set, so models never steered that way pay nothing.

Steering has one home here: `RowSteering` is one row's combination, validated once against the model
(layer count, hidden size, ranks: `profile.check_terms`); `build_plan` / `plan_for_rows` stack rows into
a plan; `apply_plan` adds a plan to one layer's output, and is what the hooks and any hand-written
forward (the server's lean decode step) call. A plan may live on any device: `apply_plan` moves it to
the hidden states' device (once per plan and device).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import PlanError, ProfileError
from .layers import find_decoder_layers, hidden_size_of
from .profile import LORA_PROJECTIONS, POSITION_MODES, LoraTerms, Profile, check_terms, merged_decoding

_STEERER_ATTR = "_rahf_steerer"


@dataclass
class SteeringPlan:
    """What one forward pass adds: per layer a (B, 1, H) offset, and where (mask (B, T, 1) or None)."""

    offsets: dict[int, torch.Tensor]
    mask: torch.Tensor | None = None  # 1.0 where steering applies, 0.0 elsewhere; None = everywhere
    low_rank: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layers in offsets
    # (layer, projection) -> (a (B, R, in), b (B, out, R)); layers in offsets
    lora: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _moved: dict[torch.device, SteeringPlan] = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return next(iter(self.offsets.values())).shape[0] if self.offsets else 0

    @property
    def device(self) -> torch.device | None:
        return next(iter(self.offsets.values())).device if self.offsets else None

    def to(self, device: torch.device | str) -> SteeringPlan:
        """This plan with every tensor on `device`: itself when it is there already, else a copy made once
        and kept (a plan is reused for many forward passes). Differentiable, so offsets that require
        grad keep their gradient."""
        device = torch.device(device)
        if self.device is None or self.device == device:
            return self
        moved = self._moved.get(device)
        if moved is None:
            moved = SteeringPlan(
                offsets={layer: t.to(device) for layer, t in self.offsets.items()},
                mask=self.mask.to(device) if self.mask is not None else None,
                low_rank={layer: (d.to(device), u.to(device)) for layer, (d, u) in self.low_rank.items()},
                lora={key: (a.to(device), b.to(device)) for key, (a, b) in self.lora.items()},
            )
            self._moved[device] = moved
        return moved


def apply_plan(hidden: torch.Tensor, plan: SteeringPlan | None, layer: int) -> torch.Tensor:
    """The output of decoder layer `layer` with the plan's steering added: hidden (B, T, H) ->
    ``h + offset`` (``h + offset * mask`` with a mask; the offset including the low-rank term where the
    plan has one), in hidden's dtype and on its device. Returns `hidden` itself when the plan does not
    steer that layer. Unsteered rows (zero offset and factors) come back bit-identical."""
    if plan is None or layer not in plan.offsets:
        return hidden
    plan = plan.to(hidden.device)
    offset = plan.offsets[layer]
    if offset.shape[0] != hidden.shape[0]:
        raise PlanError(f"plan has {offset.shape[0]} rows, layer {layer} output has {hidden.shape[0]}")
    factors = plan.low_rank.get(layer)
    if factors is not None:
        offset = offset + low_rank_delta(hidden, *factors).to(offset.dtype)  # (B, T, H)
    delta = offset if plan.mask is None else offset * plan.mask  # (B, 1, H) or (B, T, H)
    return hidden + delta.to(hidden.dtype)


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``b @ a @ x`` for every position: (B, T, out) float32 from a projection's input x (B, T, in),
    a (B, R, in) and b (B, out, R)."""
    return torch.bmm(torch.bmm(x.float(), a.float().transpose(1, 2)), b.float().transpose(1, 2))


def apply_lora(output: torch.Tensor, x: torch.Tensor, plan: SteeringPlan | None, layer: int, name: str) -> torch.Tensor:
    """The output (B, T, out) of projection `name` of decoder layer `layer` for input x (B, T, in) with the
    plan's LoRA term for it added (times the plan's position mask, if any), in the output's dtype and on
    its device; `output` itself when the plan has no term there. Rows with zero terms come back
    bit-identical."""
    if plan is None or (layer, name) not in plan.lora:
        return output
    plan = plan.to(output.device)
    a, b = plan.lora[(layer, name)]
    if a.shape[0] != output.shape[0]:
        raise PlanError(f"plan has {a.shape[0]} rows, layer {layer} {name} output has {output.shape[0]}")
    delta = lora_delta(x, a, b)
    if plan.mask is not None:
        delta = delta * plan.mask
    return output + delta.to(output.dtype)


class Steerer:
    """The hooks of one model. Create with `Steerer.attach(model)`; it is installed only once."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = find_decoder_layers(model)
        self.num_layers = len(self.layers)
        self.hidden_size = hidden_size_of(model)
        self._local = threading.local()
        self._handles = [
            layer.register_forward_hook(self._make_hook(index)) for index, layer in enumerate(self.layers)
        ]
        self._projection_handles: list[Any] = []
        self.projections = projection_sizes(self.layers)

    def _install_projection_hooks(self) -> None:
        for index, layer in enumerate(self.layers):
            attention = getattr(layer, "self_attn", None)
            for name in self.projections:
                module = getattr(attention, name, None)
                if isinstance(module, nn.Module):
                    hook = self._make_projection_hook(index, name)
                    self._projection_handles.append(module.register_forward_hook(hook))

    def _make_projection_hook(self, index: int, name: str):  # noqa: ANN202 - torch hook signature
        local = self._local
        key = (index, name)

        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            plan = getattr(local, "plan", None)
            if plan is None or key not in plan.lora:
                return None
            return apply_lora(output, args[0], plan, index, name)

        return hook

    @classmethod
    def attach(cls, model: nn.Module) -> Steerer:
        """Return the model's steerer, installing the hooks on first use."""
        steerer = getattr(model, _STEERER_ATTR, None)
        if steerer is None or not steerer._handles:
            steerer = cls(model)
            setattr(model, _STEERER_ATTR, steerer)
        return steerer

    def remove(self) -> None:
        for handle in self._handles + self._projection_handles:
            handle.remove()
        self._handles, self._projection_handles = [], []

    @property
    def plan(self) -> SteeringPlan | None:
        return getattr(self._local, "plan", None)

    @plan.setter
    def plan(self, plan: SteeringPlan | None) -> None:
        if plan is not None:
            bad = [layer for layer in plan.offsets if not 0 <= layer < self.num_layers]
            if bad:
                raise PlanError(f"plan steers layers {bad}; the model has layers 0..{self.num_layers - 1}")
            if plan.lora:
                missing = sorted({name for _, name in plan.lora} - set(self.projections))
                if missing:
                    raise PlanError(f"plan has LoRA terms on {missing}, which this model's attention does not have")
                if not self._projection_handles:
                    self._install_projection_hooks()
        self._local.plan = plan

    @contextmanager
    def steering(self, plan: SteeringPlan | None) -> Iterator[SteeringPlan | None]:
        """Apply `plan` to forward passes of this thread inside the block."""
        previous = self.plan
        self.plan = plan
        try:
            yield plan
        finally:
            self._local.plan = previous

    def _make_hook(self, index: int):  # noqa: ANN202 - torch hook signature
        local = self._local

        def hook(module: nn.Module, args: object, output: Any) -> Any:
            plan = getattr(local, "plan", None)
            if plan is None or index not in plan.offsets:
                return None
            hidden = apply_plan(output[0] if isinstance(output, tuple) else output, plan, index)
            if isinstance(output, tuple):
                return (hidden, *output[1:])
            return hidden

        return hook


def projection_sizes(layers: Sequence[nn.Module]) -> dict[str, int]:
    """Output features of the attention projections LoRA terms may steer (`profile.LORA_PROJECTIONS`), as
    the first of the decoder `layers` has them; projections it does not have (or names differently) are
    left out."""
    attention = getattr(layers[0], "self_attn", None)
    sizes = {}
    for name in LORA_PROJECTIONS:
        features = getattr(getattr(attention, name, None), "out_features", None)
        if isinstance(features, int):
            sizes[name] = features
    return sizes


LOW_RANK_EPS = 1e-6


def low_rank_delta(hidden: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``up @ down @ (h / rms(h))`` for every position: (B, T, H) float32 from hidden (B, T, H),
    down (B, R, H) and up (B, H, R). The input is RMS-normalised (no weight) so that the term does not
    grow with the very large hidden states some positions (the first token) have."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + LOW_RANK_EPS)
    return torch.bmm(torch.bmm(x, down.float().transpose(1, 2)), up.float().transpose(1, 2))


# -- building plans ---------------------------------------------------------------------------------


def combine_offsets(entries: Sequence[tuple[Profile, float]]) -> dict[int, torch.Tensor]:
    """Weighted sum of profiles: layer -> (H,) float32 offset. Empty for no entries."""
    combined: dict[int, torch.Tensor] = {}
    for profile, strength in entries:
        for layer, offset in profile.offsets.items():
            scaled = offset * float(strength)
            combined[layer] = combined[layer] + scaled if layer in combined else scaled
    return combined


def combine_low_rank(entries: Sequence[tuple[Profile, float]]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The profiles' low-rank terms, layer -> (down (R, H), up (H, R)) float32: the ranks of all profiles
    concatenated, each ``up`` multiplied by its strength, so that the term equals the weighted sum of
    the profiles' terms. Empty when no profile has one."""
    downs: dict[int, list[torch.Tensor]] = {}
    ups: dict[int, list[torch.Tensor]] = {}
    for profile, strength in entries:
        for layer, (down, up) in profile.low_rank.items():
            downs.setdefault(layer, []).append(down)
            ups.setdefault(layer, []).append(up * float(strength))
    return {layer: (torch.cat(downs[layer], dim=0), torch.cat(ups[layer], dim=1)) for layer in downs}


def combine_lora(entries: Sequence[tuple[Profile, float]]) -> dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The profiles' LoRA terms, layer -> projection -> (a (R, in), b (out, R)) float32: ranks concatenated,
    each ``b`` multiplied by its strength, so that the term equals the weighted sum of the profiles'
    terms. Empty when no profile has one."""
    parts: dict[tuple[int, str], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for profile, strength in entries:
        for layer, terms in profile.lora.items():
            for name, (a, b) in terms.items():
                a_list, b_list = parts.setdefault((layer, name), ([], []))
                a_list.append(a)
                b_list.append(b * float(strength))
    combined: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for (layer, name), (a_list, b_list) in sorted(parts.items()):
        combined.setdefault(layer, {})[name] = (torch.cat(a_list, dim=0), torch.cat(b_list, dim=1))
    return combined


class RowSteering:
    """One row's steering, validated once against the model it will steer.

    offsets: layer -> (H,) (see `combine_offsets`); low_rank: layer -> (down (R, H), up (H, R)) (see
    `combine_low_rank`), only at layers with an offset; lora: layer -> projection -> (a (R, H), b (out, R))
    (see `combine_lora`), only at layers with an offset; position_mode: "all", "generated" or "prompt";
    applied: (profile name, strength) pairs, for reporting; sources: the (profile, strength) entries the
    combination was made from (`from_profiles`; empty otherwise), for engines that keep profiles apart and
    take strengths per request (the vLLM backend's slot tables). `model` is anything with `num_layers` and
    `hidden_size` (a `ModelFingerprint`, a `Steerer`), and `projections` (the output sizes LoRA terms are
    checked against; a fingerprint's pairs or a steerer's map). Tensors are kept as float32 on the CPU;
    plans move them where the model is. Raises `PlanError` when the steering does not fit the model.
    """

    __slots__ = ("offsets", "low_rank", "lora", "position_mode", "applied", "num_layers", "hidden_size", "sources",
                 "conditional")

    def __init__(
        self,
        offsets: Mapping[int, torch.Tensor],
        *,
        model: Any,
        low_rank: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        position_mode: str = "all",
        applied: Sequence[tuple[str, float]] = (),
        lora: Mapping[int, Mapping[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
        sources: Sequence[tuple[Profile, float]] = (),
        conditional: Sequence[tuple[Profile, float]] = (),
    ) -> None:
        if position_mode not in POSITION_MODES:
            raise PlanError(f"position mode {position_mode!r} is not one of {POSITION_MODES}")
        self.num_layers, self.hidden_size = int(model.num_layers), int(model.hidden_size)
        self.offsets = {int(layer): t.detach().to("cpu", torch.float32) for layer, t in offsets.items()}
        self.low_rank = {
            int(layer): (down.detach().to("cpu", torch.float32), up.detach().to("cpu", torch.float32))
            for layer, (down, up) in (low_rank or {}).items()
        }
        self.lora: LoraTerms = {
            int(layer): {
                str(name): (a.detach().to("cpu", torch.float32), b.detach().to("cpu", torch.float32))
                for name, (a, b) in terms.items()
            }
            for layer, terms in (lora or {}).items()
        }
        self.conditional = tuple((profile, float(strength)) for profile, strength in conditional)
        if not self.offsets and not self.conditional:
            raise PlanError("steering without offsets; use no steering instead")
        for profile, _ in self.conditional:
            if profile.condition is None:
                raise PlanError(f"profile {profile.name!r} has no condition to wait for")
        projections = getattr(model, "projections", None)
        try:
            check_terms(
                self.offsets, self.low_rank, hidden_size=self.hidden_size, num_layers=self.num_layers, who="steering",
                lora=self.lora, projections=dict(projections) if projections else None,
            )
            for profile, _ in self.conditional:
                check_terms(profile.offsets, profile.low_rank, hidden_size=self.hidden_size,
                            num_layers=self.num_layers, who=f"profile {profile.name!r}", lora=profile.lora,
                            projections=dict(projections) if projections else None)
                if not profile.condition.layer < self.num_layers:
                    raise PlanError(f"profile {profile.name!r}: its condition reads layer {profile.condition.layer}; "
                                    f"the model has layers 0..{self.num_layers - 1}")
        except ProfileError as exc:
            raise PlanError(str(exc)) from None
        self.position_mode = position_mode
        self.applied = tuple((str(name), float(strength)) for name, strength in applied)
        self.sources = tuple((profile, float(strength)) for profile, strength in sources)

    @classmethod
    def from_profiles(
        cls, entries: Sequence[tuple[Profile, float]], *, model: Any, position_mode: str | None = None,
        conditional: Sequence[tuple[Profile, float]] = (),
    ) -> RowSteering:
        """The weighted sum of `entries` (profile, strength); the position mode is `position_mode`, else
        the common one of all the profiles, conditional ones included (PlanError when they differ).
        `conditional`: entries whose profiles' conditions decide, per request, whether they join the sum
        (`resolved`); until then they steer nothing. The conditions read the prompt, so an engine decides them
        after the prompt's prefill; in `all` and `prompt` modes it prefills the prompt again with the fired ones
        (the row is then exactly the resolved steering's), in `generated` mode they steer from the first
        generated token."""
        if position_mode is None:
            modes = {profile.position_mode for profile, _ in (*entries, *conditional)} or {"generated"}
            if len(modes) != 1:
                raise PlanError("the profiles use different token-position modes; choose one")
            position_mode = modes.pop()
        return cls(
            combine_offsets(entries),
            model=model,
            low_rank=combine_low_rank(entries),
            position_mode=position_mode,
            applied=[(profile.name, strength) for profile, strength in (*entries, *conditional)],
            lora=combine_lora(entries),
            sources=entries,
            conditional=conditional,
        )

    @property
    def steers_prompt(self) -> bool:
        """Whether the unconditional part has terms (the part a prompt's prefill applies)."""
        return bool(self.offsets)

    @property
    def decoding(self) -> dict[str, float]:
        """The decoding defaults of the profiles acting on the row now (`Profile.decoding`, combined by
        `merged_decoding`): the unconditional entries; conditional ones only once `resolved` keeps them."""
        return merged_decoding(self.sources)

    @property
    def steers_generated(self) -> bool:
        """Whether generated tokens are steered (a decode step's plan includes the row): every mode but `prompt`."""
        return self.position_mode != "prompt"

    def resolved(self, fired: Sequence[bool]) -> RowSteering | None:
        """This row's steering once its conditions are read: the unconditional entries plus the conditional
        ones that fired (parallel to `conditional`); None when that leaves nothing."""
        if len(fired) != len(self.conditional):
            raise PlanError(f"{len(fired)} condition results for {len(self.conditional)} conditional profiles")
        chosen = [*self.sources, *(entry for entry, hit in zip(self.conditional, fired, strict=True) if hit)]
        if not chosen:
            return None
        resolved = RowSteering.from_profiles(chosen, model=self, position_mode=self.position_mode)
        resolved.applied = self.applied
        return resolved

    def fits(self, model: Any) -> bool:
        """Whether this steering was validated for a model of `model`'s shape."""
        return (self.num_layers, self.hidden_size) == (int(model.num_layers), int(model.hidden_size))

    def __repr__(self) -> str:
        return f"RowSteering(layers={sorted(self.offsets)}, mode={self.position_mode!r}, applied={self.applied})"


def plan_for_rows(
    rows: Sequence[RowSteering | None],
    *,
    positions: torch.Tensor | None = None,
    prompt_lengths: Sequence[int] | torch.Tensor | None = None,
    decode: bool = False,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> SteeringPlan | None:
    """`build_plan` over validated rows (None: unsteered). `decode`: the input is one new token per row,
    past every prompt, so "generated" rows are steered like "all" rows, "prompt" rows are left out
    (unsteered) and no mask is needed."""
    if decode:
        rows = [row if row is not None and row.steers_generated else None for row in rows]
    return build_plan(
        [row.offsets if row is not None else None for row in rows],
        row_low_rank=[row.low_rank if row is not None else None for row in rows],
        row_lora=[row.lora if row is not None else None for row in rows],
        modes=None if decode else [row.position_mode if row is not None else "all" for row in rows],
        positions=positions,
        prompt_lengths=prompt_lengths,
        dtype=dtype,
        device=device,
    )


def positions_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask of a left- or right-padded batch -> (B, T) positions in each row, -1 at padding."""
    positions = attention_mask.long().cumsum(dim=1) - 1
    return positions.masked_fill(attention_mask == 0, -1)


def build_plan(
    row_offsets: Sequence[Mapping[int, torch.Tensor] | None],
    *,
    modes: Sequence[str] | None = None,
    positions: torch.Tensor | None = None,
    prompt_lengths: Sequence[int] | torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    row_low_rank: Sequence[Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None] | None = None,
    row_lora: Sequence[Mapping[int, Mapping[str, tuple[torch.Tensor, torch.Tensor]]] | None] | None = None,
) -> SteeringPlan | None:
    """Stack per-row offsets into a plan for one forward pass, or None when no row is steered.

    row_offsets: per row, layer -> (H,) offset (see `combine_offsets`), or None for an unsteered row.
    row_low_rank: per row, layer -> (down (R, H), up (H, R)) (see `combine_low_rank`) or None; each layer
        must also have an offset in that row. The plan pads the ranks to the largest with zeros.
    modes: per row, "all" (every real token), "generated" (only positions >= that row's prompt length) or
        "prompt" (only positions < that row's prompt length).
    positions: (B, T) position of each input token in its row's sequence, -1 for padding; None means
        the input has no padding and starts at position 0 of every row.
    prompt_lengths: per row, the number of prompt tokens; needed for rows in "generated" or "prompt" mode.
    row_lora: per row, layer -> projection -> (a (R, H), b (out, R)) (see `combine_lora`) or None; each
        layer must also have an offset in that row. Ranks are padded to the largest with zeros.
    """
    batch = len(row_offsets)
    steered = [i for i, offsets in enumerate(row_offsets) if offsets]
    if not steered:
        return None
    modes = list(modes) if modes is not None else ["all"] * batch
    if len(modes) != batch:
        raise PlanError(f"{len(modes)} position modes for {batch} rows")
    for mode in modes:
        if mode not in POSITION_MODES:
            raise PlanError(f"position mode {mode!r} is not one of {POSITION_MODES}")

    layers = sorted({layer for i in steered for layer in row_offsets[i]})  # type: ignore[union-attr]
    hidden = next(iter(row_offsets[steered[0]].values())).numel()  # type: ignore[union-attr]
    offsets: dict[int, torch.Tensor] = {}
    for layer in layers:
        stacked = torch.zeros(batch, 1, hidden, dtype=torch.float32)
        for i in steered:
            vector = row_offsets[i].get(layer)  # type: ignore[union-attr]
            if vector is not None:
                stacked[i, 0] = vector
        offsets[layer] = stacked.to(device=device, dtype=dtype)
    low_rank = _stack_low_rank(row_low_rank, row_offsets, batch, hidden, device) if row_low_rank else {}
    lora = _stack_lora(row_lora, row_offsets, batch, hidden, device) if row_lora else {}

    mask = _position_mask(modes, positions, prompt_lengths, batch)
    if mask is not None:
        mask = mask.to(device=device, dtype=dtype).unsqueeze(-1)  # (B, T, 1)
    return SteeringPlan(offsets=offsets, mask=mask, low_rank=low_rank, lora=lora)


def _stack_low_rank(
    row_low_rank: Sequence[Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None],
    row_offsets: Sequence[Mapping[int, torch.Tensor] | None],
    batch: int,
    hidden: int,
    device: torch.device | str,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    if len(row_low_rank) != batch:
        raise PlanError(f"{len(row_low_rank)} low-rank entries for {batch} rows")
    ranks: dict[int, int] = {}
    for i, terms in enumerate(row_low_rank):
        if terms:
            try:  # the rules RowSteering and profiles follow (shapes, an offset at every term's layer)
                check_terms(row_offsets[i] or {}, terms, hidden_size=hidden, who=f"row {i}")
            except ProfileError as exc:
                raise PlanError(str(exc)) from None
        for layer, (down, _) in (terms or {}).items():
            ranks[layer] = max(ranks.get(layer, 0), down.shape[0])
    stacked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer, rank in sorted(ranks.items()):
        downs = torch.zeros(batch, rank, hidden, dtype=torch.float32)
        ups = torch.zeros(batch, hidden, rank, dtype=torch.float32)
        for i, terms in enumerate(row_low_rank):
            pair = (terms or {}).get(layer)
            if pair is not None:
                downs[i, : pair[0].shape[0]] = pair[0]
                ups[i, :, : pair[1].shape[1]] = pair[1]
        stacked[layer] = (downs.to(device), ups.to(device))
    return stacked


def _stack_lora(
    row_lora: Sequence[Mapping[int, Mapping[str, tuple[torch.Tensor, torch.Tensor]]] | None],
    row_offsets: Sequence[Mapping[int, torch.Tensor] | None],
    batch: int,
    hidden: int,
    device: torch.device | str,
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    if len(row_lora) != batch:
        raise PlanError(f"{len(row_lora)} LoRA entries for {batch} rows")
    shapes: dict[tuple[int, str], tuple[int, int]] = {}  # (rank, out)
    for i, terms in enumerate(row_lora):
        if terms:
            try:
                check_terms(row_offsets[i] or {}, {}, hidden_size=hidden, who=f"row {i}", lora=terms)
            except ProfileError as exc:
                raise PlanError(str(exc)) from None
        for layer, projections in (terms or {}).items():
            for name, (a, b) in projections.items():
                rank, out = shapes.get((layer, name), (0, b.shape[0]))
                if b.shape[0] != out:
                    raise PlanError(f"rows' LoRA terms of layer {layer} {name} have different output sizes")
                shapes[(layer, name)] = (max(rank, a.shape[0]), out)
    stacked: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, name), (rank, out) in sorted(shapes.items()):
        a_stack = torch.zeros(batch, rank, hidden, dtype=torch.float32)
        b_stack = torch.zeros(batch, out, rank, dtype=torch.float32)
        for i, terms in enumerate(row_lora):
            pair = ((terms or {}).get(layer) or {}).get(name)
            if pair is not None:
                a_stack[i, : pair[0].shape[0]] = pair[0]
                b_stack[i, :, : pair[1].shape[1]] = pair[1]
        stacked[(layer, name)] = (a_stack.to(device), b_stack.to(device))
    return stacked


def _position_mask(
    modes: Sequence[str],
    positions: torch.Tensor | None,
    prompt_lengths: Sequence[int] | torch.Tensor | None,
    batch: int,
) -> torch.Tensor | None:
    split = sorted({mode for mode in modes if mode != "all"})  # modes that split a row at its prompt length
    if positions is None:
        if not split:
            return None
        raise PlanError(f"rows in {' and '.join(repr(m) for m in split)} mode need token positions")
    if positions.ndim != 2 or positions.shape[0] != batch:
        raise PlanError(f"positions of shape {tuple(positions.shape)} do not fit {batch} rows")
    mask = positions >= 0  # (B, T)
    if split:
        if prompt_lengths is None:
            raise PlanError(f"rows in {' and '.join(repr(m) for m in split)} mode need prompt lengths")
        lengths = torch.as_tensor(prompt_lengths, dtype=torch.long, device=positions.device).view(batch, 1)
        in_prompt = positions < lengths  # (B, T)
        generated_only = torch.tensor([m == "generated" for m in modes], device=positions.device).view(batch, 1)
        prompt_only = torch.tensor([m == "prompt" for m in modes], device=positions.device).view(batch, 1)
        mask = mask & ~(generated_only & in_prompt) & ~(prompt_only & ~in_prompt)
    if bool(mask.all()):
        return None
    return mask
