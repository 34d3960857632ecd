"""Serving: turns OpenAI requests into engine work and engine events into responses and chunks.

Knows tokenisation and chat templates, the steering extension (profile names, strengths, the
`<base>:<profile>@<strength>` model alias), limits, incremental detokenisation that never splits a
UTF-8 character, stop strings, logprob formats and usage, and which rows carry a `response_format`'s
constraint (compiled by `structured.py`, one grammar state per choice). Knows nothing about HTTP transport
(routes wrap the chunks in server-sent events) or scheduling (the engine's business). Testable with a fake
engine and no model.

Preparation reads in one direction: a request model validates and normalises what it owns and hands over
one `protocol.Generation` (`request.generation()`); `prepare_chat` / `prepare_completion` take it once and
add what only the server knows (the served model's alias, the profile store, limits, the tokeniser).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from steering_vectors.core.errors import PlanError
from steering_vectors.core.hooks import RowSteering
from steering_vectors.core.profile import ModelFingerprint, Profile, merged_decoding

from .backends.base import (
    ConditionResult,
    Engine,
    GenerationRequest,
    SamplingParams,
    TokenConstraint,
    TokenLogprob,
    decoding_taken,
)
from .config import Settings
from .errors import bad_request, not_found
from .protocol import ChatCompletionRequest, CompletionRequest, Generation, SteeringWish, TokenizeRequest
from .registry import ProfileRegistry
from .structured import Grammars, ResponseFormatError, schema_for

# -- steering -----------------------------------------------------------------------------------------


def steering_info(
    steering: RowSteering | None,
    digests: Mapping[str, str] | None = None,
    conditions: Mapping[str, ConditionResult] | None = None,
    open_sampling: frozenset[str] = frozenset(),
) -> dict[str, Any] | None:
    """What the response reports about the steering it applied (with each profile file's digest, which
    tells the version that served it); a conditional profile also says whether its condition fired
    (`applied`) and its probe's `score` (`conditions`: the engine's results, once the prompt is read).
    `decoding`: the acting profiles' decoding defaults the request took, in the fields it left open
    (`open_sampling`), as the engine applied them (`with_profile_decoding`); absent when none."""
    if steering is None:
        return None
    digests = digests or {}
    waiting = {profile.name for profile, _ in steering.conditional}
    conditions = conditions or {}
    entries = []
    for name, strength in steering.applied:
        entry: dict[str, Any] = {"profile": name, "strength": strength}
        if name in digests:
            entry["digest"] = digests[name]
        if name in waiting:
            result = conditions.get(name)
            entry["condition"] = None if result is None else {"applied": result.applied, "score": result.score}
        entries.append(entry)
    info: dict[str, Any] = {"profiles": entries, "position": steering.position_mode}
    fired = [(profile, strength) for profile, strength in steering.conditional
             if (result := conditions.get(profile.name)) is not None and result.applied]  # fmt: skip
    decoding = decoding_taken(merged_decoding([*steering.sources, *fired]), open_sampling)
    if decoding:
        info["decoding"] = decoding
    return info


def steering_header(steering: RowSteering | None, digests: Mapping[str, str] | None = None) -> str:
    """`name=strength,...;position=mode[;digest=sha256:...,...]` (digests in the order of the profiles), or
    `none`."""
    if steering is None:
        return "none"
    applied = ",".join(f"{name}={strength:g}" for name, strength in steering.applied)
    header = f"{applied};position={steering.position_mode}"
    if digests:
        header += ";digest=" + ",".join(digests.get(name, "-") for name, _ in steering.applied)
    return header


def parse_model_alias(model: str, base: str) -> SteeringWish | None:
    """`<base>` -> None; `<base>:<profile>[@<strength>]` -> the wanted profile; anything else -> 404."""
    if model == base:
        return None
    prefix = base + ":"
    if not model.startswith(prefix) or len(model) == len(prefix):
        raise not_found(
            f"model {model!r} is not served here; use {base!r} or '{base}:<profile>[@<strength>]'",
            param="model",
            code="model_not_found",
        )
    rest = model[len(prefix) :]
    name, sep, strength_text = rest.partition("@")
    if not name:
        raise bad_request(f"model alias {model!r} names no profile; use '{base}:<profile>[@<strength>]'", "model")
    strength: float | None = None
    if sep:
        try:
            strength = float(strength_text)
        except ValueError:
            raise bad_request(f"model alias {model!r}: strength {strength_text!r} is not a number", "model") from None
    return SteeringWish(profile=name, strength=strength, position=None, param="model")


def wanted_steering(generation: Generation, base: str) -> list[SteeringWish]:
    """What a request asks for: the model alias's profile (checked against the served model `base`) first,
    then the `steering` entries."""
    alias = parse_model_alias(generation.model, base)
    return ([alias] if alias is not None else []) + list(generation.steering)


def resolve_steering(
    wanted: Sequence[SteeringWish],
    *,
    profiles: Mapping[str, Profile],
    strength_bounds: tuple[float, float],
    fingerprint: ModelFingerprint,
) -> RowSteering | None:
    """Resolve what a request asks for against one profile snapshot into a row's steering, validated once
    against the loaded model's `fingerprint` (the engine takes it as it is)."""
    if not wanted:
        return None

    low, high = strength_bounds
    chosen: list[tuple[Profile, float]] = []
    conditional: list[tuple[Profile, float]] = []
    for item in wanted:
        profile = profiles.get(item.profile)
        if profile is None:
            param = "model" if item.param == "model" else f"{item.param}.profile"
            raise not_found(f"profile {item.profile!r} is not loaded", param=param, code="profile_not_found")
        strength = profile.default_strength if item.strength is None else item.strength
        param = "model" if item.param == "model" else f"{item.param}.strength"
        if not math.isfinite(strength):
            raise bad_request(f"strength {strength} is not a finite number", param)
        if not low <= strength <= high:
            raise bad_request(f"strength {strength:g} is outside the allowed range [{low:g}, {high:g}]", param)
        if profile.condition is not None and item.condition == "honour":
            conditional.append((profile, float(strength)))  # joins the row's steering once its condition fires
        else:
            chosen.append((profile, float(strength)))

    overrides = {item.position for item in wanted if item.position is not None}
    if len(overrides) > 1:
        raise bad_request("steering entries ask for different token positions; use one", "steering")
    if overrides:
        position = overrides.pop()
    else:
        modes = {profile.position_mode for profile, _ in (*chosen, *conditional)}
        if len(modes) > 1:
            raise bad_request(
                "the profiles use different token-position modes; set 'position' in the steering entries",
                "steering",
            )
        position = modes.pop()
    try:
        return RowSteering.from_profiles(chosen, model=fingerprint, position_mode=position, conditional=conditional)
    except PlanError as exc:  # profiles are validated against the model when loaded: not expected
        raise bad_request(str(exc), "steering", code="invalid_steering") from None


