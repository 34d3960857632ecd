"""Continuous batching: one scheduler thread runs many sequences through the model, steering each row.

Knows token ids, a transformers decoder-only model, a preallocated per-slot KV cache, the steering
hooks and per-row sampling. Knows nothing about HTTP, text or tokenisers (stop strings are the serving
layer's; stop token ids arrive in `SamplingParams`).

How a step works (gpt-fast style: the hot path is `_decode_step`, one forward for every running row):

1. Sequences in the running batch own cache rows ``0..n-1`` (kept contiguous: a leaving row is
   replaced by the last one), so the decode forward reads the cache as a view, never a gather.
2. Waiting sequences are prefilled one at a time into row ``n`` in chunks of at most
   ``prefill_chunk`` tokens; between chunks the running rows decode, so a long prompt never stalls
   the others for more than one chunk. After its last chunk a sequence samples its first token and
   joins the batch as row ``n``.
3. Rows sit at different lengths: every forward passes explicit position ids and a 4-D attention mask
   (row i sees keys ``0..pos_i``), and the cache writes each row's new K/V at its own position.
4. The steering plan of the decode step is the stack of the rows' offsets; it is rebuilt only when the
   batch composition changes. Prefill chunks get their own one-row plan (with the position mask of
   the row's mode).
5. Requests join, finish, or are cancelled only between steps; the asyncio side talks to the thread
   through a lock-protected inbox and `call_soon_threadsafe`. Other work on the model (a profile fit's
   forward passes, `run_between_steps`) runs on the same thread, one piece after each step, so running
   rows wait at most one piece.
6. A failure that belongs to one request (its prefill, its sampling, its constraint) fails that request
   only; a failed batched decode forward fails the rows in it.
7. A row with a `TokenConstraint` (the serving layer's grammar for `response_format`) has its logits
   masked to the tokens the constraint allows before its token is picked, in the same batched step as
   every other row; the picked token advances the constraint, and a constraint that is done ends the
   row with "stop". Constrained, steered and plain rows share one batch.

Device-agnostic: tensors are made on the model's device, plans are built there, each row's generator
lives on its logits' device, and the transformers version's cache argument and mask format come from
`compat`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from steering_vectors.core.errors import PlanError
from steering_vectors.core.hooks import RowSteering, Steerer, SteeringPlan, build_plan, plan_for_rows

from ..base import (
    ConditionResult,
    Engine,
    EngineError,
    EngineEvent,
    EngineOverloadedError,
    EngineShutdownError,
    GenerationRequest,
    TokenLogprob,
    drain_and_stop,
    queued_events,
    with_profile_decoding,
)
from ..sampling import make_generator, select_tokens, token_logprob
from . import compat
from .cache import SlotCache
from .fastdecode import LlamaDecodeStep

log = logging.getLogger(__name__)
T = TypeVar("T")

_FAST_DECODE_TOLERANCE = 1e-3  # relative, lean decode step vs transformers forward at start-up (fp32)


@dataclass(eq=False)
class _Sequence:
    """One request inside the engine; fields after `request` are owned by the scheduler thread."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    steering: RowSteering | None
    max_new_tokens: int
    generator: torch.Generator | None = None  # made on the logits' device at the first sampled token
    filled: int = 0  # positions whose K/V are in the cache
    row: int = -1
    next_token: int = -1  # sampled, not yet fed to the model
    output_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    last_prompt_logits: torch.Tensor | None = None  # (V,) logits of the previous chunk's last token
    # conditional profiles: per probe layer the running sum of the prompt's states and the last one (float32)
    probe_sums: dict[int, torch.Tensor] = field(default_factory=dict)
    probe_last: dict[int, torch.Tensor] = field(default_factory=dict)
    conditions: list[ConditionResult] | None = None
    cancelled: bool = False
    finished: bool = False


