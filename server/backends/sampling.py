"""Per-row token selection: penalties, temperature, top-p, seeded sampling, logprobs.

Knows logits and sampling parameters; knows nothing about batching or steering. Works on a batch of
rows, each with its own parameters and its own random generator, so a row's choice never depends on
which other rows share its batch. Everything runs on the logits' device: a row's generator must be
on that device too (`make_generator(seed, logits.device)`; torch refuses to draw for CUDA logits from
a CPU generator), and `select_token` says so clearly when it is not.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def apply_penalties(logits: torch.Tensor, params: SamplingParams, output_ids: Sequence[int]) -> torch.Tensor:
    """OpenAI-style presence and frequency penalties over the tokens generated so far. logits: (V,)"""
    if not output_ids or (params.presence_penalty == 0.0 and params.frequency_penalty == 0.0):
        return logits
    ids, counts = torch.tensor(list(output_ids), dtype=torch.long, device=logits.device).unique(return_counts=True)
    penalty = params.frequency_penalty * counts.to(logits.dtype) + params.presence_penalty
    logits = logits.clone()
    logits[ids] -= penalty
    return logits


def select_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    output_ids: Sequence[int] = (),
) -> tuple[int, TokenLogprob | None]:
    """Pick the next token for one row from its float logits (V,), with `generator` on their device."""
    logits = apply_penalties(logits.float(), params, output_ids)
    if params.temperature <= 0.0:
        token = int(torch.argmax(logits))
    else:
        if params.temperature >= _SMALL_TEMPERATURE:
            scaled = logits / params.temperature
        else:  # logits / temperature could overflow to inf (NaN probabilities): shift the largest to 0 first,
            # and keep the divisor a normal float32; the distribution tends to greedy as it should
            scaled = (logits - logits.max()) / max(params.temperature, torch.finfo(torch.float32).tiny)
        probs = torch.softmax(scaled, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
            keep[0] = True
            filtered = torch.zeros_like(probs)
            filtered[order[keep]] = sorted_probs[keep]
            probs = filtered
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
        and not params.logprobs
        and params.top_logprobs == 0
    )


def select_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator],
    output_ids: Sequence[Sequence[int]],
) -> list[tuple[int, TokenLogprob | None]]:
    """`select_token` for every row of logits (B, V); plain greedy rows share one batched argmax."""
    greedy = [i for i, p in enumerate(params) if is_plain_greedy(p)]
    choices: list[tuple[int, TokenLogprob | None]] = [(0, None)] * len(params)
    if greedy:
        rows = logits if len(greedy) == len(params) else logits[greedy]
        for i, token in zip(greedy, torch.argmax(rows.float(), dim=-1).tolist(), strict=True):
            choices[i] = (token, None)
    if len(greedy) < len(params):
        for i, p in enumerate(params):
            if not is_plain_greedy(p):
                choices[i] = select_token(logits[i], p, generators[i], output_ids[i])
    return choices


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """Logprob of `token` (and the `top` best alternatives) under the unscaled distribution."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, indices = torch.topk(logprobs, k=min(top, logprobs.numel()))
        alternatives = tuple((int(i), float(v)) for i, v in zip(indices, values, strict=True))
    return TokenLogprob(token_id=token, logprob=float(logprobs[token]), top=alternatives)


def prompt_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], top: int) -> list[TokenLogprob | None]:
    """Logprobs of each prompt token given the tokens before it. logits: (T, V) for the prompt."""
    result: list[TokenLogprob | None] = [None]
    for position in range(1, len(prompt_ids)):
        result.append(token_logprob(logits[position - 1], int(prompt_ids[position]), top))
    return result