# -- text ---------------------------------------------------------------------------------------------


class TextStream:
    """Incremental detokenisation with stop strings.

    Emits only text that is final: a trailing partial UTF-8 character (decoded as U+FFFD) and a
    trailing prefix of a stop string are held back until the next tokens decide them.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str], hidden_ids: frozenset[int]):
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._hidden = hidden_ids
        self._ids: list[int] = []
        self._sent = 0  # characters of the decoded text already emitted
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        self._ids.extend(t for t in token_ids if t not in self._hidden)
        text = self._decode(self._ids)
        stable_end = len(text)
        while stable_end > self._sent and text[stable_end - 1] == "\ufffd":
            stable_end -= 1
        return self._emit(text, stable_end, final=False)

    def finish(self) -> str:
        """Flush what was held back (the sequence ended)."""
        if self.stopped:
            return ""
        text = self._decode(self._ids)
        return self._emit(text, len(text), final=True)

    def _emit(self, text: str, end: int, *, final: bool) -> str:
        if self._stop:
            start = max(0, self._sent - max(len(s) for s in self._stop) + 1)
            hits = [(i, s) for s in self._stop if (i := text.find(s, start, end)) >= 0]
            if hits:
                cut = min(i for i, _ in hits)
                delta = text[self._sent : cut] if cut > self._sent else ""
                self._sent = max(self._sent, cut)
                self.stopped = True
                return delta
            if not final:
                end -= self._held_prefix(text[:end])
        delta = text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return delta

    def _held_prefix(self, text: str) -> int:
        longest = 0
        for stop in self._stop:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    longest = max(longest, k)
                    break
        return longest


# -- choices ------------------------------------------------------------------------------------------


@dataclass
class Update:
    """What one choice produced since its previous update."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    token_count: int = 0
    conditions: list[ConditionResult] | None = None