class ContinuousEngine(Engine):
    """Continuous-batching engine with per-row steering over a preallocated slot KV cache."""

    supports_constraints = True
    supports_conditions = True

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        max_seq_len: int | None = None,
        prefill_chunk: int = 256,
        retry_after: float = 1.0,
        num_threads: int | None = None,
        fast_decode: bool = True,
    ) -> None:
        if max_batch_size < 1 or prefill_chunk < 1 or max_queue < 0:
            raise ValueError("max_batch_size and prefill_chunk must be >= 1, max_queue >= 0")
        self.model = model
        self.config = model.config
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        self.steerer = Steerer.attach(model)
        first = next(model.parameters())
        self.dtype, self.device = first.dtype, first.device
        limit = int(getattr(self.config, "max_position_embeddings", 2048) or 2048)
        self._max_context = min(max_seq_len or min(limit, 2048), limit)
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.retry_after = retry_after
        self.num_threads = num_threads
        self._cache_keyword = compat.cache_keyword(self.decoder)
        self._bool_mask = compat.uses_bool_mask(self.config)
        self._prefill_alone = False  # after a failed batched prefill: the next prefills go one by one
        self.cache = SlotCache(
            num_layers=self.config.num_hidden_layers,
            slots=max_batch_size,
            kv_heads=getattr(self.config, "num_key_value_heads", None) or self.config.num_attention_heads,
            head_dim=getattr(self.config, "head_dim", None)
            or self.config.hidden_size // self.config.num_attention_heads,
            max_len=self._max_context,
            dtype=self.dtype,
            device=self.device,
        )

        # the lean decode step (fastdecode.py) where the model has the Llama structure and agrees with
        # the transformers forward on a probe step; None: every step goes through the transformers forward
        self.fast_decode: LlamaDecodeStep | None = None
        self.fast_decode_error: float | None = None
        if fast_decode:
            self._adopt_fast_decode(LlamaDecodeStep.build(model))

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._inbox: deque[_Sequence] = deque()
        self._chores: deque[tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future]] = deque()
        self._in_flight = 0  # accepted and not finished; guarded by _lock
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        # scheduler-thread state
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []  # row i of the cache is _running[i]
        self._prefilling: _Sequence | None = None
        self._plan: SteeringPlan | None = None
        self._plan_stale = True
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}

    # -- Engine interface --------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="rahf-engine", daemon=True)
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
                seq.cancelled = True  # read by the scheduler between steps
                with self._lock:
                    self._wake.notify_all()

    async def run_between_steps(self, work: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        with self._lock:
            if not self._accepting:
                raise EngineShutdownError("the engine is not accepting work")
            self._chores.append((work, loop, future))
            self._wake.notify_all()
        return await future

    @property
    def max_context(self) -> int:
        return self._max_context

    def _adopt_fast_decode(self, step: LlamaDecodeStep | None) -> None:
        """Use `step` for decoding if it reproduces the transformers forward on a two-row probe step
        (rows at different lengths, one steered at its first layer)."""
        if step is None:
            return
        config = self.config
        cache = SlotCache(
            num_layers=config.num_hidden_layers,
            slots=2,
            kv_heads=step.kv_heads,
            head_dim=step.head_dim,
            max_len=4,
            dtype=self.dtype,
            device=self.device,
        )
        generator = torch.Generator().manual_seed(0)
        vocab = int(config.vocab_size)
        hidden = self.steerer.hidden_size
        offsets = {0: torch.randn(hidden, generator=generator)}
        low_rank = {0: (torch.randn(2, hidden, generator=generator), torch.randn(hidden, 2, generator=generator))}
        lora: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {0: {}}  # every projection, layer 0
        for name, out in self.steerer.projections.items():
            a, b = torch.randn(2, hidden, generator=generator), torch.randn(out, 2, generator=generator)
            lora[0][name] = (0.1 * a, 0.1 * b)
        plan = build_plan(
            [offsets, None], row_low_rank=[low_rank, None], row_lora=[lora, None], dtype=self.dtype, device=self.device
        )
        with torch.inference_mode():
            first = torch.zeros(2, dtype=torch.long, device=self.device)  # first token of each row
            cache.for_decode(2, first, 1)
            ids = torch.randint(vocab, (2,), generator=generator).to(self.device)
            self._transformers_decode(ids, first, self._decode_mask(first, 1), None, cache)
            ids = torch.randint(vocab, (2,), generator=generator).to(self.device)
            positions = torch.tensor([1, 0], device=self.device)  # row 1 rewrites its first position
            mask = self._decode_mask(positions, 2)
            cache.for_decode(2, positions, 2)
            reference = self._transformers_decode(ids, positions, mask, plan, cache).float()
            cache.for_decode(2, positions, 2)
            try:
                got = step(ids, positions, mask, cache, plan).float()
            except Exception as exc:  # noqa: BLE001 - a model the step misreads must still be served
                log.warning("lean decode step not used: it failed on a probe step (%s)", exc)
                return
        error = float((got - reference).abs().max()) / (float(reference.abs().max()) or 1.0)
        self.fast_decode_error = error
        # fp32: the same kernels give 0.0; half precision rounds differently in different kernels
        tolerance = max(_FAST_DECODE_TOLERANCE, 4 * torch.finfo(self.dtype).eps)
        if error <= tolerance:
            self.fast_decode = step
            log.info("lean decode step in use (%d fused projections, error %.2g)", step.fused, error)
        else:
            log.warning("lean decode step not used: it differs from the transformers forward by %.3g", error)

    def stats(self) -> dict[str, int]:
        with self._lock:
            in_flight = self._in_flight
        running = len(self._running) + (self._prefilling is not None)
        return {"running": running, "waiting": max(0, in_flight - running), "slots": self.max_batch_size}

    # -- admission (event-loop side) ---------------------------------------------------------------

    def _submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> _Sequence:
        params = request.sampling
        prompt_len = len(request.prompt_ids)
        if prompt_len == 0:
            raise ValueError("the prompt has no tokens")
        if prompt_len >= self._max_context:
            raise ValueError(f"the prompt has {prompt_len} tokens; this engine holds {self._max_context}")
        steering = request.steering
        if steering is not None and not steering.fits(self.steerer):
            raise PlanError(
                f"the steering was made for a model with {steering.num_layers} layers of size "
                f"{steering.hidden_size}; this engine's model has {self.steerer.num_layers} of size "
                f"{self.steerer.hidden_size}"
            )
        seq = _Sequence(
            request=request,
            loop=loop,
            events=asyncio.Queue(),
            steering=steering,
            max_new_tokens=max(0, min(params.max_new_tokens, self._max_context - prompt_len)),
        )
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

    # -- scheduler thread --------------------------------------------------------------------------

    def _run(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        with torch.inference_mode():
            while True:
                if not self._take_inbox():
                    break
                try:
                    self._step()
                except Exception as error:  # one failed forward must not kill the server
                    log.exception("engine step failed")
                    self._fail_all(EngineError(f"engine step failed: {error}"))
                self._run_chore()
        self._fail_all(EngineShutdownError("the engine stopped"))
        with self._lock:
            chores, self._chores = list(self._chores), deque()
        for _, loop, future in chores:
            try:
                loop.call_soon_threadsafe(_settle, future, None, EngineShutdownError("the engine stopped"))
            except RuntimeError:
                pass

    def _run_chore(self) -> None:
        """Run the oldest piece of `run_between_steps` work, if any, and hand its result to its caller."""
        with self._lock:
            if not self._chores:
                return
            work, loop, future = self._chores.popleft()
        if future.done():  # its caller has gone
            return
        try:
            result, error = work(), None
        except Exception as exc:  # noqa: BLE001 - the caller's failure, reported to the caller
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(_settle, future, result, error)
        except RuntimeError:  # the loop is closed
            pass

    def _take_inbox(self) -> bool:
        """Move new requests into the waiting queue; block while idle. False once stopping."""
        with self._lock:
            while True:
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                if self._stopping:
                    return False
                if self._waiting or self._running or self._prefilling is not None or self._chores:
                    return True
                self._wake.wait()

    def _step(self) -> None:
        # 1. drop cancelled sequences, 2. prefill within the chunk budget, 3. decode every running row
        self._drop_cancelled()
        budget = self.prefill_chunk
        if self._prefilling is None and not self._prefill_alone:
            budget -= self._prefill_together(budget)
        self._prefill_alone = False
        while budget > 0 and len(self._running) < self.max_batch_size:
            if self._prefilling is None:
                if not self._waiting:
                    break
                self._prefilling = self._waiting.popleft()
                self._prefilling.row = len(self._running)
            seq = self._prefilling
            try:
                budget -= self._prefill_chunk(seq, budget)
            except Exception as error:  # this request's prompt or steering: fail it alone
                log.exception("prefill of request %s failed", seq.request.request_id)
                if self._prefilling is seq:
                    self._prefilling = None
                self._fail(seq, error)
            if self._prefilling is seq and seq.filled == 0:
                break  # a fired condition sent the prompt back: its steered prefill starts with the next step's
                # budget, in the chunks a fresh prompt gets (so its rounding is the unconditional profile's)
        if self._running:
            self._decode_step()

    def _fail(self, seq: _Sequence, error: BaseException) -> None:
        """End one request with an error; the others go on."""
        if seq in self._running:
            self._leave(seq)
        elif not seq.finished:
            self._retire(seq)
        self._emit(seq, EngineError(f"request failed: {error}"))
        self._flush()

    def _drop_cancelled(self) -> None:
        if any(seq.cancelled for seq in self._waiting):
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                self._retire(seq)
        if self._prefilling is not None and self._prefilling.cancelled:
            self._retire(self._prefilling)
            self._prefilling = None
        for seq in [s for s in self._running if s.cancelled]:
            self._leave(seq)

    # -- prefill -----------------------------------------------------------------------------------

    def _prefill_chunk(self, seq: _Sequence, budget: int) -> int:
        """Run the next chunk of `seq`'s prompt (at most `budget` tokens); returns the tokens run."""
        prompt = seq.request.prompt_ids
        start = seq.filled
        length = min(budget, len(prompt) - start)
        want_prompt_logprobs = seq.request.sampling.prompt_logprobs
        input_ids = torch.tensor([prompt[start : start + length]], dtype=torch.long, device=self.device)  # (1, T)
        positions = torch.arange(start, start + length, device=self.device).unsqueeze(0)  # (1, T)
        self.cache.for_prefill(seq.row, start, length)
        plan = self._prefill_plan(seq, positions)
        with self.steerer.steering(plan), self._probes(seq):
            hidden = self._forward(input_ids, positions, self._prefill_mask(start, length))  # (1, T, H)
        last = start + length == len(prompt)
        if want_prompt_logprobs:
            logits = self.lm_head(hidden[0]).float()  # (T, V)
            self._score_prompt(seq, logits, start)
        elif last:
            logits = self.lm_head(hidden[0, -1:])  # (1, V)
        seq.filled = start + length
        if last:
            self._prefilling = None
            self._join(seq, logits[-1:])
        return length

    def _prefill_together(self, budget: int) -> int:
        """Prefill several whole waiting prompts in one right-padded forward; returns the tokens run."""
        group: list[_Sequence] = []
        free = self.max_batch_size - len(self._running)
        for seq in self._waiting:
            if len(group) == free or seq.cancelled or seq.request.sampling.prompt_logprobs or (
                    seq.steering is not None and seq.steering.conditional):  # conditions read chunk by chunk
                break
            if sum(len(s.request.prompt_ids) for s in group) + len(seq.request.prompt_ids) > budget:
                break
            group.append(seq)
        if len(group) < 2:
            return 0
        for _ in group:
            self._waiting.popleft()
        first, k = len(self._running), len(group)
        lengths_list = [len(seq.request.prompt_ids) for seq in group]
        length = max(lengths_list)
        lengths = torch.tensor(lengths_list, device=self.device)  # (k,)
        padded = [seq.request.prompt_ids + [0] * (length - len(seq.request.prompt_ids)) for seq in group]
        input_ids = torch.tensor(padded, dtype=torch.long, device=self.device)  # (k, T)
        for i, seq in enumerate(group):
            seq.row = first + i
        steps = torch.arange(length, device=self.device).unsqueeze(0)  # (1, T)
        real = steps < lengths.unsqueeze(1)  # (k, T)
        self.cache.for_prefill_batch(first, lengths, length)
        queries, keys = steps.view(1, length, 1), steps.view(1, 1, length)
        allowed = (keys <= queries) & ((keys < lengths.view(k, 1, 1)) | ~real.unsqueeze(2))  # (k, T, T)
        plan = None
        if any(seq.steering is not None and seq.steering.position_mode != "generated" for seq in group):
            plan = plan_for_rows(
                [seq.steering for seq in group],
                positions=torch.where(real, steps, -1),
                prompt_lengths=lengths_list,
                dtype=self.dtype,
                device=self.device,
            )
        try:
            with self.steerer.steering(plan):
                hidden = self._forward(input_ids, steps.expand(k, -1), self._mask(allowed).view(k, 1, length, length))
            last = hidden[torch.arange(k, device=self.device), lengths - 1]  # (k, H)
            logits = self.lm_head(last)  # (k, V)
        except Exception:  # one of the prompts: prefill them one by one so that only its request fails
            log.warning("batched prefill of %d prompts failed; prefilling them one at a time", k, exc_info=True)
            self._waiting.extendleft(reversed(group))
            self._prefill_alone = True
            return 0
        for i, seq in enumerate(group):
            seq.filled = lengths_list[i]
            target = len(self._running)
            if seq.row != target:  # an earlier row of the group finished at its first token
                self.cache.move(seq.row, target, seq.filled)
                seq.row = target
            self._join(seq, logits[i : i + 1])
        return int(lengths.sum())

    @contextmanager
    def _probes(self, seq: _Sequence) -> Iterator[None]:
        """While a prefill chunk of `seq` runs: the states after each layer its conditions read (after that
        layer's steering, i.e. as the prefill computes them) are added to the row's sums and kept as its last."""
        steering = seq.steering
        if steering is None or not steering.conditional:
            yield
            return
        layers = self.steerer.layers
        handles = []
        for layer in sorted({profile.condition.layer for profile, _ in steering.conditional}):
            def record(module: nn.Module, args: Any, output: Any, layer: int = layer) -> None:
                states = (output[0] if isinstance(output, tuple) else output)[0].float()  # (T, H)
                total = states.sum(dim=0)
                seq.probe_sums[layer] = seq.probe_sums[layer] + total if layer in seq.probe_sums else total
                seq.probe_last[layer] = states[-1].clone()
            handles.append(layers[layer].register_forward_hook(record))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _decide_conditions(self, seq: _Sequence) -> bool:
        """At the end of the prompt: score each conditional profile's probe, keep the ones that fire in the
        row's steering and record the results for the first event. True when the prompt must be prefilled
        again: a profile fired and the row steers prompt positions (`all`, `prompt`), so the prompt's K/V and its
        last state must be the steered ones, exactly as if the profile had been named without a condition."""
        steering = seq.steering
        if steering is None or not steering.conditional:
            return False
        prompt_len = len(seq.request.prompt_ids)
        results, fired = [], []
        for profile, _ in steering.conditional:
            condition = profile.condition
            state = (seq.probe_sums[condition.layer] / prompt_len if condition.reads == "mean"
                     else seq.probe_last[condition.layer])
            score = condition.score(state)
            fired.append(condition.fires(score))
            results.append(ConditionResult(profile=profile.name, applied=fired[-1], score=score))
        seq.conditions = results
        seq.steering = steering.resolved(fired)
        seq.probe_sums, seq.probe_last = {}, {}
        return any(fired) and steering.position_mode != "generated"

    def _prefill_plan(self, seq: _Sequence, positions: torch.Tensor) -> SteeringPlan | None:
        steering = seq.steering
        if steering is None or not steering.steers_prompt:
            return None
        if steering.position_mode == "generated" and int(positions[0, -1]) < len(seq.request.prompt_ids):
            return None  # no prompt position is steered in this mode
        return plan_for_rows(
            [steering],
            positions=positions,
            prompt_lengths=[len(seq.request.prompt_ids)],
            dtype=self.dtype,
            device=self.device,
        )

    def _prefill_mask(self, start: int, length: int) -> torch.Tensor:
        """(1, 1, T, start + T): query q (at position start + q) sees keys 0..start + q."""
        keys = torch.arange(start + length, device=self.device)
        queries = torch.arange(start, start + length, device=self.device)
        return self._mask(keys.unsqueeze(0) <= queries.unsqueeze(1)).view(1, 1, length, start + length)

    def _score_prompt(self, seq: _Sequence, logits: torch.Tensor, start: int) -> None:
        """Logprobs of the prompt tokens this chunk predicts. logits: (T, V) float, chunk from `start`."""
        params, prompt = seq.request.sampling, seq.request.prompt_ids
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]
        for position in range(max(start, 1), start + logits.shape[0]):
            previous = seq.last_prompt_logits if position == start else logits[position - start - 1]
            seq.prompt_logprobs.append(token_logprob(previous, int(prompt[position]), params.top_logprobs))
        seq.last_prompt_logits = logits[-1]

    def _join(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """The prompt is in the cache: read its conditions (a fired profile that steers the prompt sends the
        prompt back for a steered prefill, after which this runs again), pick the first token from the prompt's
        last state, then enter the batch unless already done."""
        try:
            again = self._decide_conditions(seq)
        except Exception as error:  # this request's conditions: it fails alone
            log.exception("the conditions of request %s failed", seq.request.request_id)
            self._fail(seq, error)
            return
        if again:  # the same slot, from position 0: the unsteered K/V are overwritten
            seq.filled, seq.prompt_logprobs, seq.last_prompt_logits = 0, None, None
            self._prefilling = seq
            return
        # the row's steering is final: its acting profiles' decoding defaults fill what the request left open
        seq.request = with_profile_decoding(seq.request, seq.steering)
        if seq.max_new_tokens == 0:
            self._retire(seq)
            self._emit(seq, EngineEvent(finish_reason="length", prompt_logprobs=seq.prompt_logprobs,
                                        conditions=seq.conditions))
            self._flush()
            return
        try:
            ((token, logprob),) = self._select([seq], logits)
            event = self._advance(seq, token, logprob)
        except Exception as error:  # this request's sampling or constraint: it fails alone
            log.exception("sampling for request %s failed", seq.request.request_id)
            self._fail(seq, error)
            return
        event.prompt_logprobs = seq.prompt_logprobs
        event.conditions = seq.conditions
        seq.last_prompt_logits = None
        if seq.finished:
            self._retire(seq)
        else:
            seq.row = len(self._running)
            self._running.append(seq)
            self._plan_stale = True
        self._emit(seq, event)
        self._flush()

    # -- decode (the hot path) ---------------------------------------------------------------------

    def _decode_step(self) -> None:
        """One token for every running row."""
        rows = self._running
        n = len(rows)
        input_ids = torch.tensor([seq.next_token for seq in rows], dtype=torch.long, device=self.device)  # (n,)
        positions = torch.tensor([seq.filled for seq in rows], dtype=torch.long, device=self.device)  # (n,)
        kv_len = max(seq.filled for seq in rows) + 1
        self.cache.for_decode(n, positions, kv_len)
        mask = self._decode_mask(positions, kv_len)
        plan = self._decode_plan()
        step = self.fast_decode
        if step is not None and step.applies(n):
            hidden = step(input_ids, positions, mask, self.cache, plan)  # (n, H)
        else:
            hidden = self._transformers_decode(input_ids, positions, mask, plan)
        logits = self.lm_head(hidden)  # (n, V)
        try:
            choices: list = self._select(rows, logits)
        except Exception:  # some row's sampling: find it by sampling the rows one by one
            choices = []
            for i, seq in enumerate(rows):
                try:
                    choices.extend(self._select([seq], logits[i : i + 1]))
                except Exception as error:
                    log.exception("sampling for request %s failed", seq.request.request_id)
                    choices.append(error)
        failed = []
        for seq, choice in zip(list(rows), choices, strict=True):
            seq.filled += 1
            if not isinstance(choice, BaseException):
                try:
                    self._emit(seq, self._advance(seq, *choice))
                    continue
                except Exception as error:  # its constraint refused the token: this row fails alone
                    log.exception("constraint of request %s failed", seq.request.request_id)
                    choice = error
            failed.append((seq, choice))
        for seq in [s for s in rows if s.finished]:
            self._leave(seq)
        for seq, error in failed:
            self._fail(seq, error)
        self._flush()

    def _select(self, rows: list[_Sequence], logits: torch.Tensor) -> list[tuple[int, TokenLogprob | None]]:
        """Next tokens of `rows` from their logits (n, V). A sampled row's generator is made on the
        logits' device the first time it samples (seeded with the request's seed, if any). A constrained
        row picks among the tokens its constraint allows now (asking it changes nothing, so a failed batch
        can be selected again row by row)."""
        for seq in rows:
            params = seq.request.sampling
            if seq.generator is None and params.temperature > 0:
                seq.generator = make_generator(params.seed, logits.device)
        constraints = [seq.request.constraint for seq in rows]
        return select_tokens(
            logits,
            [seq.request.sampling for seq in rows],
            [seq.generator for seq in rows],  # type: ignore[misc]  # None only for greedy rows
            [seq.output_ids for seq in rows],
            [seq.request.prompt_ids for seq in rows],
            [c.allowed() if c is not None else None for c in constraints]
            if any(c is not None for c in constraints)
            else None,
        )

    def _forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: SlotCache | None = None
    ) -> torch.Tensor:
        """Decoder forward over the cache rows set up beforehand -> last hidden states (B, T, H)."""
        out = self.decoder(
            input_ids=input_ids,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            **{self._cache_keyword: cache if cache is not None else self.cache},
        )
        return out.last_hidden_state

    def _transformers_decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        plan: SteeringPlan | None,
        cache: SlotCache | None = None,
    ) -> torch.Tensor:
        """One decode step through the transformers forward and the hooks: input_ids, positions (n,),
        mask from `_decode_mask` -> last hidden states (n, H). The cache is set up with `for_decode`."""
        n = input_ids.shape[0]
        with self.steerer.steering(plan):
            return self._forward(input_ids.view(n, 1), positions.view(n, 1), mask, cache)[:, -1]

    def _decode_mask(self, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """(n, 1, 1, kv_len) attention mask of a decode step: row i sees keys 0..positions[i]."""
        allowed = torch.arange(kv_len, device=self.device).unsqueeze(0) <= positions.unsqueeze(1)  # (n, kv)
        return self._mask(allowed).view(positions.shape[0], 1, 1, kv_len)

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        return compat.attention_mask(allowed, bool_mask=self._bool_mask, dtype=self.dtype)

    def _decode_plan(self) -> SteeringPlan | None:
        """Stacked offsets of the running rows; rebuilt only when the batch composition changed.

        In decode every position is past the prompt, so "generated" rows are steered like "all" rows and
        "prompt" rows are left out (`plan_for_rows` with `decode`).
        """
        if self._plan_stale:
            self._plan = plan_for_rows(
                [seq.steering for seq in self._running], decode=True, dtype=self.dtype, device=self.device
            )
            self._plan_stale = False
        return self._plan

    def _advance(self, seq: _Sequence, token: int, logprob: TokenLogprob | None) -> EngineEvent:
        """Record a sampled token; a stop token ends the sequence and is returned like any other (the
        serving layer hides it), and so does a token that completes the row's constraint. Raises (with
        nothing recorded) when the row's constraint refuses the token."""
        constraint = seq.request.constraint
        if constraint is not None:
            constraint.advance(token)
        seq.output_ids.append(token)
        seq.next_token = token
        finish = None
        if token in seq.request.sampling.stop_token_ids or (constraint is not None and constraint.done):
            finish = "stop"
        elif len(seq.output_ids) >= seq.max_new_tokens:
            finish = "length"
        seq.finished = finish is not None
        return EngineEvent(token_ids=[token], logprobs=[logprob] if logprob is not None else None, finish_reason=finish)

    # -- leaving the batch -------------------------------------------------------------------------

    def _leave(self, seq: _Sequence) -> None:
        """Free `seq`'s row: the last running row moves into it, the prefilling row moves down one."""
        row = self._running.index(seq)
        last = self._running.pop()
        if last is not seq:
            self.cache.move(last.row, row, last.filled)
            last.row = row
            self._running[row] = last
        if self._prefilling is not None:
            self.cache.move(self._prefilling.row, len(self._running), self._prefilling.filled)
            self._prefilling.row = len(self._running)
        self._plan_stale = True
        self._retire(seq)

    def _retire(self, seq: _Sequence) -> None:
        seq.finished = True
        with self._lock:
            self._in_flight -= 1

    def _fail_all(self, error: BaseException) -> None:
        everyone = [*self._running, *self._waiting]
        if self._prefilling is not None:
            everyone.append(self._prefilling)
        with self._lock:
            everyone.extend(self._inbox)
            self._inbox.clear()
        self._running, self._prefilling = [], None
        self._waiting.clear()
        self._plan_stale = True
        for seq in everyone:
            if not seq.finished:
                self._emit(seq, error)
                self._retire(seq)
        self._flush()

    # -- events to the event loops -----------------------------------------------------------------

    def _emit(self, seq: _Sequence, event: object) -> None:
        """Queue an event (or an exception) for `seq`; `_flush` delivers it."""
        if not seq.cancelled:
            self._outbox.setdefault(seq.loop, []).append((seq.events, event))

    def _flush(self) -> None:
        """Deliver the collected events: one thread-safe call per event loop."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed; its requests are gone
                pass


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _deliver(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, event in items:
        queue.put_nowait(event)
