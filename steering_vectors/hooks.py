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
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import PlanError
from .layers import find_decoder_layers, hidden_size_of
from .profile import POSITION_MODES, Profile

_STEERER_ATTR = "_rahf_steerer"


@dataclass
class SteeringPlan:
    """What one forward pass adds: per layer a (B, 1, H) offset, and where (mask (B, T, 1) or None)."""

    offsets: dict[int, torch.Tensor]
    mask: torch.Tensor | None = None  # 1.0 where steering applies, 0.0 elsewhere; None = everywhere
    low_rank: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # layers in offsets

    @property
    def batch_size(self) -> int:
        return next(iter(self.offsets.values())).shape[0] if self.offsets else 0


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

    @classmethod
    def attach(cls, model: nn.Module) -> Steerer:
        """Return the model's steerer, installing the hooks on first use."""
        steerer = getattr(model, _STEERER_ATTR, None)
        if steerer is None or not steerer._handles:
            steerer = cls(model)
            setattr(model, _STEERER_ATTR, steerer)
        return steerer

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def plan(self) -> SteeringPlan | None:
        return getattr(self._local, "plan", None)

    @plan.setter
    def plan(self, plan: SteeringPlan | None) -> None:
        if plan is not None:
            bad = [layer for layer in plan.offsets if not 0 <= layer < self.num_layers]
            if bad:
                raise PlanError(f"plan steers layers {bad}; the model has layers 0..{self.num_layers - 1}")
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
            if plan is None:
                return None
            offset = plan.offsets.get(index)
            if offset is None:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            if offset.shape[0] != hidden.shape[0]:
                raise PlanError(f"plan has {offset.shape[0]} rows, layer {index} output has {hidden.shape[0]}")
            factors = plan.low_rank.get(index)
            if factors is not None:
                offset = offset + low_rank_delta(hidden, *factors).to(offset.dtype)  # (B, T, H)
            delta = offset if plan.mask is None else offset * plan.mask  # (B, 1, H) or (B, T, H)
            hidden = hidden + delta.to(hidden.dtype)
            if isinstance(output, tuple):
                return (hidden, *output[1:])
            return hidden

        return hook


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
) -> SteeringPlan | None:
    """Stack per-row offsets into a plan for one forward pass, or None when no row is steered.

    row_offsets: per row, layer -> (H,) offset (see `combine_offsets`), or None for an unsteered row.
    row_low_rank: per row, layer -> (down (R, H), up (H, R)) (see `combine_low_rank`) or None; each layer
        must also have an offset in that row. The plan pads the ranks to the largest with zeros.
    modes: per row, "all" (every real token) or "generated" (only positions >= that row's prompt length).
    positions: (B, T) position of each input token in its row's sequence, -1 for padding; None means
        the input has no padding and starts at position 0 of every row.
    prompt_lengths: per row, the number of prompt tokens; needed for rows in "generated" mode.
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

    mask = _position_mask(modes, positions, prompt_lengths, batch)
    if mask is not None:
        mask = mask.to(device=device, dtype=dtype).unsqueeze(-1)  # (B, T, 1)
    return SteeringPlan(offsets=offsets, mask=mask, low_rank=low_rank)


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
        for layer, (down, _) in (terms or {}).items():
            if layer not in (row_offsets[i] or {}):
                raise PlanError(f"row {i} has a low-rank term at layer {layer} but no offset there")
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


def _position_mask(
    modes: Sequence[str],
    positions: torch.Tensor | None,
    prompt_lengths: Sequence[int] | torch.Tensor | None,
    batch: int,
) -> torch.Tensor | None:
    needs_prompt = any(mode == "generated" for mode in modes)
    if positions is None:
        if not needs_prompt:
            return None
        raise PlanError("rows in 'generated' mode need token positions")
    if positions.ndim != 2 or positions.shape[0] != batch:
        raise PlanError(f"positions of shape {tuple(positions.shape)} do not fit {batch} rows")
    mask = positions >= 0
    if needs_prompt:
        if prompt_lengths is None:
            raise PlanError("rows in 'generated' mode need prompt lengths")
        lengths = torch.as_tensor(prompt_lengths, dtype=torch.long, device=positions.device).view(batch, 1)
        generated_only = torch.tensor([m == "generated" for m in modes], device=positions.device).view(batch, 1)
        mask = mask & (~generated_only | (positions >= lengths))
    if bool(mask.all()):
        return None
    return mask
