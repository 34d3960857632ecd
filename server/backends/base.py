"""The seam between the HTTP side and the backends: the engine interface (requests in, token events
out) and what a backend's factory returns.

Knows token ids, sampling parameters, per-row steering (`steering_vectors.core.hooks.RowSteering`, validated
against the model before it reaches an engine) and per-row token constraints (`TokenConstraint`: which
token ids may come next, as the serving layer's grammar says); knows nothing about HTTP, JSON, text,
grammars or tokenisers (the serving layer detokenises, matches stop strings, compiles `response_format`
into constraints and closes the stream to cancel), nor about any model runtime: a backend
(`server/backends/<name>/`) owns its model and its engine.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from steering_vectors.core.hooks import RowSteering
from steering_vectors.core.profile import ModelFingerprint

__all__ = [
    "Backend",
    "ConditionResult",
    "Engine",
    "EngineError",
    "EngineEvent",
    "EngineOverloadedError",
    "EngineShutdownError",
    "GenerationRequest",
    "RowSteering",
    "SamplingParams",
    "TokenConstraint",
    "TokenLogprob",
    "decoding_taken",
    "with_profile_decoding",
]

T = TypeVar("T")


class EngineError(Exception):
    """Base class of engine errors the serving layer maps to HTTP."""


class EngineOverloadedError(EngineError):
    """The waiting queue is full; retry after `retry_after` seconds (HTTP 429/503)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineShutdownError(EngineError):
    """The engine is draining or stopped and accepts no new work (HTTP 503)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one sequence. temperature 0 means greedy."""

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_k: int = 0  # keep the k most likely tokens; 0 (or -1): all
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # over prompt and output tokens: positive logits / it, negative ones * it
    logprobs: bool = False  # return the chosen token's logprob
    top_logprobs: int = 0  # and this many alternatives
    prompt_logprobs: bool = False  # score the prompt tokens too (echo / max_tokens 0 scoring)


class TokenConstraint(abc.ABC):
    """The tokens one row may produce next (a grammar's state, one object per row: it is advanced by that
    row's tokens only). An engine that supports constraints (`Engine.supports_constraints`) asks
    `allowed()` before it picks each of the row's tokens, gives every other token of that row's logits
    probability 0 (before penalties, temperature and the top-k/min-p/top-p cuts; logprobs are those of
    the constrained distribution), calls `advance(token)` with the token it picked, and ends the row with
    finish_reason "stop" once `done` is true (max_new_tokens first: "length", as for any row). Methods are
    called from the engine's thread, one row's calls never concurrently."""

    @abc.abstractmethod
    def allowed(self) -> torch.Tensor:
        """A bool tensor (n,) on the CPU: True where token id i may come next. Ids >= n are not allowed
        (n may be smaller than the model's vocabulary: padding rows of the output layer are never
        allowed). Raises ValueError when nothing may come next (the constraint is broken)."""

    @abc.abstractmethod
    def advance(self, token_id: int) -> None:
        """Take the token the engine picked; raises ValueError for a token `allowed()` did not allow."""

    @property
    @abc.abstractmethod
    def done(self) -> bool:
        """Complete and nothing more may follow: the row ends here ("stop")."""


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    steering: RowSteering | None = None
    constraint: TokenConstraint | None = None  # only for engines whose supports_constraints is True
    # only for engines whose supports_json_schema is True (and supports_constraints False): the reply must be an
    # instance of this JSON schema; the serving layer has checked that it compiles
    json_schema: dict[str, Any] | None = None
    # SamplingParams fields the client did not set: the decoding defaults of the profiles acting on the row
    # (`RowSteering.decoding`) fill them (`with_profile_decoding`); a conditional profile's once it fires
    open_sampling: frozenset[str] = frozenset()


def decoding_taken(decoding: dict[str, float], open_sampling: frozenset[str]) -> dict[str, float]:
    """Of the acting profiles' decoding defaults (`decoding`), those a request takes: in the fields it left open."""
    return {key: value for key, value in decoding.items() if key in open_sampling}


def with_profile_decoding(request: GenerationRequest, steering: RowSteering | None) -> GenerationRequest:
    """`request` with its open sampling fields set from `steering`'s acting profiles (a new request; the same
    one when nothing changes), its open fields then closed, so that a second call changes nothing. An engine
    calls it once the row's steering is final: at submission, or after the prompt's conditions are read."""
    if not request.open_sampling:
        return request
    defaults = decoding_taken(steering.decoding if steering is not None else {}, request.open_sampling)
    return dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, **defaults),
                               open_sampling=frozenset())  # fmt: skip


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob) best first


