"""Structured output: `response_format` json_object and json_schema, compiled by llguidance into one token
constraint per row.

Knows llguidance, the model's tokenizer and JSON Schema as llguidance reads it; knows nothing about HTTP
(it raises `ResponseFormatError`, which the serving layer turns into a 400) nor about scheduling (the engine
asks each row's `GrammarConstraint` which tokens may come next and advances it with the token it picked:
`backends.base.TokenConstraint`).

- The tokenizer is wrapped once per loaded model (llguidance reads a fast tokenizer's own description; a
  tokenizer it cannot read, such as a word-level one, is described to it token by token, which is checked
  on a sample text and refused when the pieces do not add up to it).
- A response format becomes a grammar, and a grammar a matcher, once: compiled matchers are kept (the
  last `cache_size` formats), and every row of a request gets a copy of its format's matcher, so each row
  has its own grammar state.
- `json_object` is any JSON object; `json_schema` is its `schema`. `strict: true` takes the schema exactly
  and refuses keywords llguidance cannot enforce (`uniqueItems`, `not`, ...); otherwise such keywords are
  ignored (best effort, as OpenAI's non-strict mode). JSON is written without whitespace between tokens
  (`{"a":1,"b":[2,3]}`): with whitespace allowed, small models fill the output with newlines and never
  close the object.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .backends.base import TokenConstraint

log = logging.getLogger(__name__)

# JSON as llguidance writes it for every response format: no whitespace between tokens (see above)
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}
# the sample a per-token description of a tokenizer must reproduce exactly
_SAMPLE = 'The answer: {"name": "Ada", "tags": ["x", "y"], "n": -12.5e3, "ok": true, "none": null}\n'


class ResponseFormatError(ValueError):
    """The response format cannot be served: an invalid schema, or one llguidance refuses."""


class TokenizerUnsupportedError(ResponseFormatError):
    """llguidance cannot be given this model's tokenizer."""


def _import_llguidance() -> Any:
    import llguidance

    return llguidance


class _TokenTexts:
    """A tokenizer described token by token, for `llguidance.TokenizerWrapper`: each id's bytes (its text;
    a special token is b"\\xff" + its name, as llguidance marks them) and the tokenizer's own encoding. The
    model's stop tokens count as special: the engine ends a row at them, so they never stand for text."""

    def __init__(self, tokenizer: Any, stop_token_ids: list[int]) -> None:
        special = set(getattr(tokenizer, "all_special_ids", ())) | set(stop_token_ids)
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        special.update(i for i, added in decoder.items() if getattr(added, "special", False))
        self.eos_token_id = stop_token_ids[0]
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.special_token_ids = sorted(special)
        tokens: list[bytes] = []
        for i in range(len(tokenizer)):
            if i in special:
                tokens.append(b"\xff" + str(tokenizer.convert_ids_to_tokens(i)).encode("utf-8"))
            else:
                tokens.append(tokenizer.decode([i]).encode("utf-8"))
        self.tokens = tokens
        self._tokenizer = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def check(self) -> None:
        """The pieces of a sample's tokens must spell the sample (a tokenizer whose tokens decode
        differently alone than in context, such as byte-level or SentencePiece ones, cannot be described
        this way)."""
        ids = self(_SAMPLE)
        spelled = b"".join(self.tokens[i] for i in ids)
        if spelled != _SAMPLE.encode("utf-8"):
            raise TokenizerUnsupportedError(
                "response_format is not available for this model: llguidance cannot read its tokenizer, "
                "and its tokens decoded one by one do not spell the text they encode"
            )


def build_tokenizer(tokenizer: Any, stop_token_ids: Iterable[int]) -> Any:
    """The llguidance tokenizer of a transformers tokenizer; the model's stop tokens are its end tokens
    (allowed only where the grammar is complete)."""
    llguidance = _import_llguidance()
    eos = sorted(int(i) for i in stop_token_ids)
    if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
        eos = [int(tokenizer.eos_token_id)]
    if not eos:
        raise TokenizerUnsupportedError("response_format is not available for this model: it has no end token")
    try:
        import llguidance.hf

        return llguidance.hf.from_tokenizer(tokenizer, eos_token=eos)
    except Exception as exc:  # noqa: BLE001 - e.g. "can't determine decoder type" for word-level tokenizers
        log.info("llguidance cannot read the tokenizer (%s); describing it token by token", exc)
    texts = _TokenTexts(tokenizer, eos)
    texts.check()
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(texts), eos_token=eos)


