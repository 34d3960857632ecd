"""Profiles from a few contrastive examples, with forward passes only (CAA, PCA or difference of means).

Knows three shapes of examples, how each becomes token ids and which tokens' hidden states it reads, the
limits that keep a fit small, the closed-form fits and the profile's provenance. Knows nothing about HTTP
or engines: a caller that must interleave the forward passes with other work (the server runs them
between engine steps) calls `encode_examples`, runs `read_batch` on each of `batches(...)` where it likes,
and hands the states to `offsets_from_states`; `fit_profile` does all of it in one call.

Shapes (every example is a pair: a positive side and a negative side):

- ``pairs``: two texts, ``{"positive": ..., "negative": ...}``; read: the mean state over every token of
  the text (no chat template).
- ``replies``: a prompt with a positive and a negative reply, ``{"prompt", "positive", "negative"}``; the
  chat template renders the prompt as a user turn followed by the reply; read: the mean state over the
  reply's tokens.
- ``instructions``: two instructions (``"answer cheerfully"`` / ``"answer gloomily"``) applied, as the
  system message, to each of a list of prompts; read: the state at the last token of the rendered prompt
  (where the assistant's reply would start), as repeng does.

Methods, per layer ``l`` (states are the outputs of decoder layer ``l``, the layer an offset at ``l`` is
added to):

- ``caa``: the mean over pairs of (positive state - negative state) (`fit.caa_offsets`);
- ``pca``: the first principal direction of those differences, signed and scaled by their mean
  projection (`fit.pca_offsets`; needs at least two pairs);
- ``mean``: the mean over every read token of the positive sides minus that of the negative sides
  (weighted by tokens, not by pairs; equal to ``caa`` when every side reads one token).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..core.errors import SteeringError
from ..core.layers import find_decoder_layers
from ..core.profile import ModelFingerprint, Profile, validate_name
from .data import Encoded, collate, encode_prompt

Method = Literal["caa", "pca", "mean"]
METHODS: tuple[str, ...] = ("caa", "pca", "mean")
SHAPES: tuple[str, ...] = ("pairs", "replies", "instructions")


class FitInputError(SteeringError):
    """The examples or the fit's settings are not acceptable; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class FitLimits:
    """What one fit may take: pairs, tokens of one side (template included) and tokens in all."""

    max_pairs: int = 64
    max_side_tokens: int = 512
    max_total_tokens: int = 32768
    batch_tokens: int = 256  # tokens per forward pass (padding included); one batch is one unit of work


DEFAULT_LIMITS = FitLimits()


@dataclass(frozen=True)
class Examples:
    """Contrastive examples in one of the three shapes (see the module docstring)."""

    shape: str
    pairs: tuple[tuple[str, str], ...] = ()  # (positive, negative) texts or replies
    prompts: tuple[str, ...] = ()  # the replies' prompts (shape replies) or the prompts (shape instructions)
    instructions: tuple[str, str] | None = None  # (positive, negative), shape instructions

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, str]]) -> Examples:
        return cls("pairs", pairs=tuple((p, n) for p, n in pairs))

    @classmethod
    def from_replies(cls, items: Sequence[tuple[str, str, str]]) -> Examples:
        """(prompt, positive reply, negative reply) triples."""
        return cls("replies", pairs=tuple((p, n) for _, p, n in items), prompts=tuple(q for q, _, _ in items))

    @classmethod
    def from_instructions(cls, positive: str, negative: str, prompts: Sequence[str]) -> Examples:
        return cls("instructions", prompts=tuple(prompts), instructions=(positive, negative))

    def __len__(self) -> int:
        return len(self.prompts) if self.shape == "instructions" else len(self.pairs)

    def canonical(self) -> dict[str, Any]:
        """The examples as plain JSON (what the digest is taken of)."""
        if self.shape == "pairs":
            return {"shape": "pairs", "examples": [{"positive": p, "negative": n} for p, n in self.pairs]}
        if self.shape == "replies":
            items = zip(self.prompts, self.pairs, strict=True)
            examples = [{"prompt": q, "positive": p, "negative": n} for q, (p, n) in items]
            return {"shape": "replies", "examples": examples}
        assert self.instructions is not None
        return {"shape": "instructions", "instructions": {"positive": self.instructions[0],
                                                          "negative": self.instructions[1]},
                "prompts": list(self.prompts)}

    def digest(self) -> str:
        """sha256 of the canonical JSON (sorted keys, no spaces, UTF-8)."""
        text = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Side:
    """One side of one pair, tokenised: read the states of `input_ids[read_from:]` (mean over them)."""

    pair: int
    label: int  # 1 positive, 0 negative
    input_ids: tuple[int, ...]
    read_from: int


