"""Preference data: JSONL loading, chat-template formatting, token budgets and deterministic splits.

Knows three row formats and how to turn a pair into token ids with a tokenizer's chat template:
- conversational: ``prompt`` is a list of ``{"role", "content"}`` messages ending with a user turn,
  ``chosen`` and ``rejected`` are lists holding one assistant message (as in ../shared/data);
- plain strings: ``prompt``, ``chosen`` and ``rejected`` are strings (the prompt is one user turn);
- raw HH transcripts: ``chosen`` and ``rejected`` are whole ``"\\n\\nHuman: …\\n\\nAssistant: …"``
  transcripts sharing everything but the last assistant turn (a ``prompt`` field is then optional).
Knows nothing about models, training or steering.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.errors import SteeringError

Message = dict[str, str]
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")
_ROLES = ("system", "user", "assistant")


class DataFormatError(SteeringError):
    """A preference file or one of its rows is malformed; says where (file, line, field)."""


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair: the conversation so far and two candidate assistant replies."""

    id: str
    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    source: str = ""

    @property
    def messages(self) -> list[Message]:
        return [dict(m) for m in self.prompt]


# -- parsing ----------------------------------------------------------------------------------------


def parse_hh_transcript(text: str, where: str = "transcript") -> list[Message]:
    """Split an Anthropic HH transcript ("\\n\\nHuman: …\\n\\nAssistant: …") into chat messages."""
    matches = list(_HH_TURN.finditer(text))
    if not matches or text[: matches[0].start()].strip():
        raise DataFormatError(f"{where}: not an HH transcript (expected it to start with 'Human:')")
    messages: list[Message] = []
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        role = "user" if match.group(1) == "Human" else "assistant"
        messages.append({"role": role, "content": text[match.end() : end].strip()})
    return messages


def _is_transcript(value: object) -> bool:
    return isinstance(value, str) and bool(re.match(r"^\s*(\n\n)?Human:", value))


