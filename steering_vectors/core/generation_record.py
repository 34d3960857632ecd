"""The generation section of a profile's provenance (``provenance["generation"]``): how the profile's replies
fared against the unsteered model's on a preference set's dev prompts, under that set's judge (docs/judge.md,
"The generation evaluation"). Every number is of dev half B; the strength was chosen on half A.

Knows the section's JSON form and its rules (`GenerationRecord.from_json` raises `ProfileFormatError`).
Knows nothing about how replies are made or scored (the training package's `geneval.generation_record`
builds a record from its result) nor about the rest of the file (`profile` keeps the section in the
provenance, checks it on load and shows it in `Profile.summary()["generation"]`).

The form, rates as shares in [0, 1] (None: unknown), perplexity of the replies under the unsteered model::

    {"set": "alpaca_helpful", "judge": "alpaca_helpful-head.safetensors", "judge_sha256": "<64 hex, or ''>",
     "replies": "engine", "max_new_tokens": 96, "prompts": 44, "half_a": 22, "half_b": 22,
     "chosen_strength": 0.5,
     "unsteered": {"loop_rate": 0.227, "refusal_rate": 0.0, "perplexity": 2.03},
     "strengths": [{"strength": 0.5, "win_rate": 0.5, "low": 0.318, "high": 0.705, "loop_rate": 0.409,
                    "refusal_rate": 0.0, "perplexity": 1.94}, ...],
     "source": "docs/bench-generation-helpful.json"}

Optional keys (absent: the default, and written only when not it): `decoding`, the profile's decoding defaults its
steered replies took (`Profile.decoding`, e.g. ``{"repetition_penalty": 1.15}``; the unsteered replies never take
them), and `conditions`, ``ignored`` (a conditional profile steered every prompt) or ``honoured`` (only the prompts
its condition fired on, as a request gets it).
`replies` says who made them: ``engine`` (the server's engine, each profile in its own position mode:
bench/generation.py) or ``library`` (`genmetrics.generate_replies`, steered at every position: `rahf eval
--generation`). `chosen_strength` is 0 (the unsteered model) when no strength met the loop and perplexity
limits on half A, else one of `strengths`. `source` (optional) names the file with the whole result.
Keys this version does not know are kept in the file and left out of the record.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ProfileFormatError

REPLY_SOURCES: tuple[str, ...] = ("engine", "library")
CONDITION_HANDLING: tuple[str, ...] = ("ignored", "honoured")
_SHA256 = re.compile(r"^([0-9a-f]{64})?$")
_RATES = ("loop_rate", "refusal_rate")
_WIN = ("win_rate", "low", "high")


def _fail(what: str) -> ProfileFormatError:
    return ProfileFormatError(f"the generation section of the provenance: {what}")


def _number(data: dict[str, Any], key: str, where: str) -> float | None:
    """A finite number, or None for null / NaN (a metric with nothing to measure)."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(f"{where}{key} is {value!r}, not a number")
    if math.isnan(value):
        return None
    if math.isinf(value):
        raise _fail(f"{where}{key} is infinite")
    return float(value)


def _share(data: dict[str, Any], key: str, where: str) -> float | None:
    value = _number(data, key, where)
    if value is not None and not 0.0 <= value <= 1.0:
        raise _fail(f"{where}{key} {value} is not a share between 0 and 1")
    return value


