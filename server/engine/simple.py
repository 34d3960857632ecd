"""A simple engine: one worker thread runs static batches of requests to completion.

Knows the model, its KV cache, per-row steering plans (`steering_vectors.hooks`) and per-row token
choice (`sampling`). Takes token ids and yields token ids: knows nothing about text, HTTP or profile
files. Requests that arrive while a batch runs wait for the next batch; the waiting queue is bounded
and refuses work with `EngineOverloadedError` when full.

Each row of a batch has its own steering offsets, position mode, sampling parameters and random
generator, so its output does not depend on which other rows share the batch (up to floating-point
effects of padding, which the tests check do not change greedy outputs of the tiny model).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from torch import nn

from steering_vectors.hooks import Steerer, build_plan, positions_from_attention_mask

from .base import (
    Engine,
    EngineEvent,
    EngineOverloadedError,
    EngineShutdownError,
    GenerationRequest,
)
from .sampling import make_generator, prompt_logprobs, select_token

log = logging.getLogger(__name__)


@dataclass
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    done: bool = False

    def send(self, item: EngineEvent | BaseException) -> None:
        if self.cancelled:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone
            self.cancelled = True


class SimpleEngine(Engine):
    """Static batching on one worker thread. Construct, `start()`, then `generate()` from any loop."""

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch_size: int = 4,
        max_queue: int = 64,
        retry_after: float = 1.0,
        pad_token_id: int = 0,
    ) -> None:
        self.model = model
        self.steerer = Steerer.attach(model)
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.retry_after = retry_after
        self.pad_token_id = pad_token_id
        config = getattr(model, "config", None)
        # transformers renamed `past_key_values` to `cache`; pass whichever this version takes
        import inspect

        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._max_context = int(getattr(config, "max_position_embeddings", 2048) or 2048)
        self._cond = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._accepting = False
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- interface ----------------------------------------------------------------------------------

    @property
    def max_context(self) -> int:
        return self._max_context

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting)}

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._accepting = True
            self._thread = threading.Thread(target=self._loop, name="rahf-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            self._accepting = False
            while (self._waiting or self._running) and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            self._stop = True
            for job in self._running:  # past the deadline: end what still runs
                job.cancelled = True
            leftovers = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for job in leftovers:
            job.send(EngineShutdownError("the server shut down before this request started"))
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        job = _Job(request=request, loop=asyncio.get_running_loop())
        with self._cond:
            if not self._accepting:
                raise EngineShutdownError("the engine is not accepting requests (starting or shutting down)")
            if len(self._waiting) + len(self._running) >= self.max_queue + self.max_batch_size:
                raise EngineOverloadedError(
                    f"{len(self._waiting)} requests are waiting; retry later", retry_after=self.retry_after
                )
            self._waiting.append(job)
            self._cond.notify_all()
        try:
            while True:
                item = await job.events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    job.done = True
                    return
        finally:
            job.cancelled = True
            with self._cond:
                if job in self._waiting:
                    self._waiting.remove(job)
                    self._cond.notify_all()

    # -- worker -------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                batch: list[_Job] = []
                while self._waiting and len(batch) < self.max_batch_size:
                    job = self._waiting.popleft()
                    if not job.cancelled:
                        batch.append(job)
                self._running = batch
            try:
                if batch:
                    self._run_batch(batch)
            except Exception as exc:  # a failed forward pass fails its batch, not the server
                log.exception("engine batch failed")
                for job in batch:
                    job.send(exc)
            finally:
                with self._cond:
                    self._running = []
                    self._cond.notify_all()

    @torch.inference_mode()
    def _run_batch(self, jobs: list[_Job]) -> None:
        from transformers import DynamicCache

        # 1. left-pad the prompts into one (B, T) batch
        batch = len(jobs)
        lengths = [len(job.request.prompt_ids) for job in jobs]
        width = max(lengths)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        for row, job in enumerate(jobs):
            input_ids[row, width - lengths[row] :] = torch.tensor(job.request.prompt_ids, dtype=torch.long)
            attention[row, width - lengths[row] :] = 1
        positions = positions_from_attention_mask(attention)  # (B, T), -1 at padding

        # 2. per-row steering: offsets and position modes
        row_offsets = [job.request.steering.offsets if job.request.steering else None for job in jobs]
        row_low_rank = [job.request.steering.low_rank if job.request.steering else None for job in jobs]
        modes = [job.request.steering.position_mode if job.request.steering else "all" for job in jobs]
        plan_kwargs = {
            "modes": modes,
            "prompt_lengths": lengths,
            "dtype": self.dtype,
            "device": self.device,
            "row_low_rank": row_low_rank,
        }
        prefill_plan = build_plan(row_offsets, positions=positions, **plan_kwargs)

        # 3. prefill; full logits only when some row scores its prompt
        wants_prompt = [job.request.sampling.prompt_logprobs for job in jobs]
        cache = DynamicCache()
        with self.steerer.steering(prefill_plan):
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                position_ids=positions.clamp(min=0).to(self.device),
                use_cache=True,
                logits_to_keep=0 if any(wants_prompt) else 1,
                **{self._cache_arg: cache},
            )
        logits = out.logits.float().cpu()  # (B, T or 1, V)
        first_events: list[EngineEvent] = []
        for row, job in enumerate(jobs):
            event = EngineEvent()
            if wants_prompt[row]:
                row_logits = logits[row, width - lengths[row] :]
                event.prompt_logprobs = prompt_logprobs(
                    row_logits, job.request.prompt_ids, job.request.sampling.top_logprobs
                )
            first_events.append(event)
        last = logits[:, -1]  # (B, V)
        del out, logits

        # 4. decode until every row has finished or gone
        generators = [make_generator(job.request.sampling.seed) for job in jobs]
        outputs: list[list[int]] = [[] for _ in jobs]
        finished = [False] * batch
        pending: list[EngineEvent | None] = list(first_events)
        next_pos = torch.tensor(lengths, dtype=torch.long).view(batch, 1)
        decode_plan = build_plan(row_offsets, positions=next_pos, **plan_kwargs)
        while True:
            next_tokens = torch.full((batch, 1), self.pad_token_id, dtype=torch.long)
            for row, job in enumerate(jobs):
                if finished[row]:
                    continue
                if job.cancelled:
                    finished[row] = True
                    continue
                event = pending[row] or EngineEvent()
                pending[row] = None
                params = job.request.sampling
                if params.max_new_tokens <= 0:
                    event.finish_reason = "length"
                else:
                    token, logprob = select_token(last[row], params, generators[row], outputs[row])
                    outputs[row].append(token)
                    next_tokens[row, 0] = token
                    event.token_ids = [token]
                    if logprob is not None:
                        event.logprobs = [logprob]
                    if token in params.stop_token_ids:
                        event.finish_reason = "stop"
                    elif len(outputs[row]) >= params.max_new_tokens:
                        event.finish_reason = "length"
                    elif lengths[row] + len(outputs[row]) >= self._max_context:
                        event.finish_reason = "length"
                if event.finish_reason is not None:
                    finished[row] = True
                job.send(event)
            if all(finished) or self._stop:
                return
            attention = torch.cat([attention, torch.ones((batch, 1), dtype=torch.long)], dim=1)
            with self.steerer.steering(decode_plan):
                out = self.model(
                    input_ids=next_tokens.to(self.device),
                    attention_mask=attention.to(self.device),
                    position_ids=next_pos.to(self.device),
                    use_cache=True,
                    **{self._cache_arg: cache},
                )
            last = out.logits[:, -1].float().cpu()
            next_pos = next_pos + 1
