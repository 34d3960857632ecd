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

A side longer than `FitLimits.max_side_tokens` (chat template included) is truncated, never refused, so
that what the fit reads stays what the shape means (`encode_examples`; the sides report it and the
profile's provenance records it):

- ``pairs``: the text's first ``max_side_tokens`` tokens;
- ``replies``: the reply's first tokens and the prompt's last ones. The reply keeps what the rendered
  prompt leaves, but at least half the budget; the prompt's text then loses tokens at its start until the
  rendered prompt fits the rest. The chat template stays whole (its assistant header right before the
  reply included), and both sides keep the same prompt, so the pair still differs only in its replies;
- ``instructions``: the prompt's text loses tokens at its end until both sides fit (the same prompt on
  both sides: the instructions stay the only difference); an instruction that does not fit even with an
  empty prompt loses tokens at its end too, and the prompt is then empty.

The texts that are read (a text of a pair, a reply) lose tokens: the read tokens are exactly the text's
first ones. The texts that the chat template wraps (a prompt, an instruction) lose characters at token
boundaries: what stays is a prefix or suffix of the original characters (never a decode of tokens),
rendered and measured again, so the template stays whole and the side is that of the shortened text.

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
    """What one fit may take: pairs, and tokens of one side (template included; a longer side is truncated).
    The tokens in all are at most ``2 * max_pairs * max_side_tokens`` (65536 by default)."""

    max_pairs: int = 64
    max_side_tokens: int = 512
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
    untruncated: int | None = None  # the side's tokens before truncation; None: not truncated


def truncations(sides: Sequence[Side]) -> list[dict[str, Any]]:
    """The truncated sides as JSON: ``{"example", "side", "tokens_before", "tokens_after"}`` each, in order."""
    return [{"example": s.pair, "side": "positive" if s.label else "negative", "tokens_before": s.untruncated,
             "tokens_after": len(s.input_ids)} for s in sides if s.untruncated is not None]


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


def silent_characters(tokenizer: Any, below: int = 0x10000) -> str:
    """The characters under `below` (default: the Basic Multilingual Plane) that `tokenizer` encodes, alone, to
    no tokens: control characters missing from a byte-level vocabulary (6 for the default model's), or what
    a normaliser removes. With a byte-level or a character tokenizer a text encodes to no tokens exactly when
    it is made of these; `encode_examples` refuses such a pair text or reply (nothing to read)."""
    chars = [chr(c) for c in range(below) if not 0xD800 <= c < 0xE000]
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # the Rust tokenizer in one batch: a fraction of a second for the whole plane
        encoded = [item.ids for item in backend.encode_batch(chars, add_special_tokens=False)]
    else:
        encoded = tokenizer(chars, add_special_tokens=False)["input_ids"]
    return "".join(char for char, ids in zip(chars, encoded, strict=True) if not ids)


def _chat(tokenizer: Any, prompt: str, system: str | None = None) -> list[int]:
    return encode_prompt(tokenizer, [{"role": "user", "content": prompt}], system=system, budget=1 << 30)


def _drop_tokens(tokenizer: Any, text: str, drop: int, *, from_end: bool) -> str:
    """`text` without the characters of its last `drop` tokens (its first, `from_end`: the end is kept): a
    prefix (suffix) of `text`, shorter by one character at least."""
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, spans = encoded["input_ids"], encoded["offset_mapping"]
    except NotImplementedError:  # a tokenizer without offsets: the same share of the characters
        ids = _ids(tokenizer, text)
        spans = None
    count = len(ids) - drop  # the tokens kept
    if count <= 0:
        return ""
    if spans is None:
        chars = len(text) * count // len(ids)
    else:
        chars = len(text) - spans[len(ids) - count][0] if from_end else spans[count - 1][1]
    chars = min(chars, len(text) - 1)  # a token may span no character: cut one at least
    return text[len(text) - chars:] if from_end else text[:chars]


def _shorten(tokenizer: Any, text: str, measure: Callable[[str], int], budget: int, *, from_end: bool) -> str:
    """`text` cut by whole tokens (its end kept with `from_end`, else its start) until `measure(text)`, the
    tokens of the side it goes into, is at most `budget` ("" when even that is too long): the excess comes
    off `text`'s own tokens, again while the side, re-encoded, still overflows."""
    length = measure(text)
    while length > budget and text:
        text = _drop_tokens(tokenizer, text, length - budget, from_end=from_end)
        length = measure(text)
    return text


# what each shape's encoder gives per side: (ids, read_from, the side's tokens before truncation or None)
Encoding = tuple[list[int], int, int | None]


def _pair_sides(tokenizer: Any, texts: tuple[str, str], budget: int) -> list[Encoding]:
    """The positive and the negative text, each its first `budget` tokens."""
    out: list[Encoding] = []
    for text in texts:
        ids = _ids(tokenizer, text)
        out.append((ids[:budget], 0, len(ids) if len(ids) > budget else None))
    return out


