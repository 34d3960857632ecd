"""Per-row token selection: constraints, penalties, temperature, top-k, min-p, top-p, seeded sampling,
logprobs.

The order, as vLLM's sampler: a row's constraint first (tokens its grammar does not allow get logit
-inf, so nothing after can pick them), then the repetition penalty (over the prompt and the tokens generated so far:
a positive logit is divided by it, a negative one multiplied), then the presence and frequency
penalties (over the generated tokens), then temperature (0: greedy, which none of the filters below can
change), then top-k, min-p (relative to the most likely token) and top-p on the scaled distribution.

Knows logits and sampling parameters; knows nothing about batching or steering. Works on a batch of
rows, each with its own parameters and its own random generator, so a row's choice never depends on
which other rows share its batch. Everything runs on the logits' device: a row's generator must be
on that device too (`make_generator(seed, logits.device)`; torch refuses to draw for CUDA logits from
a CPU generator), and `select_token` says so clearly when it is not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .base import SamplingParams, TokenLogprob

# below this temperature, logits / temperature may overflow float32 for logits of ordinary size
_SMALL_TEMPERATURE = 1e-20


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` (where the logits it samples from live), seeded, or randomly when None."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(int(seed) % 2**64)  # seed + choice index may pass 2**63; torch takes uint64
    return generator


def same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda` and `cuda:0` are the same device."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def check_generator(generator: torch.Generator, logits: torch.Tensor) -> None:
    if not same_device(generator.device, logits.device):
        raise ValueError(
            f"the sampling generator is on {generator.device} but the logits are on {logits.device}; "
            "make it with make_generator(seed, logits.device)"
        )


def constrain(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """A copy of float logits (V,) with -inf wherever `allowed` (bool (n,) on the CPU, from a
    `TokenConstraint`) is False, and for every id >= n. ValueError when no token of the vocabulary is
    allowed. On the CPU this is numpy's work (one thread): torch would split a 49k-entry row over its
    intra-op threads, and on a busy machine each split waits for a core."""
    if allowed is None:
        return logits
    vocab = logits.shape[-1]
    n = min(int(allowed.numel()), vocab)
    if logits.device.type == "cpu":
        keep = allowed.numpy()[:n]
        if not keep.any():
            raise ValueError("the row's constraint allows no token of the model's vocabulary")
        values = logits.numpy()
        out = np.full(vocab, -np.inf, dtype=values.dtype)
        np.copyto(out[:n], values[:n], where=keep)
        return torch.from_numpy(out)
    keep = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
    keep[:n] = allowed[:n].to(logits.device)
    if not bool(keep.any()):
        raise ValueError("the row's constraint allows no token of the model's vocabulary")
    return logits.masked_fill(~keep, float("-inf"))


def _argmax(logits: torch.Tensor) -> int:
    """The best token of one row (V,) (numpy on the CPU, for the reason `constrain` gives)."""
    if logits.device.type == "cpu":
        return int(np.argmax(logits.numpy()))
    return int(torch.argmax(logits))


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, output_ids: Sequence[int], prompt_ids: Sequence[int] = ()
) -> torch.Tensor:
    """The repetition penalty over the prompt and output tokens, then OpenAI-style presence and frequency
    penalties over the tokens generated so far. logits: (V,)"""
    if params.repetition_penalty != 1.0 and (output_ids or prompt_ids):
        seen = torch.tensor([*prompt_ids, *output_ids], dtype=torch.long, device=logits.device).unique()
        picked = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if not output_ids or (params.presence_penalty == 0.0 and params.frequency_penalty == 0.0):
        return logits
    ids, counts = torch.tensor(list(output_ids), dtype=torch.long, device=logits.device).unique(return_counts=True)
    penalty = params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty
    logits = logits.clone()
    logits[ids] -= penalty
    return logits


def sampling_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled row draws from: penalised float logits (V,) scaled by the temperature
    (> 0), then cut by top-k, min-p and top-p (what is cut has probability 0; the rest is not
    renormalised, which `torch.multinomial` does not need)."""
    if params.temperature >= _SMALL_TEMPERATURE:
        scaled = logits / params.temperature
    else:  # logits / temperature could overflow to inf (NaN probabilities): shift the largest to 0 first,
        # and keep the divisor a normal float32; the distribution tends to greedy as it should
        scaled = (logits - logits.max()) / max(params.temperature, torch.finfo(torch.float32).tiny)
    probs = torch.softmax(scaled, dim=-1)
    cut = False
    if 0 < params.top_k < probs.numel():
        keep = torch.topk(probs, params.top_k).indices  # exactly k tokens, ties broken by torch.topk
        probs = torch.zeros_like(probs).index_copy_(0, keep, probs[keep])
        cut = True
    if params.min_p > 0.0:
        probs = torch.where(probs >= params.min_p * probs.max(), probs, torch.zeros_like(probs))
        cut = True
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        total = sorted_probs.sum() if cut else 1.0  # top-p of what the filters before it left
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p * total
        keep[0] = True
        filtered = torch.zeros_like(probs)
        filtered[order[keep]] = sorted_probs[keep]
        probs = filtered
    return probs