def default_layers(num_layers: int) -> list[int]:
    """A middle band: from 30 % to 50 % of the depth, every `max(1, num_layers // 10)` layers
    (9, 12, 15 for a 30-layer model; 1, 2 for a 4-layer one)."""
    if num_layers < 1:
        raise FitInputError("the model has no decoder layers", "layers")
    low = min(num_layers - 1, max(0, round(0.3 * num_layers)))
    high = min(num_layers - 1, max(low, round(0.5 * num_layers)))
    return list(range(low, high + 1, max(1, num_layers // 10)))


def check_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    """The sorted distinct layers, or the default band; each must be in 0..num_layers-1."""
    if layers is None:
        return default_layers(num_layers)
    if not layers:
        raise FitInputError("layers: give at least one layer, or leave it out for the default band", "layers")
    chosen = sorted(set(int(layer) for layer in layers))
    bad = [layer for layer in chosen if not 0 <= layer < num_layers]
    if bad:
        raise FitInputError(
            f"layers: {bad} outside this model's layers 0..{num_layers - 1}", "layers")
    return chosen


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_examples(tokenizer: Any, examples: Examples, limits: FitLimits = DEFAULT_LIMITS) -> list[Side]:
    """Token ids and read positions of every side, checked against `limits` (FitInputError naming the
    field otherwise)."""
    if examples.shape not in SHAPES:
        raise FitInputError(f"unknown shape {examples.shape!r}; one of {', '.join(SHAPES)}", "examples")
    count = len(examples)
    field = "prompts" if examples.shape == "instructions" else "examples"
    if count < 1:
        raise FitInputError(f"{field}: give at least one example", field)
    if count > limits.max_pairs:
        raise FitInputError(f"{field}: {count} examples; at most {limits.max_pairs}", field)
    sides: list[Side] = []
    for i in range(count):
        for label in (1, 0):
            key = "positive" if label else "negative"
            if examples.shape == "pairs":
                param = f"examples[{i}].{key}"
                ids = _ids(tokenizer, examples.pairs[i][1 - label])
                read_from = 0
            elif examples.shape == "replies":
                param = f"examples[{i}].{key}"
                prompt = encode_prompt(tokenizer, [{"role": "user", "content": examples.prompts[i]}], budget=1 << 30)
                reply = _ids(tokenizer, examples.pairs[i][1 - label])
                if not reply:
                    raise FitInputError(f"{param}: the reply encodes to no tokens", param)
                ids, read_from = prompt + reply, len(prompt)
            else:
                assert examples.instructions is not None
                param = f"prompts[{i}]"
                ids = encode_prompt(tokenizer, [{"role": "user", "content": examples.prompts[i]}],
                                    system=examples.instructions[1 - label], budget=1 << 30)
                read_from = len(ids) - 1
            if not ids or read_from >= len(ids):
                raise FitInputError(f"{param}: the text encodes to no tokens", param)
            if len(ids) > limits.max_side_tokens:
                raise FitInputError(
                    f"{param}: {len(ids)} tokens (with the chat template); at most {limits.max_side_tokens}", param)
            sides.append(Side(i, label, tuple(ids), read_from))
    total = sum(len(side.input_ids) for side in sides)
    if total > limits.max_total_tokens:
        raise FitInputError(
            f"{field}: {total} tokens in all (both sides, chat template included); at most {limits.max_total_tokens}",
            field)
    return sides


def batches(sides: Sequence[Side], batch_tokens: int = DEFAULT_LIMITS.batch_tokens) -> list[list[Side]]:
    """Sides grouped in order into right-padded batches of at most `batch_tokens` tokens (rows x longest);
    a side longer than that is a batch of its own."""
    out: list[list[Side]] = []
    current: list[Side] = []
    for side in sides:
        width = max([len(s.input_ids) for s in current] + [len(side.input_ids)])
        if current and width * (len(current) + 1) > batch_tokens:
            out.append(current)
            current = []
        current.append(side)
    if current:
        out.append(current)
    return out


@dataclass
class SideStates:
    """Summed float64 states (L, H) over a side's read tokens, and how many tokens that is."""

    side: Side
    sums: torch.Tensor
    count: int


def read_batch(model: nn.Module, batch: Sequence[Side], layers: Sequence[int], pad_id: int) -> list[SideStates]:
    """One forward pass (no cache, stopped after the deepest of `layers`; the calling thread has no steering
    plan) over `batch`; returns each side's summed states at `layers` over its read tokens."""
    from .collect import forward_recorded, record_layers

    encoded = collate([Encoded(side.input_ids, side.read_from) for side in batch], pad_id)
    with torch.no_grad(), record_layers(model, layers, stop=True) as recorded:
        forward_recorded(model, encoded)
    stacked = torch.stack([recorded[layer].to("cpu", torch.float64) for layer in layers], dim=1)  # (B, L, T, H)
    read = encoded.response_mask.bool()  # the tokens from each side's `read_from` on
    out = []
    for row, side in enumerate(batch):
        keep = read[row]
        out.append(SideStates(side, stacked[row][:, keep].sum(dim=1), int(keep.sum())))
    return out


def offsets_from_states(states: Sequence[SideStates], layers: Sequence[int], method: str) -> dict[int, torch.Tensor]:
    """The per-layer offsets of `method` from every side's states (any order)."""
    from .collect import PatternRecord
    from .fit import caa_offsets, pca_offsets

    if method not in METHODS:
        raise FitInputError(f"method: {method!r} is not one of {', '.join(METHODS)}", "method")
    if method == "mean":
        totals = {1: torch.zeros_like(states[0].sums), 0: torch.zeros_like(states[0].sums)}
        counts = {1: 0, 0: 0}
        for s in states:
            totals[s.side.label] += s.sums
            counts[s.side.label] += s.count
        diff = totals[1] / counts[1] - totals[0] / counts[0]  # (L, H)
        return {layer: diff[i].float() for i, layer in enumerate(layers)}
    pairs = {s.side.pair for s in states}
    if method == "pca" and len(pairs) < 2:
        raise FitInputError("method pca needs at least two examples (it finds a direction among their differences)",
                            "method")
    hidden = states[0].sums.shape[-1]
    empty = torch.empty(len(layers), 0, hidden)
    records = [PatternRecord(input_ids=s.side.input_ids, prompt_len=s.side.read_from, label=s.side.label,
                             pair_index=s.side.pair, anchor=empty, pattern=empty, base_mean=s.sums / s.count)
               for s in states]
    fit = caa_offsets if method == "caa" else pca_offsets
    return fit(records, layers)


def make_quick_profile(
    name: str,
    offsets: dict[int, torch.Tensor],
    *,
    examples: Examples,
    method: str,
    fingerprint: ModelFingerprint | None,
    default_strength: float = 1.0,
    position_mode: str = "all",
    description: str = "",
    tokens: int | None = None,
    seconds: float | None = None,
) -> Profile:
    """The profile with its provenance: method, the examples' shape, count and sha256, layers."""
    layers = sorted(offsets)
    return Profile(
        name=validate_name(name),
        offsets=offsets,
        description=description or f"{method} profile from {len(examples)} contrastive examples ({examples.shape})",
        fingerprint=fingerprint,
        default_strength=default_strength,
        position_mode=position_mode,
        method=f"quickfit/{method}",
        provenance={
            "fit": method,
            "examples": {"shape": examples.shape, "count": len(examples), "sha256": examples.digest(),
                         "tokens": tokens},
            "layers": layers,
            "fit_seconds": None if seconds is None else round(seconds, 3),
            "created_unix": int(time.time()),
        },
    )


def pad_token_id(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return int(pad) if pad is not None else 0


def fit_profile(
    model: nn.Module,
    tokenizer: Any,
    examples: Examples,
    *,
    name: str,
    method: str = "caa",
    layers: Sequence[int] | None = None,
    default_strength: float = 1.0,
    position_mode: str = "all",
    description: str = "",
    fingerprint: ModelFingerprint | None = None,
    limits: FitLimits = DEFAULT_LIMITS,
    run: Callable[[Callable[[], list[SideStates]]], list[SideStates]] = lambda work: work(),
) -> Profile:
    """Fit a profile from `examples` in one call. `run` executes each batch's forward pass (default: at once)."""
    started = time.perf_counter()
    num_layers = len(find_decoder_layers(model))
    chosen = check_layers(layers, num_layers)
    if method not in METHODS:
        raise FitInputError(f"method: {method!r} is not one of {', '.join(METHODS)}", "method")
    validate_name(name)
    sides = encode_examples(tokenizer, examples, limits)
    pad = pad_token_id(tokenizer)
    states: list[SideStates] = []
    for batch in batches(sides, limits.batch_tokens):
        states.extend(run(lambda batch=batch: read_batch(model, batch, chosen, pad)))
    offsets = offsets_from_states(states, chosen, method)
    return make_quick_profile(
        name, offsets, examples=examples, method=method, fingerprint=fingerprint, default_strength=default_strength,
        position_mode=position_mode, description=description, tokens=sum(len(s.input_ids) for s in sides),
        seconds=time.perf_counter() - started,
    )
