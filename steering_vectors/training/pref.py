"""Fit "pref", this project's own addition, not part of RAHF: offsets (and low-rank terms) learned directly on
a preference loss over the training pairs, through the same hooks, without steps 1 and 2. Its preference
term is the reply log-likelihood `evaluate.pair_logprobs` scores; its fluency term the prompt-token KL.
"""

from __future__ import annotations

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
    """

    beta: float = 10.0
    l2: float = 0.01
    kl: float = 0.0
    steps: int = 32
    batch_pairs: int = 8
    lr: float = 0.01
    rank: int = 0
    position_mode: str = "all"
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss, preference part) of `pairs` steered by `offsets` (layer -> (H,), may require grad)
    and the optional `low_rank` terms (layer -> (down, up), may require grad)."""
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
    run resumed from `checkpoint` takes the same steps. Returns the offsets, the low-rank terms (empty
    for rank 0) and each step's total loss.
    """
    seed_everything(config.seed)
    base = unwrap_model(model)
    base.eval()
    epochs = -(-config.steps * config.batch_pairs // len(pairs))  # enough epochs for every step
    draws = shuffled_batches(range(len(pairs)), config.batch_pairs, epochs, config.seed)[: config.steps]

    def batch_loss(
        offsets: dict[int, torch.Tensor], indices: list[int], low_rank: LowRank
    ) -> tuple[torch.Tensor, dict[str, str]]:
        loss, pref = preference_objective(base, tokenizer, [pairs[i] for i in indices], offsets, config, low_rank)
        return loss, {"pref": f"{float(pref.detach()):.3f}"}

    hidden = hidden_size_of(base)
    return adam_on_offsets(
        layers, hidden, config.lr, draws, batch_loss, checkpoint, config.checkpoint_every, "fit pref offsets",
        identity={"pairs": len(pairs)},
        rank=config.rank,
        seed=config.seed,
    )