def select_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    output_ids: Sequence[int] = (),
    prompt_ids: Sequence[int] = (),
    allowed: torch.Tensor | None = None,
) -> tuple[int, TokenLogprob | None]:
    """Pick the next token for one row from its float logits (V,), with `generator` on their device, among
    the tokens `allowed` (a constraint's mask; None: all)."""
    logits = apply_penalties(constrain(logits.float(), allowed), params, output_ids, prompt_ids)
    if params.temperature <= 0.0:
        token = int(torch.argmax(logits))
    else:
        probs = sampling_probs(logits, params)
        check_generator(generator, probs)
        token = int(torch.multinomial(probs, 1, generator=generator))
    if not params.logprobs and params.top_logprobs == 0:
        return token, None
    return token, token_logprob(logits, token, params.top_logprobs)


def is_plain_greedy(params: SamplingParams) -> bool:
    """Greedy with nothing that depends on the row's history or asks for logprobs."""
    return (
        params.temperature <= 0.0
        and params.presence_penalty == 0.0
        and params.frequency_penalty == 0.0
        and params.repetition_penalty == 1.0
        and not params.logprobs
        and params.top_logprobs == 0
    )


def select_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    output_ids: Sequence[Sequence[int]],
    prompt_ids: Sequence[Sequence[int]] | None = None,
    allowed: Sequence[torch.Tensor | None] | None = None,
) -> list[tuple[int, TokenLogprob | None]]:
    """`select_token` for every row of logits (B, V); plain greedy rows share one batched argmax. `allowed`:
    each row's constraint mask (None: unconstrained), applied to that row only."""
    masks: Sequence[torch.Tensor | None] = allowed if allowed is not None else [None] * len(params)
    greedy = [i for i, p in enumerate(params) if is_plain_greedy(p) and masks[i] is None]
    choices: list[tuple[int, TokenLogprob | None]] = [(0, None)] * len(params)
    if greedy:
        rows = logits if len(greedy) == len(params) else logits[greedy]
        for i, token in zip(greedy, torch.argmax(rows.float(), dim=-1).tolist(), strict=True):
            choices[i] = (token, None)
    for i, p in enumerate(params):  # constrained plain greedy rows: the best allowed token
        if masks[i] is not None and is_plain_greedy(p):
            choices[i] = (_argmax(constrain(logits[i].float(), masks[i])), None)
    if len(greedy) < len(params):
        for i, p in enumerate(params):
            if not is_plain_greedy(p):
                prompt = prompt_ids[i] if prompt_ids is not None else ()
                choices[i] = select_token(logits[i], p, generators[i], output_ids[i], prompt, masks[i])
    return choices


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """Logprob of `token` (and the `top` best alternatives) under the unscaled distribution. Tokens a
    constraint ruled out (probability 0) are never listed as alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, indices = torch.topk(logprobs, k=min(top, logprobs.numel()))
        alternatives = tuple(
            (int(i), float(v)) for i, v in zip(indices, values, strict=True) if math.isfinite(float(v))
        )
    return TokenLogprob(token_id=token, logprob=float(logprobs[token]), top=alternatives)


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], top: int) -> list[TokenLogprob | None]:
    """Logprobs of each prompt token given the tokens before it. logits: (T, V) for the prompt."""
    result: list[TokenLogprob | None] = [None]
    for position in range(1, len(prompt_ids)):
        result.append(token_logprob(logits[position - 1], int(prompt_ids[position]), top))
    return result
