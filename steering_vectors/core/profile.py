"""Preference profiles: per-layer offsets plus metadata, stored as safetensors.

Knows the file format, its metadata and validation against a model's fingerprint. Knows nothing about
hooks (see `hooks`), models (see `models`, which computes fingerprints) or HTTP.

File layout (format version 1, or 2 when the profile has low-rank terms):
- tensors ``offset.<layer>``: float32, shape ``(hidden_size,)``, one per steered decoder layer; layer
  indices are 0-based positions in the model's decoder stack, and an offset at layer ``l`` is added to
  that layer's output (``output_hidden_states[l + 1]`` in transformers terms).
- version 2 only, optional per steered layer: ``down.<layer>`` ``(rank, hidden_size)`` and ``up.<layer>``
  ``(hidden_size, rank)``, an input-dependent term: the layer's output ``h`` becomes
  ``h + s * (offset + up @ down @ (h / rms(h)))`` at strength ``s`` (see `hooks.low_rank_delta`).
  Version-1 files have constant offsets only, and this library writes version 1 for those, so older
  readers keep reading them.
- version 3 only, optional per steered layer and attention projection ``<proj>`` (``q_proj``, ``k_proj``
  or ``v_proj``): ``lora_a.<layer>.<proj>`` ``(rank, hidden_size)`` and ``lora_b.<layer>.<proj>``
  ``(out_features, rank)``, a LoRA term of that projection: its output ``y = W x`` becomes
  ``y + s * lora_b @ lora_a @ x`` at strength ``s`` (the adapter's scaling folded into ``lora_b``; see
  `hooks.lora_delta`). A layer with a LoRA term has an offset too (zero for a LoRA term alone). The
  projection's output size is checked against the loaded model (`ModelFingerprint.projections`).
  This library writes version 3 only for profiles with LoRA terms.
- version 4 only, optional, one per profile: ``condition.<layer>`` ``(hidden_size,)``, the direction of a probe
  on the prompt, and the metadata key ``condition`` (JSON: ``threshold``, ``comparison`` ``>`` or ``<``,
  ``reads`` ``mean`` or ``last``, ``score`` ``cosine`` or ``linear``): the profile acts on a request only when
  the cosine similarity (or dot product) between that direction and the prompt's state after decoder layer
  ``<layer>`` (the mean over the prompt's tokens, or the last prompt token's) compares so with the threshold
  (see `Condition`). Older readers refuse
  version 4 rather than serve such a profile unconditionally.
- version 5 only, optional: the metadata key ``decoding`` (JSON: field -> number, the fields of
  `DECODING_FIELDS`, today ``repetition_penalty``): sampling defaults for the rows the profile steers, where the
  request sets none (a profile whose steering makes the model loop carries the penalty that stops it). Older
  readers refuse version 5 rather than serve such a profile without them.
- metadata (safetensors' string map): ``format`` = ``rahf-profile``, ``format_version``, ``name``,
  ``description``, ``fingerprint`` (JSON), ``default_strength``, ``position_mode``, ``method``,
  ``provenance`` (JSON), ``created``. The provenance is free-form but for one checked section,
  ``generation`` (optional, any version: older readers keep it as text): the profile's replies judged against
  the unsteered model's (`generation_record`); a malformed one makes the file unreadable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import struct
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import (
    ProfileFormatError,
    ProfileLayerError,
    ProfileMismatchError,
    ProfileShapeError,
    ProfileValueError,
)
from .generation_record import GenerationRecord

FORMAT_NAME = "rahf-profile"
# the newest version this library reads; it writes 1 unless a profile has low-rank (2) or LoRA (3) terms, a
# condition (4) or decoding defaults (5: an older reader refuses such a file rather than serve it without them)
FORMAT_VERSION = 5
# decoding defaults a profile may carry (`Profile.decoding`): the field, its allowed range, and how the values
# of several profiles acting on one row combine. A request's own value always wins; a profile's applies only on
# the rows it steers (strength not 0; a conditional profile once its condition fires).
# repetition_penalty: over prompt and output tokens (positive logits / it, negative ones * it), as vLLM's; the
# largest of the acting profiles' values.
DECODING_FIELDS: dict[str, tuple[float, float]] = {"repetition_penalty": (1.0, 10.0)}
# which tokens a profile steers: "all" every real token, "generated" positions at or past the row's prompt
# length, "prompt" positions before it (generated tokens see the steering only through the prompt's K/V)
PositionMode = Literal["all", "generated", "prompt"]
POSITION_MODES: tuple[str, ...] = ("all", "generated", "prompt")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_TENSOR_KEY = re.compile(r"^(offset|down|up)\.(\d+)$")
_LORA_KEY = re.compile(r"^(lora_a|lora_b)\.(\d+)\.([a-z_]+)$")
_CONDITION_KEY = re.compile(r"^condition\.(\d+)$")
CONDITION_COMPARISONS = (">", "<")
CONDITION_READS = ("mean", "last")
CONDITION_SCORES = ("cosine", "linear")
LORA_PROJECTIONS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # attention projections fed the normed layer input
LoraTerms = dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # layer -> projection -> (a (R, H), b (out, R))


@dataclass(frozen=True)
class ModelFingerprint:
    """What identifies the model a profile was made for."""

    architecture: str
    hidden_size: int
    num_layers: int
    digest: str = ""  # sha256 over sampled weights and the tokenizer; "" when unknown
    # (name, output features) of the attention projections LoRA terms may steer; () when unknown. Not part
    # of a fingerprint's identity (the digest is): two fingerprints that differ only here are equal.
    projections: tuple[tuple[str, int], ...] = field(default=(), compare=False)

    def identity(self) -> dict[str, Any]:
        """The fields that identify the model (all but `projections`), e.g. for cache keys."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        if not self.projections:
            data.pop("projections")
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelFingerprint:
        data = json.loads(text)
        return cls(
            architecture=str(data["architecture"]),
            hidden_size=int(data["hidden_size"]),
            num_layers=int(data["num_layers"]),
            digest=str(data.get("digest", "")),
            projections=tuple((str(name), int(size)) for name, size in data.get("projections") or ()),
        )