async def _merge(streams: list[AsyncIterator[Update]]) -> AsyncIterator[Update]:
    """Interleave the updates of several choices as they come."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for item in only:
                yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[Update]) -> None:
        try:
            async with aclosing(stream) as s:  # type: ignore[type-var]
                async for item in s:
                    await queue.put(item)
        except Exception as exc:
            await queue.put(exc)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Prepared:
    """A request turned into engine work: one GenerationRequest per choice."""

    id: str
    created: int
    model: str
    requests: list[GenerationRequest]
    prompt_texts: list[str]  # per choice (for echo)
    prompt_tokens: int
    steering: RowSteering | None
    stop: list[str]
    digests: Mapping[str, str] = field(default_factory=dict)  # profile name -> the digest of the file used
    # conditional profiles, as the engine decided them on the prompt (every choice reads the same prompt)
    conditions: dict[str, ConditionResult] | None = None

    @property
    def steering_header(self) -> str:
        return steering_header(self.steering, self.digests)

    @property
    def steering_info(self) -> dict[str, Any] | None:
        return steering_info(self.steering, self.digests, self.conditions,
                             self.requests[0].open_sampling if self.requests else frozenset())


class Serving:
    """The serving layer of one model: shared by the chat and completion routes."""

    def __init__(
        self,
        *,
        engine: Engine,
        tokenizer: Any,
        registry: ProfileRegistry,
        settings: Settings,
        model_name: str,
        stop_token_ids: frozenset[int] = frozenset(),
        metrics: Any | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.registry = registry
        self.settings = settings
        self.model_name = model_name
        self.stop_token_ids = stop_token_ids
        self.metrics = metrics
        self.grammars = Grammars(tokenizer, stop_token_ids)  # llguidance's tokenizer is built on first use

    # -- preparing ----------------------------------------------------------------------------------

    def _steering(self, generation: Generation) -> tuple[RowSteering | None, dict[str, str]]:
        """The request's steering and the digests of the profile files it uses, from one view of the store in
        which every named profile is as its file is now (loaded on a miss, gone when deleted)."""
        wanted = wanted_steering(generation, self.model_name)
        names = [item.profile for item in wanted]
        state = self.registry.lookup(names) if names else self.registry.state()
        steering = resolve_steering(
            wanted,
            profiles=state.profiles,
            strength_bounds=(self.settings.strength_min, self.settings.strength_max),
            fingerprint=self.registry.fingerprint,
        )
        if steering is not None and steering.conditional and not self.engine.supports_conditions:
            names = ", ".join(repr(profile.name) for profile, _ in steering.conditional)
            raise bad_request(f"profile {names} has a condition, which this server's backend does not evaluate; "
                              "set \"condition\": \"ignore\" in its steering entry to apply it always",
                              "steering", code="unsupported_parameter")
        digests = {name: state.entries[name].digest for name, _ in steering.applied} if steering else {}
        if self.metrics is not None:
            for name, _ in steering.applied if steering else ():
                self.metrics.profile_requests.labels(profile=name).inc()
        return steering, digests

    def _max_new_tokens(
        self, prompt_len: int, requested: int | None, param: str, prompt_param: str, default: int | None = None
    ) -> int:
        """`requested`, checked against the limit and the context window; None: `default` (the server's
        default_max_tokens when None), cut to the limit and to what the context window leaves."""
        context = self.engine.max_context
        where = "messages" if prompt_param == "messages" else "prompt"
        if prompt_len >= context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens (max_model_len). However, your "
                f"{where} has {prompt_len} tokens, which leaves no room for a completion. Please reduce the "
                f"length of the {where}.",
                prompt_param,
                code="context_length_exceeded",
            )
        if requested is None:
            wanted = self.settings.default_max_tokens if default is None else default
            return min(wanted, self.settings.max_tokens_limit, context - prompt_len)
        if requested > self.settings.max_tokens_limit:
            limit = self.settings.max_tokens_limit
            raise bad_request(f"{param} {requested} exceeds this server's limit of {limit}", param)
        if prompt_len + requested > context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens (max_model_len). However, you "
                f"requested {prompt_len + requested} tokens ({prompt_len} in the {where}, {requested} in "
                f"{param}). Please reduce the length of the {where} or {param}.",
                param,
                code="context_length_exceeded",
            )
        return requested

    def _check_n(self, n: int) -> None:
        if n > self.settings.max_n:
            raise bad_request(f"n {n} exceeds this server's limit of {self.settings.max_n}", "n")

    def _encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _chat_text(self, turns: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True) -> str:
        try:
            return self.tokenizer.apply_chat_template([dict(turn) for turn in turns],
                                                      add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as exc:  # no template, or a template that rejects the roles used
            raise bad_request(f"the model's chat template cannot format these messages: {exc}", "messages") from None

    def chat_prompt(self, turns: Sequence[Mapping[str, str]]) -> list[int]:
        return self._encode(self._chat_text(turns), add_special_tokens=False)

    def tokenize(self, request: TokenizeRequest) -> list[int]:
        """The token ids of a `/tokenize` request: its prompt, or its messages through the chat template, as a
        chat completion would see them (special tokens as the request, with its defaults, says)."""
        turns, special = request.turns, bool(request.add_special_tokens)
        if turns is not None:
            text = self._chat_text(turns, add_generation_prompt=request.add_generation_prompt)
            return self._encode(text, add_special_tokens=special)
        return self._encode(request.prompt or "", add_special_tokens=special)

    async def compile_response_format(self, request: ChatCompletionRequest) -> None:
        """Compile the request's response format in a worker thread (the first one also builds llguidance's
        tokenizer, about a second for a 49k vocabulary), so that `prepare_chat` finds it compiled and the
        event loop never waits for a grammar; errors are `prepare_chat`'s to report."""
        if request.response_format is not None and (self.engine.supports_constraints
                                                    or self.engine.supports_json_schema):
            try:
                await asyncio.to_thread(self.grammars.compile, request.response_format)
            except ResponseFormatError:
                pass

    def _constraints(self, generation: Generation) -> list[TokenConstraint | None]:
        """One constraint per choice for a request with a response format (each its own grammar state)."""
        fmt = generation.response_format
        if fmt is None:
            return [None] * generation.n
        if not self.engine.supports_constraints and not self.engine.supports_json_schema:
            raise bad_request(f"response_format {fmt.type!r} is not supported by this server's backend",
                              "response_format", code="unsupported_parameter")
        try:
            if not self.engine.supports_constraints:  # the engine applies the schema itself: check it compiles
                self.grammars.compile(fmt)
                return [None] * generation.n
            return [self.grammars.constraint(fmt) for _ in range(generation.n)]
        except ResponseFormatError as exc:
            raise bad_request(f"response_format: {exc}", "response_format") from None

    def _json_schema(self, generation: Generation) -> dict[str, Any] | None:
        """The schema handed to an engine that applies response formats itself (`supports_json_schema`)."""
        fmt = generation.response_format
        if fmt is None or self.engine.supports_constraints or not self.engine.supports_json_schema:
            return None
        return schema_for(fmt)[0]

    def _sampling(self, generation: Generation, max_new: int, index: int) -> SamplingParams:
        """Choice `index`'s sampling: the request's, with the server's stop token ids, and its default
        repetition penalty where the request sets none."""
        return generation.sampling(index, max_new, self.stop_token_ids, self.settings.default_repetition_penalty)

    def prepare_chat(self, request: ChatCompletionRequest) -> Prepared:
        asked = request.generation()
        self._check_n(asked.n)
        prompt_ids = self.chat_prompt(asked.turns)
        max_new = self._max_new_tokens(len(prompt_ids), asked.max_tokens, asked.max_tokens_param, "messages")
        steering, digests = self._steering(asked)
        constraints = self._constraints(asked)
        schema = self._json_schema(asked)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        requests = [
            GenerationRequest(
                request_id=f"{rid}-{i}",
                prompt_ids=prompt_ids,
                sampling=self._sampling(asked, max_new, i),
                steering=steering,
                constraint=constraints[i],
                json_schema=schema,
                open_sampling=asked.open_sampling,
            )
            for i in range(asked.n)
        ]
        return Prepared(rid, int(time.time()), asked.model, requests, [""] * asked.n, len(prompt_ids),
                        steering, list(asked.stop), digests)

    def prepare_completion(self, request: CompletionRequest) -> Prepared:
        asked = request.generation()
        self._check_n(asked.n)
        prompts, n = asked.prompts, asked.n
        # a batch larger than the engine's running rows plus queue could never be admitted whole: refuse it
        # here (400, not a 429 that invites a retry) before tokenising anything or admitting any part of it
        limit = self.settings.max_batch_size + self.settings.max_queue
        if len(prompts) * n > limit:
            raise bad_request(
                f"this request asks for {len(prompts) * n} completions ({len(prompts)} prompts x n "
                f"{n}); this server runs and queues at most {limit} at once",
                "prompt",
            )
        steering, digests = self._steering(asked)
        rid = f"cmpl-{uuid.uuid4().hex}"
        requests: list[GenerationRequest] = []
        texts: list[str] = []
        prompt_tokens = 0
        vocab = len(self.tokenizer)
        for p, prompt in enumerate(prompts):
            if isinstance(prompt, str):
                ids, text = self._encode(prompt, add_special_tokens=True), prompt
            else:
                bad = [t for t in prompt if not 0 <= t < vocab]
                if bad:
                    raise bad_request(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "prompt")
                ids, text = list(prompt), self.tokenizer.decode(prompt)
            if not ids:
                raise bad_request("the prompt is empty after tokenisation", "prompt")
            max_new = self._max_new_tokens(len(ids), asked.max_tokens, asked.max_tokens_param, "prompt",
                                           default=asked.default_max_tokens)
            prompt_tokens += len(ids)
            for i in range(n):
                requests.append(
                    GenerationRequest(
                        request_id=f"{rid}-{p * n + i}",
                        prompt_ids=ids,
                        sampling=self._sampling(asked, max_new, i),
                        steering=steering,
                        open_sampling=asked.open_sampling,
                    )
                )
                texts.append(text)
        return Prepared(rid, int(time.time()), asked.model, requests, texts, prompt_tokens, steering,
                        list(asked.stop), digests)

    # -- running ------------------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    async def _choice(self, index: int, request: GenerationRequest, stop: list[str]) -> AsyncIterator[Update]:
        text = TextStream(self._decode, stop, request.sampling.stop_token_ids)
        async with aclosing(self.engine.generate(request)) as events:  # type: ignore[type-var]
            async for event in events:
                update = Update(index=index, prompt_logprobs=event.prompt_logprobs, token_count=len(event.token_ids),
                                conditions=event.conditions)
                update.text = text.add(event.token_ids)
                if event.logprobs:
                    update.logprobs = list(event.logprobs)
                if text.stopped:
                    update.finish_reason = "stop"
                    yield update
                    return  # leaving the block closes the engine stream: the row stops
                if event.finish_reason is not None:
                    update.text += text.finish()
                    update.finish_reason = event.finish_reason
                    yield update
                    return
                yield update

    async def run(self, prepared: Prepared) -> AsyncIterator[Update]:
        """Updates of all choices, interleaved; records token and latency metrics."""
        started = time.perf_counter()
        first = True
        completion_tokens = 0
        streams = [self._choice(i, r, prepared.stop) for i, r in enumerate(prepared.requests)]
        try:
            async for update in _merge(streams):
                if update.conditions and prepared.conditions is None:
                    prepared.conditions = {result.profile: result for result in update.conditions}
                    if self.metrics is not None:
                        for result in update.conditions:
                            self.metrics.conditions.labels(profile=result.profile,
                                                           fired=str(result.applied).lower()).inc()
                if first and update.token_count:
                    first = False
                    if self.metrics is not None:
                        self.metrics.ttft.observe(time.perf_counter() - started)
                completion_tokens += update.token_count
                yield update
        finally:
            if self.metrics is not None:
                self.metrics.tokens.labels(kind="prompt").inc(prepared.prompt_tokens)
                self.metrics.tokens.labels(kind="completion").inc(completion_tokens)

    async def started(self, prepared: Prepared) -> tuple[Update | None, AsyncIterator[Update]]:
        """Start the run and wait for its first update, so that admission errors (429/503) surface
        before a stream's headers are sent. Returns (first update, the rest)."""
        updates = self.run(prepared)
        try:
            first = await updates.__anext__()
        except StopAsyncIteration:
            return None, updates
        except BaseException:
            await updates.aclose()
            raise
        return first, updates

    # -- chat ---------------------------------------------------------------------------------------

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _chat_logprob(self, lp: TokenLogprob) -> dict[str, Any]:
        text = self._token_text(lp.token_id)
        return {
            "token": text,
            "logprob": lp.logprob,
            "bytes": list(text.encode("utf-8")),
            "top_logprobs": [
                {"token": (t := self._token_text(i)), "logprob": v, "bytes": list(t.encode("utf-8"))}
                for i, v in lp.top
            ],
        }

    def _visible(self, logprobs: list[TokenLogprob]) -> list[TokenLogprob]:
        return [lp for lp in logprobs if lp.token_id not in self.stop_token_ids]

    def _usage(self, prepared: Prepared, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": prepared.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prepared.prompt_tokens + completion_tokens,
        }

    async def chat_completion(self, request: ChatCompletionRequest, prepared: Prepared) -> dict[str, Any]:
        n = len(prepared.requests)
        texts = [""] * n
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        finish: list[str | None] = [None] * n
        tokens = 0
        first, rest = await self.started(prepared)
        async with aclosing(rest) as updates:  # type: ignore[type-var]
            pending = [first] if first is not None else []
            async for update in _chain(pending, updates):
                texts[update.index] += update.text
                logprobs[update.index].extend(update.logprobs)
                tokens += update.token_count
                if update.finish_reason:
                    finish[update.index] = update.finish_reason
        choices = []
        for i in range(n):
            lp = {"content": [self._chat_logprob(x) for x in self._visible(logprobs[i])]} if request.logprobs else None
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": texts[i]},
                    "logprobs": lp,
                    "finish_reason": finish[i] or "length",
                }
            )
        return {
            "id": prepared.id,
            "object": "chat.completion",
            "created": prepared.created,
            "model": prepared.model,
            "choices": choices,
            "usage": self._usage(prepared, tokens),
            "steering": prepared.steering_info,
        }

    async def chat_stream(
        self, request: ChatCompletionRequest, prepared: Prepared, first: Update | None, rest: AsyncIterator[Update]
    ) -> AsyncIterator[dict[str, Any]]:
        """Chunks of a streamed chat completion (the route adds SSE framing and `[DONE]`)."""
        usage_field = {"usage": None} if request.include_usage else {}

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {
                "id": prepared.id,
                "object": "chat.completion.chunk",
                "created": prepared.created,
                "model": prepared.model,
                "choices": choices,
                **usage_field,
                **extra,
            }

        n = len(prepared.requests)
        roles = [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(n)
        ]
        yield chunk(roles, steering=prepared.steering_info)
        tokens = 0
        async with aclosing(rest) as updates:  # type: ignore[type-var]
            async for update in _chain([first] if first is not None else [], updates):
                tokens += update.token_count
                visible = self._visible(update.logprobs)
                if update.text or (request.logprobs and visible):
                    lp = {"content": [self._chat_logprob(x) for x in visible]} if request.logprobs else None
                    yield chunk([{"index": update.index, "delta": {"content": update.text}, "logprobs": lp,
                                  "finish_reason": None}])
                if update.finish_reason:
                    yield chunk([{"index": update.index, "delta": {}, "logprobs": None,
                                  "finish_reason": update.finish_reason}])
        if request.include_usage:
            yield {**chunk([]), "usage": self._usage(prepared, tokens)}

    # -- completions --------------------------------------------------------------------------------

    def _legacy_logprobs(
        self,
        prompt: list[TokenLogprob | None] | None,
        prompt_ids: list[int],
        generated: list[TokenLogprob],
        offset: int,
    ) -> dict[str, Any]:
        tokens: list[str] = []
        values: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        offsets: list[int] = []
        position = offset

        def add(token_id: int, lp: TokenLogprob | None) -> None:
            nonlocal position
            text = self._token_text(token_id)
            tokens.append(text)
            values.append(None if lp is None else lp.logprob)
            tops.append(None if lp is None else {self._token_text(i): v for i, v in lp.top})
            offsets.append(position)
            position += len(text)

        if prompt is not None:
            for token_id, lp in zip(prompt_ids, prompt, strict=False):
                add(token_id, lp)
        for lp in generated:
            add(lp.token_id, lp)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    async def completion(self, request: CompletionRequest, prepared: Prepared) -> dict[str, Any]:
        n = len(prepared.requests)
        texts = [""] * n
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        prompt_lps: list[list[TokenLogprob | None] | None] = [None] * n
        finish: list[str | None] = [None] * n
        tokens = 0
        first, rest = await self.started(prepared)
        async with aclosing(rest) as updates:  # type: ignore[type-var]
            async for update in _chain([first] if first is not None else [], updates):
                texts[update.index] += update.text
                logprobs[update.index].extend(update.logprobs)
                if update.prompt_logprobs is not None:
                    prompt_lps[update.index] = update.prompt_logprobs
                tokens += update.token_count
                if update.finish_reason:
                    finish[update.index] = update.finish_reason
        choices = []
        for i in range(n):
            prefix = prepared.prompt_texts[i] if request.echo else ""
            lp = None
            if request.logprobs is not None:
                lp = self._legacy_logprobs(
                    prompt_lps[i] if request.echo else None,
                    prepared.requests[i].prompt_ids,
                    self._visible(logprobs[i]),
                    0,
                )
            choices.append(
                {"index": i, "text": prefix + texts[i], "logprobs": lp, "finish_reason": finish[i] or "length"}
            )
        return {
            "id": prepared.id,
            "object": "text_completion",
            "created": prepared.created,
            "model": prepared.model,
            "choices": choices,
            "usage": self._usage(prepared, tokens),
            "steering": prepared.steering_info,
        }

    async def completion_stream(
        self, request: CompletionRequest, prepared: Prepared, first: Update | None, rest: AsyncIterator[Update]
    ) -> AsyncIterator[dict[str, Any]]:
        usage_field = {"usage": None} if request.include_usage else {}

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {"id": prepared.id, "object": "text_completion", "created": prepared.created,
                    "model": prepared.model, "choices": choices, **usage_field, **extra}

        tokens = 0
        echoed: set[int] = set()
        offsets = [0] * len(prepared.requests)
        async with aclosing(rest) as updates:  # type: ignore[type-var]
            async for update in _chain([first] if first is not None else [], updates):
                tokens += update.token_count
                text = update.text
                prompt_lp = None
                if request.echo and update.index not in echoed:
                    echoed.add(update.index)
                    text = prepared.prompt_texts[update.index] + text
                    prompt_lp = update.prompt_logprobs
                lp = None
                if request.logprobs is not None:
                    lp = self._legacy_logprobs(
                        prompt_lp, prepared.requests[update.index].prompt_ids, self._visible(update.logprobs),
                        offsets[update.index],
                    )
                offsets[update.index] += len(text)
                if text or update.finish_reason or (lp and lp["tokens"]):
                    extra = {"steering": prepared.steering_info} if update is first else {}
                    yield chunk([{"index": update.index, "text": text, "logprobs": lp,
                                  "finish_reason": update.finish_reason}], **extra)
        if request.include_usage:
            yield {**chunk([]), "usage": self._usage(prepared, tokens)}


async def _chain(head: list[Update], tail: AsyncIterator[Update]) -> AsyncIterator[Update]:
    for item in head:
        yield item
    async for item in tail:
        yield item
