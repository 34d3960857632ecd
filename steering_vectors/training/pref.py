"""Fit "pref", this project's own addition, not part of RAHF: offsets (and low-rank terms) learned directly on
a preference loss over the training pairs, through the same hooks, without steps 1 and 2. Its preference
term is the reply log-likelihood `evaluate.pair_logprobs` scores; its fluency term the prompt-token KL.

Bi-directional (`PrefConfig.bidirectional`, the idea of BiPO, Cao et al. 2024): each pair of a step draws a sign
d = ±1; the pair is steered by d × the terms, and the loss asks the steered likelihood ratios against the
unsteered model to favour the chosen reply for d = +1 and the rejected one for d = -1, so that the vector is one
direction that works both ways (what a signed strength in a request assumes).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.layers import hidden_size_of, unwrap_model
from .data import DEFAULT_BUDGET, Encoded, PreferencePair, TokenBudget, collate, encode_prompt, pad_id
from .evaluate import pair_logprobs
from .loop import LowRank, adam_on_offsets, batch_prompt_kl, factor_penalty, seed_everything, shuffled_batches


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """mean over pairs of -log sigmoid(beta * (LLn(chosen) - LLn(rejected))), LLn given per pair (N,)."""
    return -torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean()


@dataclass
class PrefConfig:
    """Adam on per-layer offsets with a preference loss on training pairs plus fluency penalties.

    Not part of RAHF: it needs no instructed model and no activity patterns, only the pairs and the
    frozen base model. The loss is `preference_loss` of the length-normalised reply log-likelihoods that
    `evaluate.score_pairs` scores (steered in `position_mode`) plus ``l2 * sum_l ||delta_l||^2`` plus
    ``kl *`` the mean next-token KL(unsteered || steered) over the prompt tokens of the batch (steered at
    every position, as the neutral-text perplexity is).

    With `rank` > 0 each layer also learns a low-rank, input-dependent term (see `hooks.low_rank_delta`);
    both its factors join the L2 penalty (`factor_penalty`).

    `bidirectional`: the preference part is `bidirectional_preference` instead (a seeded sign per pair and
    step, margins against the unsteered model); the penalties are the same.
    """

    beta: float = 10.0
    l2: float = 0.01
    kl: float = 0.0
    steps: int = 32
    batch_pairs: int = 8
    lr: float = 0.01
    rank: int = 0
    position_mode: str = "all"
    bidirectional: bool = False
    budget: TokenBudget = field(default_factory=TokenBudget)
    bf16: bool = False
    checkpoint_every: int = 8
    seed: int = 0


def preference_objective(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    offsets: dict[int, torch.Tensor],
    config: PrefConfig,
    low_rank: LowRank | None = None,
    signs: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, preference part) of `pairs` steered by `offsets` (layer -> (H,), may require grad)
    and the optional `low_rank` terms (layer -> (down, up), may require grad). `signs` (±1 per pair) are
    the directions of a bidirectional objective (`config.bidirectional`); all +1 when not given."""
    if config.bidirectional:
        pref = bidirectional_preference(
            model, tokenizer, pairs, signs if signs is not None else [1] * len(pairs), offsets, config, low_rank
        )
    else:
        chosen, rejected = pair_logprobs(
            model,
            tokenizer,
            pairs,
            offsets,
            config.position_mode,
            budget=config.budget,
            bf16=config.bf16,
            low_rank=low_rank,
        )
        pref = preference_loss(chosen, rejected, config.beta)
    penalty = sum((t.float().pow(2).sum() for t in offsets.values()), torch.zeros(()))
    total = pref + config.l2 * (penalty + factor_penalty(low_rank or {}))
    if config.kl:
        kl = prompt_kl(model, tokenizer, pairs, offsets, config.budget, config.bf16, low_rank=low_rank)
        total = total + config.kl * kl
    return total, pref