@dataclass(frozen=True)
class ConditionResult:
    """How one conditional profile of a request was decided: its probe's score on the prompt and whether it
    fired (the profile then steers the request as its position mode says)."""

    profile: str
    applied: bool
    score: float


@dataclass
class EngineEvent:
    """New tokens of one sequence since its previous event; the last event has a finish_reason."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # parallel to token_ids when requested
    finish_reason: str | None = None  # "stop" | "length" | None while running
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first event only; None for token 0
    # first event only, for a request whose steering has conditional profiles: one result per such profile,
    # in the order of `RowSteering.conditional`
    conditions: list[ConditionResult] | None = None


class Engine(abc.ABC):
    """Runs forward passes for many requests. One instance owns one model."""

    # whether `generate` honours `GenerationRequest.constraint`; the serving layer refuses a
    # `response_format` (400) for an engine that does not, rather than ignoring it
    supports_constraints: bool = False
    # whether `generate` honours `GenerationRequest.json_schema` with a grammar of its own (the vLLM backend:
    # vLLM's structured outputs); asked only when supports_constraints is False
    supports_json_schema: bool = False
    # whether `generate` evaluates the conditions of `RowSteering.conditional` (from the prompt's prefill) and
    # reports them in the first event; the serving layer refuses conditional profiles (400) for one that does not
    supports_conditions: bool = False

    @abc.abstractmethod
    def start(self) -> None:
        """Start the worker thread(s); called once from the app's startup."""

    @abc.abstractmethod
    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop accepting work, let running requests finish within `timeout`, then stop."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        """Stream events for `request`. Closing the iterator (or cancelling the task that iterates it)
        cancels the request and frees its slot. Raises EngineOverloadedError / EngineShutdownError
        on the first iteration when the request cannot be accepted."""

    async def run_between_steps(self, work: Callable[[], T]) -> T:
        """Run `work` (forward passes over the engine's model that are not a generation, such as a profile
        fit's) where it does not race the engine's own steps, and return its result. The default runs it
        in a worker thread; an engine with a step loop runs it on its own thread between two steps, so
        that running requests wait at most one piece of work (callers keep each piece small)."""
        return await asyncio.to_thread(work)

    @property
    @abc.abstractmethod
    def max_context(self) -> int:
        """Longest prompt + completion the model accepts, in tokens."""

    @abc.abstractmethod
    def stats(self) -> dict[str, int]:
        """At least {"running": n, "waiting": n} for metrics and readiness."""


async def queued_events(queue: asyncio.Queue) -> AsyncIterator[EngineEvent]:
    """The events an engine's thread puts on one request's queue, up to the one with a finish_reason; an
    exception put there instead is raised (the request failed)."""
    while True:
        event = await queue.get()
        if isinstance(event, BaseException):
            raise event
        yield event
        if event.finish_reason is not None:
            return


def check_max_model_len(wanted: int | None, positions: int) -> None:
    """Refuse a context window (`settings.max_model_len`) longer than the model's `positions`
    (max_position_embeddings; 0: unknown, nothing is refused)."""
    if wanted is not None and positions and wanted > positions:
        raise ValueError(f"max_model_len {wanted} is longer than the model's {positions} positions "
                         f"(max_position_embeddings); use at most {positions}")


def drain_and_stop(engine: Any, timeout: float) -> None:
    """The shutdown of an engine run by one scheduler thread (`_lock`, its condition `_wake`, `_accepting`,
    `_in_flight`, `_stopping`, `_thread`): refuse new work, let the requests in flight finish within `timeout`,
    then stop the thread and wait for it."""
    with engine._lock:
        engine._accepting = False
        engine._wake.notify_all()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with engine._lock:
            if engine._in_flight == 0:
                break
        time.sleep(0.01)
    with engine._lock:
        engine._stopping = True
        engine._wake.notify_all()
    if engine._thread is not None:
        engine._thread.join(timeout=max(5.0, timeout))
        engine._thread = None


@dataclass
class Backend:
    """What a backend's factory (`create(settings, model=None)` in `server/backends/<name>/`) returns:
    a started-ready engine over the model it loaded, and what the serving layer needs beside it."""

    name: str  # the backend's name, as settings.backend names it
    engine: Engine
    tokenizer: Any  # a transformers tokenizer: chat template, encode, decode, len
    fingerprint: ModelFingerprint  # profiles are validated against it
    model_name: str  # what clients call the model unless settings.served_model_name says otherwise
    stop_token_ids: frozenset[int] = frozenset()
    info: dict[str, Any] = field(default_factory=dict)  # reported by /readyz (device, dtype, quantize, ...)
    model: Any = None  # the torch module, for forward passes beside generation (profile fits); None: none
