"""`VllmEngine`: the `base.Engine` of the vLLM backend, over vLLM's `LLMEngine` driven from one thread.

One thread owns the vLLM engine, as the transformers backend's scheduler thread owns its model: it takes
new requests and cancellations between steps, keeps the profile slots of the workers current, calls
`LLMEngine.step()` while anything runs and hands each request's new tokens to its asyncio queue. The
engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the default on CPUs here) or in
vLLM's own processes (tensor/pipeline parallel workers); the loop is the same.

Profiles reach the workers as slots (`worker.SteeringTables`): the first request naming a profile (by
the sha256 of its file bytes, so one file is one slot everywhere and a replaced file is a new slot)
loads it into a free slot on every worker with `collective_rpc("rahf_load")`, between two steps; its
requests carry only slots, strengths and the position mode (`SamplingParams.extra_args`). A slot is
reference-counted by the running requests that use it: a profile replaced or deleted mid-stream keeps
serving the requests that started with it (their snapshot), and its slot is reused (least recently
used first) once none does. Every steered request gets a prefix-cache salt made from its profiles'
digests, strengths and mode, so it never shares KV blocks with unsteered requests or other steerings.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from steering_vectors.core.errors import PlanError
from steering_vectors.core.profile import Profile

from ..base import (
    Engine,
    EngineError,
    EngineEvent,
    EngineOverloadedError,
    EngineShutdownError,
    GenerationRequest,
    RowSteering,
    TokenLogprob,
    drain_and_stop,
    queued_events,
    with_profile_decoding,
)
from .worker import RequestSteering

log = logging.getLogger(__name__)


def profile_digest(profile: Profile, _cache: dict[int, tuple[Any, str]] = {}) -> str:  # noqa: B006
    """sha256 of the profile's canonical file bytes (the digest the store serves it under), computed once
    per profile object (a request's snapshot holds the object)."""
    key = id(profile)
    hit = _cache.get(key)
    if hit is not None and hit[0]() is profile:
        return hit[1]
    digest = hashlib.sha256(profile.to_bytes()).hexdigest()
    _cache[key] = (weakref.ref(profile, lambda _ref, key=key: _cache.pop(key, None)), digest)
    return digest


def steering_entries(steering: RowSteering) -> list[tuple[Profile, float]]:
    """The (profile, strength) entries of a request's steering; a combination made without profiles (its
    `sources` empty) becomes one profile of its summed terms at strength 1."""
    if steering.sources:
        return list(steering.sources)
    combined = Profile(name="combination", offsets=dict(steering.offsets), low_rank=dict(steering.low_rank),
                       lora={layer: dict(terms) for layer, terms in steering.lora.items()},
                       position_mode=steering.position_mode, created=0.0)
    return [(combined, 1.0)]


def cache_salt(digests: Sequence[str], strengths: Sequence[float], mode: str) -> str:
    """The prefix-cache salt of a steering: equal steerings share KV blocks, others never do."""
    key = json.dumps([mode, sorted(zip(digests, strengths, strict=True))])
    return "rahf-" + hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass
class _Sequence:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    slots: list[int] = field(default_factory=list)
    added: bool = False
    finished: bool = False
    cancelled: bool = False
    prompt_logprobs_sent: bool = False
    drop_tokens: bool = False  # max_new_tokens 0: vLLM makes one token, the client gets none


class SlotTable:
    """Which profile digest sits in which worker slot, and how many running requests use it."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.slot_of: OrderedDict[str, int] = OrderedDict()  # digest -> slot, least recently used first
        self.refs: dict[int, int] = {}
        self.free = list(range(1, num_slots))

    def acquire(self, digest: str) -> tuple[int, bool]:
        """(slot, whether it must be loaded). Raises EngineOverloadedError when every slot is in use."""
        slot = self.slot_of.get(digest)
        if slot is not None:
            self.slot_of.move_to_end(digest)
            self.refs[slot] = self.refs.get(slot, 0) + 1
            return slot, False
        if not self.free:
            idle = next((d for d, s in self.slot_of.items() if not self.refs.get(s)), None)
            if idle is None:
                raise EngineOverloadedError(
                    f"all {self.num_slots - 1} profile slots are used by running requests; retry when some finish "
                    "(or raise vllm_max_profiles)"
                )
            self.free.append(self.slot_of.pop(idle))
        slot = self.free.pop(0)
        self.slot_of[digest] = slot
        self.refs[slot] = 1
        return slot, True

    def forget(self, digest: str) -> None:
        """A load that failed: the slot holds nothing usable."""
        slot = self.slot_of.pop(digest, None)
        if slot is not None:
            self.refs.pop(slot, None)
            self.free.append(slot)

    def release(self, slots: Sequence[int]) -> None:
        for slot in slots:
            if self.refs.get(slot):
                self.refs[slot] -= 1


class VllmEngine(Engine):
    """Runs generation requests on a vLLM `LLMEngine` with per-request steering (module docstring)."""

    supports_json_schema = True  # response_format through vLLM's structured outputs

    def __init__(self, llm: Any, *, max_batch_size: int, max_queue: int, retry_after: float, max_context: int,
                 num_slots: int, fingerprint: Any) -> None:
        self.llm = llm
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.retry_after = retry_after
        self._max_context = max_context
        self.fingerprint = fingerprint
        self.slots = SlotTable(num_slots)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: list[_Sequence] = []
        self._cancels: list[_Sequence] = []
        self._chores: list[tuple[Any, threading.Event, list[Any]]] = []
        self._seqs: dict[str, _Sequence] = {}
        self._in_flight = 0
        self._accepting = True
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the Engine interface -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread (again, after a `shutdown`: the vLLM engine itself lives as long as this
        object, so one engine can serve several apps in turn, as the tests do)."""
        with self._lock:
            self._accepting, self._stopping = True, False
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rahf-vllm-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        drain_and_stop(self, timeout)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        seq = self._submit(request, asyncio.get_running_loop())
        try:
            async with aclosing(queued_events(seq.events)) as events:
                async for event in events:
                    yield event
        finally:
            if not seq.finished:
                with self._lock:
                    seq.cancelled = True
                    self._cancels.append(seq)
                    self._wake.notify_all()

    @property
    def max_context(self) -> int:
        return self._max_context

    def stats(self) -> dict[str, int]:
        with self._lock:
            running = sum(1 for s in self._seqs.values() if s.added)
            return {"running": running, "waiting": self._in_flight - running,
                    "profile_slots_used": len(self.slots.slot_of)}

    def on_workers(self, method: str, *args: Any, timeout: float = 60.0) -> list[Any]:
        """`collective_rpc(method, args)` on every worker, between two steps (`between_steps`)."""
        return self.between_steps(lambda: self.llm.collective_rpc(method, args=args), timeout=timeout)

    def between_steps(self, work: Any, *, timeout: float = 60.0) -> Any:
        """`work()` run by the engine thread between two steps (so it never races a forward); blocks the
        calling thread (never the engine's) until it is done, and returns its result."""
        done, result = threading.Event(), []
        with self._lock:
            if self._thread is None or self._stopping:
                raise EngineShutdownError("the engine is not running")
            self._chores.append((work, done, result))
            self._wake.notify_all()
        if not done.wait(timeout):
            raise TimeoutError(f"work between engine steps did not finish within {timeout} s")
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    # -- submission (event loop) --------------------------------------------------------------------

    def _submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> _Sequence:
        prompt_len = len(request.prompt_ids)
        if prompt_len == 0:
            raise ValueError("the prompt has no tokens")
        if prompt_len >= self._max_context:
            raise ValueError(f"the prompt has {prompt_len} tokens; this engine holds {self._max_context}")
        if request.constraint is not None:
            raise ValueError("the vLLM backend takes no token constraints (it applies json_schema itself)")
        steering = request.steering
        if steering is not None and not steering.fits(self.fingerprint):
            raise PlanError(
                f"the steering was made for a model with {steering.num_layers} layers of size "
                f"{steering.hidden_size}; this engine's model has {self.fingerprint.num_layers} of size "
                f"{self.fingerprint.hidden_size}"
            )
        # no conditions here (the serving layer refuses them): the steering is final, so are its decoding defaults
        seq = _Sequence(request=with_profile_decoding(request, steering), loop=loop, events=asyncio.Queue())
        with self._lock:
            if not self._accepting:
                raise EngineShutdownError("the engine is not accepting requests")
            if self._in_flight >= self.max_batch_size + self.max_queue:
                raise EngineOverloadedError(
                    f"{self._in_flight} requests in flight (limit {self.max_batch_size + self.max_queue})",
                    retry_after=self.retry_after,
                )
            self._in_flight += 1
            self._inbox.append(seq)
            self._wake.notify_all()
        return seq

    # -- the engine thread --------------------------------------------------------------------------

    def _run(self) -> None:
        busy = False
        while True:
            with self._lock:
                while not (self._inbox or self._cancels or self._chores or self._stopping or busy):
                    self._wake.wait()
                chores, self._chores = self._chores, []
                if self._stopping:
                    pending = list(self._seqs.values()) + self._inbox
                    self._inbox = []
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
            for work, done, result in chores:
                try:
                    result.append(work())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    result.append(exc)
                done.set()
            for seq in cancels:
                self._cancel(seq)
            for seq in inbox:
                if seq.cancelled:
                    self._finish(seq)
                    continue
                try:
                    self._add(seq)
                except Exception as exc:  # noqa: BLE001 - this request fails alone
                    log.warning("request %s refused by the vLLM engine: %s", seq.request.request_id, exc)
                    self._fail(seq, exc)
            if self._seqs:
                try:
                    outputs = self.llm.step()
                except Exception as exc:  # noqa: BLE001 - the engine is gone: fail everything running
                    log.exception("vLLM engine step failed")
                    for seq in list(self._seqs.values()):
                        self._fail(seq, EngineError(f"the vLLM engine failed: {exc}"))
                    busy = False
                    continue
                for output in outputs:
                    seq = self._seqs.get(output.request_id)
                    if seq is None:
                        continue
                    try:
                        self._deliver(seq, output)
                    except Exception as exc:  # noqa: BLE001 - this request fails alone
                        log.exception("delivering request %s failed", seq.request.request_id)
                        self._fail(seq, EngineError(f"reading the vLLM output failed: {exc}"))
            busy = bool(self._seqs)
        for seq in pending:
            if not seq.finished:
                self._fail(seq, EngineShutdownError("the engine stopped"))
        for _, done, result in chores:
            result.append(EngineShutdownError("the engine stopped"))
            done.set()

    def _add(self, seq: _Sequence) -> None:
        from vllm import SamplingParams as VllmSampling
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        request, params = seq.request, seq.request.sampling
        extra: dict[str, Any] | None = None
        salt: str | None = None
        if request.steering is not None:
            entries = steering_entries(request.steering)
            digests = [profile_digest(profile) for profile, _ in entries]
            try:
                for (profile, _), digest in zip(entries, digests, strict=True):
                    slot, load = self.slots.acquire(digest)
                    seq.slots.append(slot)
                    if load:
                        try:
                            self.llm.collective_rpc("rahf_load", args=(slot, profile.to_bytes()))
                        except BaseException:
                            self.slots.forget(digest)
                            seq.slots.pop()
                            raise
            except BaseException:
                self.slots.release(seq.slots)
                seq.slots = []
                raise
            strengths = [strength for _, strength in entries]
            mode = request.steering.position_mode
            extra = {"rahf": RequestSteering(tuple(seq.slots), tuple(strengths), mode).to_extra()}
            salt = cache_salt(digests, strengths, mode)
        seq.drop_tokens = params.max_new_tokens == 0
        top_k = params.top_k if params.top_k > 0 else 0
        wants_logprobs = params.logprobs or params.top_logprobs > 0
        sampling = VllmSampling(
            n=1,
            max_tokens=max(1, params.max_new_tokens),
            temperature=max(0.0, params.temperature),
            top_p=params.top_p,
            top_k=top_k,
            min_p=params.min_p,
            seed=params.seed,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            stop_token_ids=sorted(params.stop_token_ids),
            ignore_eos=True,  # the request's stop ids are the whole list (they include the model's eos)
            logprobs=params.top_logprobs if wants_logprobs else None,
            prompt_logprobs=params.top_logprobs if params.prompt_logprobs else None,
            detokenize=False,  # the serving layer detokenises (UTF-8 hold-back, stop strings)
            output_kind=RequestOutputKind.DELTA,
            extra_args=extra,
            # the engine's structured_outputs_config writes JSON as the transformers backend does (__init__.py)
            structured_outputs=(None if request.json_schema is None
                                else StructuredOutputsParams(json=request.json_schema)),
        )
        self.llm.add_request(request.request_id, tokens_input(list(request.prompt_ids), cache_salt=salt), sampling)
        seq.added = True
        with self._lock:
            self._seqs[request.request_id] = seq

    def _deliver(self, seq: _Sequence, output: Any) -> None:
        completion = output.outputs[0] if output.outputs else None
        event = EngineEvent()
        if seq.request.sampling.prompt_logprobs and not seq.prompt_logprobs_sent and output.prompt_logprobs:
            event.prompt_logprobs = [
                None if entry is None else _logprob(token, entry, seq.request.sampling.top_logprobs)
                for token, entry in zip(seq.request.prompt_ids, output.prompt_logprobs, strict=False)
            ]
            seq.prompt_logprobs_sent = True
        if completion is not None and not seq.drop_tokens:
            event.token_ids = list(completion.token_ids)
            wanted = seq.request.sampling.logprobs or seq.request.sampling.top_logprobs > 0
            if wanted and completion.logprobs:
                event.logprobs = [_logprob(token, entry, seq.request.sampling.top_logprobs)
                                  for token, entry in zip(event.token_ids, completion.logprobs, strict=False)]
        if output.finished:
            reason = completion.finish_reason if completion is not None else None
            event.finish_reason = "length" if seq.drop_tokens or reason != "stop" else "stop"
            self._finish(seq)
        if event.token_ids or event.finish_reason or event.prompt_logprobs:
            _post(seq, event)

    def _cancel(self, seq: _Sequence) -> None:
        if seq.added and not seq.finished:
            try:
                self.llm.abort_request([seq.request.request_id])
            except Exception:  # noqa: BLE001 - already gone
                log.debug("abort of %s failed", seq.request.request_id, exc_info=True)
        self._finish(seq)

    def _finish(self, seq: _Sequence) -> None:
        if seq.finished:
            return
        seq.finished = True
        self.slots.release(seq.slots)
        with self._lock:
            self._seqs.pop(seq.request.request_id, None)
            self._in_flight -= 1

    def _fail(self, seq: _Sequence, error: BaseException) -> None:
        if seq.added and not seq.finished:
            try:
                self.llm.abort_request([seq.request.request_id])
            except Exception:  # noqa: BLE001
                pass
        self._finish(seq)
        _post(seq, error)


def _post(seq: _Sequence, item: Any) -> None:
    """Hand `item` to the request's queue on its event loop; a loop that has closed meanwhile (its client
    went away) takes nothing."""
    if seq.cancelled:
        return
    try:
        seq.loop.call_soon_threadsafe(seq.events.put_nowait, item)
    except RuntimeError:  # the loop is closed
        log.debug("request %s: its event loop closed", seq.request.request_id)


def _logprob(token: int, entry: dict[int, Any], top: int) -> TokenLogprob:
    """vLLM's {token id: Logprob(logprob, rank)} of one position as a TokenLogprob: the chosen token's
    logprob and the `top` best, best first."""
    chosen = entry.get(token)
    ranked = sorted(entry.items(), key=lambda item: (item[1].rank if item[1].rank is not None else 1 << 30))
    best = tuple((int(t), float(lp.logprob)) for t, lp in ranked[:top]) if top else ()
    return TokenLogprob(token_id=int(token), logprob=float(chosen.logprob) if chosen is not None else float("nan"),
                        top=best)