def _reply_sides(tokenizer: Any, prompt: str, replies: tuple[str, str], budget: int, param: str
                 ) -> list[Encoding]:
    """The rendered prompt (the same on both sides) followed by each reply; see the module docstring."""
    head = _chat(tokenizer, prompt)
    tails = [_ids(tokenizer, reply) for reply in replies]
    longest = max(len(tail) for tail in tails)
    if len(head) + longest <= budget:
        return [(head + tail, len(head), None) for tail in tails]
    cap = max(budget - len(head), budget // 2)  # the reply keeps what the prompt leaves, half the budget at least
    kept = [tail[:cap] for tail in tails]
    room = budget - max(len(tail) for tail in kept)
    short = _shorten(tokenizer, prompt, lambda text: len(_chat(tokenizer, text)), room, from_end=True)
    cut = _chat(tokenizer, short)
    if len(cut) > room:
        raise FitInputError(f"{param}: the chat template alone takes {len(cut)} tokens; the replies need at least "
                            f"{budget - room} of the {budget} a side may have", param)
    return [(cut + tail, len(cut), None if cut == head and tail == full else len(head) + len(full))
            for tail, full in zip(kept, tails, strict=True)]


def _fitted_instructions(tokenizer: Any, instructions: tuple[str, str], budget: int) -> tuple[str, str]:
    """Each instruction, cut (its start kept) where it does not fit a side even with an empty prompt."""
    out = []
    for instruction in instructions:
        short = _shorten(tokenizer, instruction, lambda text: len(_chat(tokenizer, "", text)), budget, from_end=False)
        alone = len(_chat(tokenizer, "", short))
        if alone > budget:
            raise FitInputError(f"instructions: the chat template alone takes {alone} tokens; a side may have "
                                f"{budget}", "instructions")
        out.append(short)
    return out[0], out[1]


def _instruction_sides(tokenizer: Any, prompt: str, instructions: tuple[str, str], fitted: tuple[str, str],
                       budget: int) -> list[Encoding]:
    """The prompt under each instruction (the system message); see the module docstring."""
    full = [_chat(tokenizer, prompt, instruction) for instruction in instructions]
    if max(len(ids) for ids in full) <= budget:
        return [(ids, len(ids) - 1, None) for ids in full]
    if fitted == instructions:
        def longest(text: str) -> int:
            return max(len(_chat(tokenizer, text, instruction)) for instruction in instructions)

        prompt = _shorten(tokenizer, prompt, longest, budget, from_end=False)
    else:  # an instruction alone fills the side: it keeps what it can, the prompt nothing
        prompt = ""
    sides = [_chat(tokenizer, prompt, instruction) for instruction in fitted]
    return [(ids, len(ids) - 1, None if ids == before else len(before))
            for ids, before in zip(sides, full, strict=True)]


def encode_examples(tokenizer: Any, examples: Examples, limits: FitLimits = DEFAULT_LIMITS) -> list[Side]:
    """Token ids and read positions of every side, a side over `limits.max_side_tokens` truncated (see the
    module docstring; `Side.untruncated` says which); FitInputError naming the field for too many or no
    examples, or a text that encodes to no tokens."""
    if examples.shape not in SHAPES:
        raise FitInputError(f"unknown shape {examples.shape!r}; one of {', '.join(SHAPES)}", "examples")
    count = len(examples)
    field = "prompts" if examples.shape == "instructions" else "examples"
    if count < 1:
        raise FitInputError(f"{field}: give at least one example", field)
    if count > limits.max_pairs:
        raise FitInputError(f"{field}: {count} examples; at most {limits.max_pairs}", field)
    budget = limits.max_side_tokens
    fitted = None
    if examples.shape == "instructions":
        assert examples.instructions is not None
        fitted = _fitted_instructions(tokenizer, examples.instructions, budget)
    sides: list[Side] = []
    for i in range(count):
        if examples.shape == "pairs":
            params = [f"examples[{i}].positive", f"examples[{i}].negative"]
            encoded = _pair_sides(tokenizer, examples.pairs[i], budget)
        elif examples.shape == "replies":
            params = [f"examples[{i}].positive", f"examples[{i}].negative"]
            encoded = _reply_sides(tokenizer, examples.prompts[i], examples.pairs[i], budget, f"examples[{i}].prompt")
        else:
            assert examples.instructions is not None and fitted is not None
            params = [f"prompts[{i}]"] * 2
            encoded = _instruction_sides(tokenizer, examples.prompts[i], examples.instructions, fitted, budget)
        for label, param, (ids, read_from, before) in zip((1, 0), params, encoded, strict=True):
            if read_from >= len(ids):  # a tokenizer that maps some non-empty text to nothing
                raise FitInputError(f"{param}: the text encodes to no tokens", param)
            sides.append(Side(i, label, tuple(ids), read_from, before))
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
    truncated: Sequence[dict[str, Any]] = (),
) -> Profile:
    """The profile with its provenance: method, the examples' shape, count, sha256, tokens and truncated
    sides (`truncations`), layers."""
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
                         "tokens": tokens, "truncated": [dict(entry) for entry in truncated]},
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
        seconds=time.perf_counter() - started, truncated=truncations(sides),
    )