def _json_ready(value: Any) -> Any:
    """`value` with every non-finite float replaced by None, so that strict JSON encoders accept it."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def low_rank_term_rank(down: torch.Tensor, up: torch.Tensor, hidden: int) -> int:
    """The rank R of a low-rank term ``(down (R, hidden), up (hidden, R))``; 0 when the shapes do not fit."""
    rank = down.shape[0] if down.ndim == 2 else 0
    return rank if rank >= 1 and tuple(down.shape) == (rank, hidden) and tuple(up.shape) == (hidden, rank) else 0


def check_terms(
    offsets: Mapping[int, torch.Tensor],
    low_rank: Mapping[int, tuple[torch.Tensor, torch.Tensor]],
    *,
    hidden_size: int,
    num_layers: int | None = None,
    who: str,
    hint: str = "",
    lora: Mapping[int, Mapping[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
    projections: Mapping[str, int] | None = None,
) -> None:
    """The rules steering terms must follow to steer a model of `hidden_size` and `num_layers` decoder
    layers (None: any count): offsets of shape (hidden_size,) at layers 0..num_layers-1, low-rank terms
    ``(down (R, hidden), up (hidden, R))`` only where there is an offset. Profiles (their own offsets,
    and against a model's fingerprint), `hooks.RowSteering` (a request's combination, against the
    loaded model) and the low-rank rows of `hooks.build_plan` are checked here and nowhere else.
    Raises `ProfileShapeError` (size), `ProfileLayerError` (layer index) or `ProfileFormatError`
    (low-rank term); `hint` ends the first two. LoRA terms (layer -> projection -> ``(a (R, hidden),
    b (out, R))``) follow the same layer rule, name one of `LORA_PROJECTIONS`, and, where `projections`
    (name -> output features of the model's projection) is given, have ``out`` equal to it."""
    sizes = sorted({tuple(t.shape) for t in offsets.values()})
    if offsets and sizes != [(hidden_size,)]:
        found = ", ".join("x".join(map(str, size)) or "scalar" for size in sizes)
        raise ProfileShapeError(
            f"{who} has offsets of size {found}, but the loaded model's hidden size is {hidden_size}{hint}"
        )
    if num_layers is not None:
        bad = [layer for layer in offsets if not 0 <= layer < num_layers]
        if bad:
            raise ProfileLayerError(
                f"{who} steers layers {bad}, but the loaded model has layers 0..{num_layers - 1}{hint}"
            )
    for layer, (down, up) in low_rank.items():
        _require_offset(offsets, layer, who, "low-rank")
        if not low_rank_term_rank(down, up, hidden_size):
            raise ProfileFormatError(
                f"{who}: the low-rank term of layer {layer} has down {tuple(down.shape)} and up "
                f"{tuple(up.shape)}; expected (rank, {hidden_size}) and ({hidden_size}, rank) with rank >= 1"
            )
    for layer, terms in (lora or {}).items():
        _require_offset(offsets, layer, who, "LoRA")
        for name, (a, b) in terms.items():
            if name not in LORA_PROJECTIONS:
                raise ProfileFormatError(
                    f"{who}: LoRA term on {name!r} at layer {layer}; use one of {LORA_PROJECTIONS}"
                )
            rank = a.shape[0] if a.ndim == 2 else 0
            if not (rank >= 1 and tuple(a.shape) == (rank, hidden_size) and b.ndim == 2 and b.shape[1] == rank):
                raise ProfileFormatError(
                    f"{who}: the LoRA term of layer {layer} {name} has a {tuple(a.shape)} and b {tuple(b.shape)}; "
                    f"expected (rank, {hidden_size}) and (out_features, rank) with rank >= 1"
                )
            if projections is not None:
                expected = projections.get(name)
                if expected is None:
                    raise ProfileShapeError(
                        f"{who} has a LoRA term on {name}, which the loaded model does not have{hint}"
                    )
                if b.shape[0] != expected:
                    raise ProfileShapeError(
                        f"{who}: the LoRA term of layer {layer} {name} outputs {b.shape[0]} features, but the "
                        f"loaded model's {name} outputs {expected}{hint}"
                    )


def _require_offset(offsets: Mapping[int, torch.Tensor], layer: int, who: str, kind: str) -> None:
    """Terms of `kind` sit only at layers with an offset (a zero offset for a term alone)."""
    if layer not in offsets:
        raise ProfileFormatError(
            f"{who}: layer {layer!r} has a {kind} term but no offset (use a zero offset for a {kind} term alone)"
        )


@dataclass(frozen=True, eq=False)
class Condition:
    """A probe on the prompt that decides whether a profile acts on a request.

    `score(state)` compares `direction` with the prompt's state after decoder layer `layer` (`reads`: the mean
    over the prompt's tokens, or the last prompt token's): their cosine similarity (`kind` "cosine", CAST's
    form) or the dot product (`kind` "linear", a linear probe such as a logistic regression's weights, its bias
    folded into the threshold); the condition fires when the score is above `threshold` (`comparison` ">")
    or below it ("<"). The serving engines evaluate it
    from the states the prompt's prefill computes anyway; a profile whose condition fires then steers as its
    position mode says — on the prompt (modes `all` and `prompt`: the prompt is prefilled once more) or from
    the first generated token on (`generated`) (docs/server.md, "Conditional steering")."""

    layer: int
    direction: torch.Tensor
    threshold: float
    comparison: str = ">"
    reads: str = "mean"
    kind: str = "cosine"

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or isinstance(self.layer, bool) or self.layer < 0:
            raise ProfileLayerError(f"condition layer {self.layer!r} is not a non-negative int")
        direction = torch.as_tensor(self.direction).detach().to(torch.float32).reshape(-1).contiguous()
        if direction.numel() == 0 or not bool(torch.isfinite(direction).all()) or float(direction.norm()) == 0.0:
            raise ProfileValueError("the condition's direction must be finite and not zero")
        object.__setattr__(self, "direction", direction)
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) or not math.isfinite(
                self.threshold):
            raise ProfileValueError(f"the condition's threshold {self.threshold!r} is not a finite number")
        object.__setattr__(self, "threshold", float(self.threshold))
        if self.comparison not in CONDITION_COMPARISONS:
            raise ProfileFormatError(f"the condition's comparison {self.comparison!r} is not one of "
                                     f"{CONDITION_COMPARISONS}")
        if self.reads not in CONDITION_READS:
            raise ProfileFormatError(f"the condition reads {self.reads!r}; use one of {CONDITION_READS}")
        if self.kind not in CONDITION_SCORES:
            raise ProfileFormatError(f"the condition's score {self.kind!r} is not one of {CONDITION_SCORES}")

    def score(self, state: torch.Tensor) -> float:
        """The score of `state` (H,): its cosine similarity with the direction, or its dot product."""
        return float(self.scores(state.reshape(1, -1))[0])

    def scores(self, states: torch.Tensor) -> torch.Tensor:
        """`score` of each row of `states` (N, H), float32."""
        states = states.detach().to(torch.float32)
        direction = self.direction.to(states.device)
        if self.kind == "linear":
            return states @ direction
        return torch.nn.functional.cosine_similarity(states, direction.unsqueeze(0), dim=1)

    def fires(self, score: float) -> bool:
        return score > self.threshold if self.comparison == ">" else score < self.threshold

    def metadata(self) -> str:
        return json.dumps({"threshold": self.threshold, "comparison": self.comparison, "reads": self.reads,
                           "score": self.kind}, sort_keys=True)

    def summary(self) -> dict[str, Any]:
        return {"layer": self.layer, "threshold": self.threshold, "comparison": self.comparison, "reads": self.reads,
                "score": self.kind}