def bidirectional_preference(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    signs: Sequence[int],
    offsets: dict[int, torch.Tensor],
    config: PrefConfig,
    low_rank: LowRank | None = None,
) -> torch.Tensor:
    """Mean over pairs of -log sigmoid(beta * d * ((LLn_d(chosen) - LLn_0(chosen)) - (LLn_d(rejected) -
    LLn_0(rejected)))), where d = `signs[i]` (±1), LLn_d is the length-normalised reply log-likelihood steered
    by d × (`offsets`, `low_rank`) in `config.position_mode`, and LLn_0 the unsteered one (no gradient).

    A low-rank term is linear in its ``up`` factor, so d × the term is (down, d × up)."""
    if len(signs) != len(pairs) or any(d not in (1, -1) for d in signs):
        raise ValueError(f"bidirectional_preference needs one sign of ±1 per pair, got {list(signs)}")
    options: dict[str, Any] = {"budget": config.budget, "bf16": config.bf16}
    with torch.no_grad():
        chosen_0, rejected_0 = pair_logprobs(model, tokenizer, pairs, None, config.position_mode, **options)
    losses = []
    for d in (1, -1):
        index = [i for i, sign in enumerate(signs) if sign == d]
        if not index:
            continue
        chosen, rejected = pair_logprobs(
            model,
            tokenizer,
            [pairs[i] for i in index],
            {layer: d * t for layer, t in offsets.items()},
            config.position_mode,
            low_rank={layer: (down, d * up) for layer, (down, up) in (low_rank or {}).items()},
            **options,
        )
        margin = (chosen - chosen_0[index]) - (rejected - rejected_0[index])
        losses.append(-torch.nn.functional.logsigmoid(config.beta * d * margin))
    return torch.cat(losses).mean()


def signed_draws(draws: Sequence[list[int]], seed: int) -> list[list[int]]:
    """Every step's pair indices with a seeded sign each (the same for a resumed run): i for +1, ~i (-i - 1)
    for -1. `unsign` reads them back."""
    rng = random.Random(f"pref-signs-{seed}")
    return [[i if rng.random() < 0.5 else ~i for i in draw] for draw in draws]


def unsign(draw: Sequence[int]) -> tuple[list[int], list[int]]:
    """(pair indices, signs ±1) of a `signed_draws` step."""
    return [i if i >= 0 else ~i for i in draw], [1 if i >= 0 else -1 for i in draw]


def prompt_kl(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    offsets: dict[int, torch.Tensor],
    budget: TokenBudget = DEFAULT_BUDGET,
    bf16: bool = False,
    *,
    low_rank: LowRank | None = None,
) -> torch.Tensor:
    """Mean over the pairs' prompt tokens of KL(unsteered || steered) next-token distributions.

    Steered at every position; differentiable with respect to the offsets. A fluency cost measured on
    the training prompts, not on the neutral text the evaluation uses.
    """
    examples = [Encoded(tuple(encode_prompt(tokenizer, p.prompt, budget=budget.prompt)), 0) for p in pairs]
    return batch_prompt_kl(model, collate(examples, pad_id(tokenizer)), offsets, bf16, low_rank)


def fit_preference_offsets(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    layers: Sequence[int],
    config: PrefConfig,
    checkpoint: Path | None = None,
) -> tuple[dict[int, torch.Tensor], LowRank, list[float]]:
    """Learn offsets (layer -> (H,)) of the frozen model by Adam on `preference_objective`, and with
    `config.rank` > 0 low-rank terms (layer -> (down (rank, H), up (H, rank))) too.

    Batches of `batch_pairs` pairs are drawn up front from seeded shuffles (epochs over the pairs), so a
    run resumed from `checkpoint` takes the same steps; so are a bidirectional fit's signs (`signed_draws`).
    Returns the offsets, the low-rank terms (empty for rank 0) and each step's total loss.
    """
    seed_everything(config.seed)
    base = unwrap_model(model)
    base.eval()
    epochs = -(-config.steps * config.batch_pairs // len(pairs))  # enough epochs for every step
    draws = shuffled_batches(range(len(pairs)), config.batch_pairs, epochs, config.seed)[: config.steps]
    if config.bidirectional:
        draws = signed_draws(draws, config.seed)

    def batch_loss(
        offsets: dict[int, torch.Tensor], draw: list[int], low_rank: LowRank
    ) -> tuple[torch.Tensor, dict[str, str]]:
        indices, signs = unsign(draw)
        loss, pref = preference_objective(
            base, tokenizer, [pairs[i] for i in indices], offsets, config, low_rank, signs=signs
        )
        return loss, {"pref": f"{float(pref.detach()):.3f}"}

    hidden = hidden_size_of(base)
    return adam_on_offsets(
        layers, hidden, config.lr, draws, batch_loss, checkpoint, config.checkpoint_every, "fit pref offsets",
        # "bidirectional" None in one-way runs, so their earlier checkpoints (without the key) still resume
        identity={"pairs": len(pairs), "bidirectional": True if config.bidirectional else None},
        rank=config.rank,
        seed=config.seed,
    )