def _check_messages(value: object, where: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataFormatError(f"{where}: expected a non-empty list of messages")
    out: list[Message] = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataFormatError(f"{where}[{i}]: expected an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise DataFormatError(f"{where}[{i}].role: {role!r} is not one of {_ROLES}")
        if not isinstance(content, str):
            raise DataFormatError(f"{where}[{i}].content: expected a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _reply(value: object, where: str) -> str:
    if isinstance(value, str):
        text = value
    else:
        messages = _check_messages(value, where)
        if any(m["role"] != "assistant" for m in messages):
            raise DataFormatError(f"{where}: expected only assistant messages")
        text = "\n\n".join(m["content"] for m in messages)
    if not text.strip():
        raise DataFormatError(f"{where}: the reply is empty")
    return text


def parse_row(row: object, where: str = "row") -> PreferencePair:
    """Turn one decoded JSON row of any supported format into a `PreferencePair`."""
    if not isinstance(row, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataFormatError(f"{where}: missing field '{key}'")
    row_id = str(row.get("id", ""))
    source = str(row.get("source", ""))
    chosen_raw, rejected_raw, prompt_raw = row["chosen"], row["rejected"], row.get("prompt")

    if _is_transcript(chosen_raw) and _is_transcript(rejected_raw) and prompt_raw is None:
        chosen_msgs = parse_hh_transcript(chosen_raw, f"{where}: field 'chosen'")
        rejected_msgs = parse_hh_transcript(rejected_raw, f"{where}: field 'rejected'")
        for key, msgs in (("chosen", chosen_msgs), ("rejected", rejected_msgs)):
            if msgs[-1]["role"] != "assistant":
                raise DataFormatError(
                    f"{where}: field '{key}': the transcript does not end with 'Assistant:'"
                )
        if chosen_msgs[:-1] != rejected_msgs[:-1]:
            raise DataFormatError(f"{where}: fields 'chosen' and 'rejected' differ before the last reply")
        prompt = chosen_msgs[:-1]
        chosen, rejected = chosen_msgs[-1]["content"], rejected_msgs[-1]["content"]
    else:
        if prompt_raw is None:
            raise DataFormatError(f"{where}: missing field 'prompt'")
        if isinstance(prompt_raw, str):
            if _is_transcript(prompt_raw):
                prompt = parse_hh_transcript(prompt_raw, f"{where}: field 'prompt'")
                if prompt and prompt[-1]["role"] == "assistant" and not prompt[-1]["content"]:
                    prompt = prompt[:-1]  # "...\n\nAssistant:" opens the reply
            else:
                prompt = [{"role": "user", "content": prompt_raw}]
        else:
            prompt = _check_messages(prompt_raw, f"{where}: field 'prompt'")
        chosen = _reply(chosen_raw, f"{where}: field 'chosen'")
        rejected = _reply(rejected_raw, f"{where}: field 'rejected'")
    if not prompt or prompt[-1]["role"] != "user":
        raise DataFormatError(f"{where}: field 'prompt' must end with a user turn")
    if not any(m["content"].strip() for m in prompt):
        raise DataFormatError(f"{where}: field 'prompt' is empty")
    return PreferencePair(id=row_id, prompt=tuple(prompt), chosen=chosen, rejected=rejected, source=source)


def load_pairs(path: str | os.PathLike[str], *, max_pairs: int | None = None) -> list[PreferencePair]:
    """Read a preference JSONL file; blank lines are skipped, ids default to '<file>:<line>'."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such preference file")
    pairs: list[PreferencePair] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            pair = parse_row(row, where)
            if not pair.id:
                pair = PreferencePair(
                    f"{path.name}:{number}", pair.prompt, pair.chosen, pair.rejected, pair.source
                )
            pairs.append(pair)
            if max_pairs is not None and len(pairs) >= max_pairs:
                break
    if not pairs:
        raise DataFormatError(f"{path}: no preference pairs")
    return pairs


def resolve_split(data: str | os.PathLike[str], split: str) -> Path:
    """`data` is a folder with `<split>.jsonl` files or a single JSONL file (returned as is)."""
    path = Path(data)
    if path.is_dir():
        return path / f"{split}.jsonl"
    return path


# -- splits and subsets -----------------------------------------------------------------------------


def _prompt_key(pair: PreferencePair) -> str:
    return json.dumps(pair.prompt, sort_keys=True)


def split_pairs(
    pairs: Sequence[PreferencePair], held_out: float, *, seed: int = 0
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Deterministic split by a hash of the prompt, so that pairs of one prompt never cross splits."""
    if not 0.0 <= held_out <= 1.0:
        raise ValueError("held_out must be within 0..1")
    keep, held = [], []
    for pair in pairs:
        digest = hashlib.sha256(f"{seed}:{_prompt_key(pair)}".encode()).digest()
        (held if int.from_bytes(digest[:8], "big") / 2**64 < held_out else keep).append(pair)
    return keep, held


def sample_pairs(pairs: Sequence[PreferencePair], n: int | None, *, seed: int = 0) -> list[PreferencePair]:
    """The first `n` pairs of a seeded shuffle (all of them, shuffled, when n is None)."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    chosen = order if n is None else order[:n]
    return [pairs[i] for i in chosen]


# -- formatting and token budgets -------------------------------------------------------------------


@dataclass(frozen=True)
class TokenBudget:
    """Most tokens kept of the prompt (conversation after any system text) and of each response."""

    prompt: int = 128
    response: int = 64


DEFAULT_BUDGET = TokenBudget()


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt + response; the response starts at `prompt_len`."""

    input_ids: tuple[int, ...]
    prompt_len: int

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def _render(tokenizer: Any, messages: list[Message]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(
    tokenizer: Any, messages: Sequence[Message], *, system: str | None = None, budget: int = 128
) -> list[int]:
    """Chat-template the conversation (with `system` as system message when given) within a budget.

    The budget counts tokens beyond the system text, so prompts under two different instructions keep
    the same conversation. Oldest turns go first; a last user turn that alone is too long keeps its start.
    """
    head = [{"role": "system", "content": system}] if system is not None else []
    msgs = [dict(m) for m in messages]
    allowance = budget + (len(tokenizer(system, add_special_tokens=False)["input_ids"]) if system else 0)
    ids = _render(tokenizer, head + msgs)
    while len(ids) > allowance and len(msgs) > 1:
        msgs = msgs[1:] if msgs[0]["role"] != "system" else msgs[:1] + msgs[2:]
        while len(msgs) > 1 and msgs[0]["role"] == "assistant":
            msgs = msgs[1:]
        ids = _render(tokenizer, head + msgs)
    if len(ids) > allowance:
        content_ids = tokenizer(msgs[-1]["content"], add_special_tokens=False)["input_ids"]
        keep = max(1, len(content_ids) - (len(ids) - allowance))
        msgs[-1] = {"role": msgs[-1]["role"], "content": tokenizer.decode(content_ids[:keep])}
        ids = _render(tokenizer, head + msgs)
        if len(ids) > allowance:  # decoding and re-encoding may not round-trip exactly
            ids = ids[: max(allowance, 1)]
    return ids


def encode_response(tokenizer: Any, text: str, budget: int) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])[:budget]


def encode(
    tokenizer: Any,
    messages: Sequence[Message],
    response: str,
    *,
    system: str | None = None,
    budget: TokenBudget = DEFAULT_BUDGET,
) -> Encoded:
    """Prompt (chat template, generation prompt opened) followed by the response tokens."""
    prompt = encode_prompt(tokenizer, messages, system=system, budget=budget.prompt)
    reply = encode_response(tokenizer, response, budget.response)
    if not reply:
        raise DataFormatError("a response encodes to no tokens")
    return Encoded(tuple(prompt + reply), len(prompt))


@dataclass
class Batch:
    """Right-padded token ids with masks: (B, T) each."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor  # 1 on response tokens

    @property
    def prompt_lengths(self) -> list[int]:
        return [int(i) for i in self.response_mask.float().argmax(dim=1)]

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on `device` (itself when it is there already)."""
        if self.input_ids.device == torch.device(device):
            return self
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))


def pad_id(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else its end-of-sequence token."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else tokenizer.eos_token_id)


def collate(examples: Iterable[Encoded], pad_id: int) -> Batch:
    """Right-pad encoded examples into one batch."""
    examples = list(examples)
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    response = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention[row, :n] = 1
        response[row, example.prompt_len : n] = 1
    return Batch(ids, attention, response)