def _count(data: dict[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(f"{key} is {value!r}, not a count")
    return value


def _text(data: dict[str, Any], key: str, default: str | None = None) -> str:
    value = data.get(key, default)
    if not isinstance(value, str):
        raise _fail(f"{key} is {value!r}, not text")
    return value


@dataclass(frozen=True)
class UnsteeredRow:
    """The unsteered model's replies on half B."""

    loop_rate: float | None
    refusal_rate: float | None
    perplexity: float | None

    @classmethod
    def from_json(cls, data: Any, where: str = "unsteered.") -> UnsteeredRow:
        if not isinstance(data, dict):
            raise _fail(f"{where.rstrip('.')} is not an object")
        perplexity = _number(data, "perplexity", where)
        if perplexity is not None and perplexity <= 0:
            raise _fail(f"{where}perplexity {perplexity} is not positive")
        return cls(*(_share(data, key, where) for key in _RATES), perplexity=perplexity)

    def to_json(self) -> dict[str, Any]:
        return {"loop_rate": self.loop_rate, "refusal_rate": self.refusal_rate, "perplexity": self.perplexity}


@dataclass(frozen=True)
class StrengthRow:
    """One strength's replies on half B: win rate against the unsteered replies (ties half) with its 95 %
    bootstrap interval, loop and refusal rates, perplexity."""

    strength: float
    win_rate: float | None
    low: float | None
    high: float | None
    loop_rate: float | None
    refusal_rate: float | None
    perplexity: float | None

    @classmethod
    def from_json(cls, data: Any) -> StrengthRow:
        if not isinstance(data, dict):
            raise _fail("an entry of strengths is not an object")
        strength = _number(data, "strength", "strengths[].")
        if strength is None or strength == 0:
            raise _fail(f"a strength is {data.get('strength')!r}; the unsteered row (0) is `unsteered`")
        where = f"strength {strength:g}: "
        win_rate, low, high = (_share(data, key, where) for key in _WIN)
        if low is not None and high is not None and low > high:
            raise _fail(f"{where}the interval [{low}, {high}] is reversed")
        rest = UnsteeredRow.from_json(data, where)
        return cls(strength, win_rate, low, high, rest.loop_rate, rest.refusal_rate, rest.perplexity)

    def to_json(self) -> dict[str, Any]:
        return {"strength": self.strength, "win_rate": self.win_rate, "low": self.low, "high": self.high,
                "loop_rate": self.loop_rate, "refusal_rate": self.refusal_rate, "perplexity": self.perplexity}


@dataclass(frozen=True)
class GenerationRecord:
    """A profile's generation result (the module docstring has the form); checked when made."""

    data_set: str  # "set" in the stored form
    judge: str
    judge_sha256: str
    replies: str
    max_new_tokens: int
    prompts: int
    half_a: int
    half_b: int
    chosen_strength: float
    unsteered: UnsteeredRow
    strengths: tuple[StrengthRow, ...]
    source: str = ""
    # the profile's decoding defaults its steered replies took ({}: none; the unsteered replies never take them)
    decoding: dict[str, float] = field(default_factory=dict)
    conditions: str = "ignored"  # "honoured": a conditional profile steered only the prompts it fired on

    def __post_init__(self) -> None:
        if self.conditions not in CONDITION_HANDLING:
            raise _fail(f"conditions {self.conditions!r} is not one of {CONDITION_HANDLING}")
        if not isinstance(self.decoding, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for k, v in self.decoding.items()):  # fmt: skip
            raise _fail(f"decoding {self.decoding!r} is not an object of finite numbers")
        if not self.data_set or not self.judge:
            raise _fail("set and judge must name something")
        if not _SHA256.match(self.judge_sha256):
            raise _fail(f"judge_sha256 {self.judge_sha256!r} is not 64 lowercase hex digits (or empty)")
        if self.replies not in REPLY_SOURCES:
            raise _fail(f"replies {self.replies!r} is not one of {REPLY_SOURCES}")
        if self.max_new_tokens < 1:
            raise _fail(f"max_new_tokens {self.max_new_tokens} is not positive")
        if self.half_a + self.half_b != self.prompts or not self.half_b:
            raise _fail(f"half A ({self.half_a}) and half B ({self.half_b}, at least 1) do not make up the "
                        f"{self.prompts} prompts")
        measured = [row.strength for row in self.strengths]
        if not measured or measured != sorted(set(measured)):
            raise _fail(f"strengths {measured} are not distinct, sorted and at least one")
        if self.chosen_strength != 0 and self.chosen_strength not in measured:
            raise _fail(f"the chosen strength {self.chosen_strength:g} is neither 0 nor one of {measured}")

    @classmethod
    def from_json(cls, data: Any) -> GenerationRecord:
        """The record in `data` (the section as stored), or `ProfileFormatError` saying what is wrong."""
        if not isinstance(data, dict):
            raise _fail("not an object")
        strengths = data.get("strengths")
        if not isinstance(strengths, list):
            raise _fail("strengths is not a list")
        chosen = _number(data, "chosen_strength", "")
        if chosen is None:
            raise _fail("chosen_strength is missing")
        return cls(
            data_set=_text(data, "set"), judge=_text(data, "judge"), judge_sha256=_text(data, "judge_sha256", ""),
            replies=_text(data, "replies"), max_new_tokens=_count(data, "max_new_tokens"),
            prompts=_count(data, "prompts"), half_a=_count(data, "half_a"), half_b=_count(data, "half_b"),
            chosen_strength=chosen, unsteered=UnsteeredRow.from_json(data.get("unsteered")),
            strengths=tuple(StrengthRow.from_json(row) for row in strengths), source=_text(data, "source", ""),
            decoding=data.get("decoding", {}), conditions=_text(data, "conditions", "ignored"),
        )

    def to_json(self) -> dict[str, Any]:
        """The section as stored (`from_json(to_json())` gives the record back)."""
        return {
            "set": self.data_set, "judge": self.judge, "judge_sha256": self.judge_sha256, "replies": self.replies,
            "max_new_tokens": self.max_new_tokens, "prompts": self.prompts, "half_a": self.half_a,
            "half_b": self.half_b, "chosen_strength": self.chosen_strength, "unsteered": self.unsteered.to_json(),
            "strengths": [row.to_json() for row in self.strengths], "source": self.source,
            **({"decoding": dict(self.decoding)} if self.decoding else {}),
            **({"conditions": self.conditions} if self.conditions != "ignored" else {}),
        }

    def summary(self) -> dict[str, Any]:
        """The stored form plus, per strength, `perplexity_change` (relative to unsteered: 0.059 is +5.9 %)."""
        base = self.unsteered.perplexity
        out = self.to_json()
        for row in out["strengths"]:
            ppl = row["perplexity"]
            row["perplexity_change"] = ppl / base - 1 if ppl is not None and base else None
        return out