def schema_for(response_format: Any) -> tuple[dict[str, Any], bool]:
    """The JSON schema a `protocol.ResponseFormat` asks for and whether it is strict."""
    kind = response_format.type
    if kind == "json_object":
        return {"type": "object"}, False
    if kind == "json_schema":
        spec = response_format.json_schema
        return spec.schema_, bool(spec.strict)
    raise ResponseFormatError(f"response_format type {kind!r} asks for no grammar")


class GrammarConstraint(TokenConstraint):
    """One row's grammar state (a copy of its format's compiled matcher)."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab = vocab_size

    def allowed(self) -> torch.Tensor:
        matcher = self._matcher
        if matcher.is_error():
            raise ValueError(f"the response format's grammar failed: {matcher.get_error()}")
        # one bit per token id, in little-endian 32-bit words
        words = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint32).astype("<u4", copy=False)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[: self._vocab]
        return torch.from_numpy(bits.view(np.bool_))

    def advance(self, token_id: int) -> None:
        if not self._matcher.consume_token(int(token_id)):
            raise ValueError(f"the response format's grammar refused token {token_id}: {self._matcher.get_error()}")

    @property
    def done(self) -> bool:
        return bool(self._matcher.is_stopped())


class Grammars:
    """The response formats of one loaded model: its llguidance tokenizer (built on first use, once) and
    the compiled matchers of the formats asked for lately."""

    def __init__(self, tokenizer: Any, stop_token_ids: Iterable[int], *, cache_size: int = 64) -> None:
        self._tokenizer = tokenizer
        self._stop_token_ids = frozenset(stop_token_ids)
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._llg_tokenizer: Any = None
        self._tokenizer_error: TokenizerUnsupportedError | None = None
        self._compiled: OrderedDict[str, Any] = OrderedDict()

    def llg_tokenizer(self) -> Any:
        with self._lock:
            if self._llg_tokenizer is None and self._tokenizer_error is None:
                try:
                    self._llg_tokenizer = build_tokenizer(self._tokenizer, self._stop_token_ids)
                except TokenizerUnsupportedError as exc:
                    self._tokenizer_error = exc
            if self._tokenizer_error is not None:
                raise TokenizerUnsupportedError(str(self._tokenizer_error))
            return self._llg_tokenizer

    def compile(self, response_format: Any) -> Any:
        """The compiled matcher of a response format (cached); ResponseFormatError when it cannot be."""
        schema, strict = schema_for(response_format)
        try:
            key = json.dumps([schema, strict], sort_keys=True, separators=(",", ":"))
        except RecursionError:
            raise ResponseFormatError("the schema is nested too deeply") from None
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
        if compiled is None:
            tokenizer = self.llg_tokenizer()
            compiled = self._build(tokenizer, schema, strict)
            with self._lock:
                self._compiled[key] = compiled
                while len(self._compiled) > self._cache_size:
                    self._compiled.popitem(last=False)
        if isinstance(compiled, ResponseFormatError):  # refusals are kept too: a bad schema is read once
            raise ResponseFormatError(str(compiled))
        return compiled

    @staticmethod
    def _build(tokenizer: Any, schema: dict[str, Any], strict: bool) -> Any:
        """A matcher for `schema`, or the ResponseFormatError that says why there is none."""
        llguidance = _import_llguidance()
        try:
            # as JSON text, so that llguidance reads numbers as any JSON parser does (an integer beyond 64 bits is
            # a double), not through Python's conversion, which refuses such integers
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), overrides={**JSON_OPTIONS, "lenient": not strict}
            )
        except (ValueError, TypeError) as exc:
            return ResponseFormatError(f"the schema is not usable: {exc}")
        except RecursionError:
            return ResponseFormatError("the schema is nested too deeply")
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            return ResponseFormatError(f"the schema is not usable: {matcher.get_error()}")
        return matcher

    def constraint(self, response_format: Any) -> GrammarConstraint:
        """A fresh constraint (its own grammar state) for one row answering `response_format`."""
        matcher = self.compile(response_format)
        return GrammarConstraint(matcher.deep_copy(), int(self.llg_tokenizer().vocab_size))