def check_decoding(decoding: Any, *, who: str) -> dict[str, float]:
    """`decoding` as a profile keeps it (known fields, finite numbers in range, sorted), or ProfileValueError."""
    if not isinstance(decoding, Mapping):
        raise ProfileFormatError(f"{who}: decoding must be an object of field: value, not {type(decoding).__name__}")
    clean: dict[str, float] = {}
    for key, value in sorted(decoding.items()):
        if key not in DECODING_FIELDS:
            raise ProfileValueError(f"{who}: decoding field {key!r} is not one of {sorted(DECODING_FIELDS)}")
        low, high = DECODING_FIELDS[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= float(value) <= high:
            raise ProfileValueError(f"{who}: decoding {key} must be a number in [{low:g}, {high:g}], not {value!r}")
        clean[key] = float(value)
    return clean


def merged_decoding(entries: Sequence[tuple[Profile, float]]) -> dict[str, float]:
    """The decoding defaults of the profiles that act in `entries` (strength not 0), combined as DECODING_FIELDS
    says: for repetition_penalty, the largest."""
    merged: dict[str, float] = {}
    for profile, strength in entries:
        if strength == 0:
            continue
        for key, value in profile.decoding.items():
            merged[key] = max(merged.get(key, value), value)
    return merged


def validate_name(name: str) -> str:
    """Return `name` if it is a safe profile name (letters, digits, `_ . -`; no path parts)."""
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or ".." in name:
        raise ProfileFormatError(
            f"invalid profile name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass
class Profile:
    """A named set of per-layer offsets and how to apply them.

    `low_rank` (optional) maps some of the offset layers to a ``(down (rank, H), up (H, rank))`` pair
    that adds ``up @ down @ (h / rms(h))``: an offset that depends on the hidden state ``h``.
    """

    name: str
    offsets: dict[int, torch.Tensor]
    description: str = ""
    fingerprint: ModelFingerprint | None = None
    default_strength: float = 1.0
    position_mode: str = "all"
    method: str = "manual"
    provenance: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    format_version: int = 1
    low_rank: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    lora: LoraTerms = field(default_factory=dict)
    condition: Condition | None = None  # a probe on the prompt; the profile acts only when it fires
    decoding: dict[str, float] = field(default_factory=dict)  # sampling defaults where it acts (DECODING_FIELDS)

    def __post_init__(self) -> None:
        validate_name(self.name)
        if self.position_mode not in POSITION_MODES:
            raise ProfileFormatError(
                f"profile {self.name!r}: position_mode {self.position_mode!r} is not one of {POSITION_MODES}"
            )
        if not math.isfinite(self.default_strength):
            raise ProfileValueError(f"profile {self.name!r}: default_strength must be finite")
        if not self.offsets:
            raise ProfileFormatError(f"profile {self.name!r} has no offsets")
        clean: dict[int, torch.Tensor] = {}
        for layer, offset in self.offsets.items():
            if not isinstance(layer, int) or layer < 0:
                raise ProfileLayerError(f"profile {self.name!r}: layer index {layer!r} is not a non-negative int")
            tensor = torch.as_tensor(offset).detach().to(torch.float32).reshape(-1).contiguous()
            if not torch.isfinite(tensor).all():
                raise ProfileValueError(
                    f"profile {self.name!r}: the offset of layer {layer} contains NaN or Inf; "
                    "refit or re-export the profile"
                )
            clean[layer] = tensor
        sizes = sorted({t.numel() for t in clean.values()})
        if len(sizes) != 1:
            raise ProfileShapeError(f"profile {self.name!r}: offsets have different sizes {sizes}")
        self.offsets = dict(sorted(clean.items()))
        self.low_rank = self._clean_low_rank()
        if self.low_rank:
            self.format_version = max(self.format_version, 2)
        self.lora = self._clean_lora()
        if self.lora:
            self.format_version = max(self.format_version, 3)
        if self.condition is not None:
            if not isinstance(self.condition, Condition):
                raise ProfileFormatError(f"profile {self.name!r}: condition is not a Condition")
            if self.condition.direction.numel() != sizes[0]:
                raise ProfileShapeError(
                    f"profile {self.name!r}: the condition's direction has {self.condition.direction.numel()} "
                    f"values, its offsets {sizes[0]}"
                )
            self.format_version = max(self.format_version, 4)
        self.decoding = check_decoding(self.decoding, who=f"profile {self.name!r}")
        if self.decoding:
            self.format_version = max(self.format_version, 5)
        _ = self.generation  # a malformed generation section fails here, as a malformed condition does

    def _clean_lora(self) -> LoraTerms:
        clean: LoraTerms = {}
        for layer, terms in self.lora.items():
            if not isinstance(terms, Mapping) or not terms:
                raise ProfileFormatError(
                    f"profile {self.name!r}: the LoRA terms of layer {layer} are not a projection map"
                )
            clean[layer] = {}
            for name, pair in terms.items():
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    raise ProfileFormatError(
                        f"profile {self.name!r}: the LoRA term of layer {layer} {name} is not (a, b)"
                    )
                a, b = (torch.as_tensor(t).detach().to(torch.float32).contiguous() for t in pair)
                if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                    raise ProfileValueError(
                        f"profile {self.name!r}: the LoRA term of layer {layer} {name} contains NaN or Inf; "
                        "refit the profile"
                    )
                clean[layer][str(name)] = (a, b)
        check_terms(self.offsets, {}, hidden_size=self.hidden_size, who=f"profile {self.name!r}", lora=clean)
        return {layer: dict(sorted(terms.items())) for layer, terms in sorted(clean.items())}

    def _clean_low_rank(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        clean: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer, pair in self.low_rank.items():
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ProfileFormatError(f"profile {self.name!r}: the low-rank term of layer {layer} is not (down, up)")
            down, up = (torch.as_tensor(t).detach().to(torch.float32).contiguous() for t in pair)
            clean[layer] = (down, up)
        check_terms(self.offsets, clean, hidden_size=self.hidden_size, who=f"profile {self.name!r}")
        for layer, (down, up) in clean.items():
            if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
                raise ProfileValueError(
                    f"profile {self.name!r}: the low-rank term of layer {layer} contains NaN or Inf; "
                    "refit the profile"
                )
        return dict(sorted(clean.items()))

    @property
    def layers(self) -> list[int]:
        return list(self.offsets)

    @property
    def hidden_size(self) -> int:
        return next(iter(self.offsets.values())).numel()

    def norms(self) -> dict[int, float]:
        return {layer: float(t.norm()) for layer, t in self.offsets.items()}

    def ranks(self) -> dict[int, int]:
        """layer -> rank of its low-rank term (layers without one are left out)."""
        return {layer: int(down.shape[0]) for layer, (down, _) in self.low_rank.items()}

    def lora_ranks(self) -> dict[int, dict[str, int]]:
        """layer -> projection -> rank of its LoRA term (layers without one are left out)."""
        return {layer: {name: int(a.shape[0]) for name, (a, _) in terms.items()} for layer, terms in self.lora.items()}

    @property
    def generation(self) -> GenerationRecord | None:
        """The checked generation section of the provenance (None when there is none)."""
        section = self.provenance.get("generation") if isinstance(self.provenance, dict) else None
        return None if section is None else GenerationRecord.from_json(section)

    def with_generation(self, record: GenerationRecord) -> Profile:
        """A copy with `record` as its generation section (replacing any); the same tensors, so the same
        steering, under a new file digest."""
        return dataclasses.replace(
            self, provenance={**self.provenance, "generation": record.to_json()}, offsets=dict(self.offsets),
            low_rank=dict(self.low_rank), lora=dict(self.lora),
        )

    def renamed(self, name: str) -> Profile:
        return dataclasses.replace(
            self, name=name, offsets=dict(self.offsets), low_rank=dict(self.low_rank), lora=dict(self.lora)
        )

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT_NAME,
            "format_version": str(self.format_version),
            "name": self.name,
            "description": self.description,
            "fingerprint": self.fingerprint.to_json() if self.fingerprint else "",
            "default_strength": repr(float(self.default_strength)),
            "position_mode": self.position_mode,
            "method": self.method,
            "provenance": json.dumps(self.provenance, sort_keys=True, default=str),
            "created": repr(float(self.created)),
            **({"condition": self.condition.metadata()} if self.condition is not None else {}),
            **({"decoding": json.dumps(self.decoding, sort_keys=True)} if self.decoding else {}),
        }

    def summary(self) -> dict[str, Any]:
        """JSON-ready description (no tensors): strict JSON, non-finite numbers (e.g. NaN accuracies of
        strengths the calibration skipped, in the provenance) as None."""
        return _json_ready({
            "name": self.name,
            "description": self.description,
            "layers": self.layers,
            "hidden_size": self.hidden_size,
            "default_strength": self.default_strength,
            "position_mode": self.position_mode,
            "method": self.method,
            "provenance": self.provenance,
            "fingerprint": dataclasses.asdict(self.fingerprint) if self.fingerprint else None,
            "offset_norms": {str(k): v for k, v in self.norms().items()},
            "low_rank": {str(k): v for k, v in self.ranks().items()},
            "lora": {str(k): v for k, v in self.lora_ranks().items()},
            "condition": self.condition.summary() if self.condition is not None else None,
            "decoding": dict(self.decoding),
            "generation": generation.summary() if (generation := self.generation) is not None else None,
            "created": int(self.created),
            "format_version": self.format_version,
        })

    # -- validation ---------------------------------------------------------------------------------

    def validate_for(self, model: ModelFingerprint, *, check_digest: bool = True) -> Profile:
        """Check that this profile can steer `model`; return self or raise a typed error."""
        check_terms(
            self.offsets,
            self.low_rank,
            hidden_size=model.hidden_size,
            num_layers=model.num_layers,
            who=f"profile {self.name!r}",
            hint=": it was made for another model or has a wrong layer index; retrain it for this one",
            lora=self.lora,
            projections=dict(model.projections) if model.projections else None,
        )
        if self.condition is not None and not self.condition.layer < model.num_layers:
            raise ProfileLayerError(
                f"profile {self.name!r}: its condition reads layer {self.condition.layer}, but the loaded model "
                f"has layers 0..{model.num_layers - 1}: it was made for another model; retrain it for this one"
            )
        fp = self.fingerprint
        if fp is None:
            return self
        if (fp.architecture, fp.hidden_size, fp.num_layers) != (
            model.architecture,
            model.hidden_size,
            model.num_layers,
        ):
            raise ProfileMismatchError(
                f"profile {self.name!r} was made for a {fp.architecture} model with {fp.num_layers} layers "
                f"of size {fp.hidden_size}; the loaded model is a {model.architecture} with "
                f"{model.num_layers} layers of size {model.hidden_size}. Retrain the profile for this model."
            )
        if check_digest and fp.digest and model.digest and fp.digest != model.digest:
            raise ProfileMismatchError(
                f"profile {self.name!r} was made for other weights or another tokenizer (fingerprint "
                f"{fp.digest[:12]}…, loaded model {model.digest[:12]}…). Retrain it for this model, or load "
                "it without the digest check if you know the models are interchangeable."
            )
        return self

    # -- bytes and files ----------------------------------------------------------------------------

    def tensor_digest(self) -> str:
        """sha256 of the file's tensor data (all that follows its header): the same for two files with the same
        tensors whatever their metadata, e.g. a profile before and after `with_generation`."""
        data = self.to_bytes()
        return hashlib.sha256(data[_safetensors_header(data, self.name)[1] :]).hexdigest()

    def to_bytes(self) -> bytes:
        tensors = {f"offset.{layer}": t for layer, t in self.offsets.items()}
        for layer, (down, up) in self.low_rank.items():
            tensors[f"down.{layer}"] = down
            tensors[f"up.{layer}"] = up
        for layer, terms in self.lora.items():
            for name, (a, b) in terms.items():
                tensors[f"lora_a.{layer}.{name}"] = a
                tensors[f"lora_b.{layer}.{name}"] = b
        if self.condition is not None:
            tensors[f"condition.{self.condition.layer}"] = self.condition.direction
        return canonical_safetensors(st_save(tensors, metadata=self.metadata()))

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "<bytes>") -> Profile:
        metadata = _read_safetensors_metadata(data, source)
        try:
            tensors = st_load(data)
        except (SafetensorError, ValueError, RuntimeError) as exc:
            raise ProfileFormatError(f"{source}: not a readable safetensors file ({exc}); is it truncated?") from exc
        if metadata.get("format") != FORMAT_NAME:
            raise ProfileFormatError(f"{source}: safetensors file without '{FORMAT_NAME}' metadata")
        parts: dict[str, dict[int, torch.Tensor]] = {"offset": {}, "down": {}, "up": {}}
        lora_parts: dict[str, dict[tuple[int, str], torch.Tensor]] = {"lora_a": {}, "lora_b": {}}
        directions: dict[int, torch.Tensor] = {}
        for key, tensor in tensors.items():
            condition_match = _CONDITION_KEY.match(key)
            if condition_match:
                if tensor.ndim != 1 or not tensor.is_floating_point():
                    raise ProfileShapeError(f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} "
                                            f"({tensor.dtype}), expected 1-D floating point")
                directions[int(condition_match.group(1))] = tensor
                continue
            lora_match = _LORA_KEY.match(key)
            if lora_match:
                if tensor.ndim != 2 or not tensor.is_floating_point():
                    raise ProfileShapeError(
                        f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} ({tensor.dtype}), "
                        "expected 2-D floating point"
                    )
                lora_parts[lora_match.group(1)][(int(lora_match.group(2)), lora_match.group(3))] = tensor
                continue
            match = _TENSOR_KEY.match(key)
            if not match:
                raise ProfileFormatError(
                    f"{source}: unexpected tensor {key!r} (expected offset.<layer>, down.<layer>, up.<layer>, "
                    "lora_a.<layer>.<proj>, lora_b.<layer>.<proj> or condition.<layer>)"
                )
            kind, layer = match.group(1), int(match.group(2))
            expected = 1 if kind == "offset" else 2
            if tensor.ndim != expected:
                raise ProfileShapeError(
                    f"{source}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {expected}-D"
                )
            if not tensor.is_floating_point():
                raise ProfileFormatError(f"{source}: tensor {key!r} is {tensor.dtype}; offsets are floating point")
            parts[kind][layer] = tensor
        offsets = parts["offset"]
        unpaired = sorted(set(parts["down"]) ^ set(parts["up"]))
        if unpaired:
            raise ProfileFormatError(f"{source}: layers {unpaired} have only one of down.<layer> and up.<layer>")
        low_rank = {layer: (down, parts["up"][layer]) for layer, down in parts["down"].items()}
        unpaired_lora = sorted(set(lora_parts["lora_a"]) ^ set(lora_parts["lora_b"]))
        if unpaired_lora:
            raise ProfileFormatError(
                f"{source}: LoRA terms {[f'{layer}.{name}' for layer, name in unpaired_lora]} have only one of "
                "lora_a and lora_b"
            )
        lora: LoraTerms = {}
        for (layer, name), a in sorted(lora_parts["lora_a"].items()):
            lora.setdefault(layer, {})[name] = (a, lora_parts["lora_b"][(layer, name)])
        if len(directions) > 1:
            raise ProfileFormatError(
                f"{source}: {len(directions)} condition.<layer> tensors; a profile has at most one")
        if directions and "condition" not in metadata:
            raise ProfileFormatError(f"{source}: a condition.<layer> tensor without the 'condition' metadata")
        if "condition" in metadata and not directions:
            raise ProfileFormatError(f"{source}: 'condition' metadata without a condition.<layer> tensor")
        try:
            version = int(metadata.get("format_version", "0"))
            if version > FORMAT_VERSION:
                raise ProfileFormatError(
                    f"{source}: format version {version} is newer than this library's {FORMAT_VERSION}; upgrade"
                )
            fingerprint_text = metadata.get("fingerprint", "")
            return cls(
                name=metadata.get("name", ""),
                offsets=offsets,
                description=metadata.get("description", ""),
                fingerprint=ModelFingerprint.from_json(fingerprint_text) if fingerprint_text else None,
                default_strength=float(metadata.get("default_strength", "1.0")),
                position_mode=metadata.get("position_mode", "all"),
                method=metadata.get("method", "manual"),
                provenance=json.loads(metadata.get("provenance") or "{}"),
                created=float(metadata.get("created", "0")),
                format_version=version,
                low_rank=low_rank,
                lora=lora,
                condition=_read_condition(directions, metadata.get("condition"), source),
                decoding=json.loads(metadata["decoding"]) if "decoding" in metadata else {},
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ProfileFormatError(f"{source}: malformed profile metadata ({exc})") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: a reader sees the old file or the new one, never half of one."""
        return atomic_write(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ProfileFormatError(f"cannot read profile file {path}: {exc}") from exc
        return cls.from_bytes(data, source=str(path))


def _read_condition(directions: dict[int, torch.Tensor], text: str | None, source: str) -> Condition | None:
    if not directions:
        return None
    ((layer, direction),) = directions.items()
    spec = json.loads(text or "")
    if not isinstance(spec, dict) or set(spec) - {"threshold", "comparison", "reads", "score"} or (
            "threshold" not in spec):
        raise ProfileFormatError(f"{source}: the 'condition' metadata is not {{threshold, comparison, reads, score}}")
    return Condition(layer=layer, direction=direction, threshold=spec["threshold"],
                     comparison=spec.get("comparison", ">"), reads=spec.get("reads", "mean"),
                     kind=spec.get("score", "cosine"))


def canonical_safetensors(data: bytes) -> bytes:
    """`data` (a safetensors file) with its header in one fixed order: metadata keys sorted, tensors by offset.

    safetensors writes the metadata map in hash order, which changes from call to call, so the same profile
    saved twice gave two files with different bytes, and so different digests: two replicas sent the same
    upload served it under different digests. The header is JSON, so it is rewritten here (compact, padded
    with spaces to a multiple of 8 bytes, as safetensors pads it); the tensor data after it is unchanged.
    """
    header, end = _safetensors_header(data, "<bytes>")
    ordered: dict[str, Any] = {}
    if "__metadata__" in header:
        ordered["__metadata__"] = dict(sorted(header.pop("__metadata__").items()))
    ordered.update(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[end:]


def _safetensors_header(data: bytes, source: str) -> tuple[dict[str, Any], int]:
    """The header of a safetensors file (an 8-byte little-endian length, then a JSON object) and the offset
    where the tensor data starts. safetensors.torch.load returns tensors only, hence this small read."""
    if len(data) < 8:
        raise ProfileFormatError(f"{source}: file too short to be safetensors ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8 or header_len > 100_000_000:
        raise ProfileFormatError(f"{source}: safetensors header runs past the end of the file; truncated?")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileFormatError(f"{source}: unreadable safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise ProfileFormatError(f"{source}: unreadable safetensors header")
    return header, 8 + header_len


def _read_safetensors_metadata(data: bytes, source: str) -> Mapping[str, str]:
    # the "__metadata__" entry of the header is the string map
    metadata = _safetensors_header(data, source)[0].get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ProfileFormatError(f"{source}: safetensors metadata is not a string map")
    return metadata


def atomic_write(path: Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; profiles are read by other users (containers, replicas)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
