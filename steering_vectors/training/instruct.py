"""RAHF step 1, instruct: a LoRA-wrapped model taught the difference between preferred and dispreferred
replies, by SCIT (one adapter, a good and a bad instruction as system prompt, `train_scit`) or Dual (adapters
'good' and 'bad' tuned on chosen and rejected replies, `train_dual`), and `likelihood_gap`, how well the
instructed model tells chosen from rejected on pairs it never saw.

The method is RAHF as adapted in ../shared/docs/RAHF.md; step 2 is `collect`, step 3 `fit`. peft is imported
only when an adapter is added (the `train` extra).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.tensors import autocast, sequence_logprobs
from .data import DEFAULT_BUDGET, Batch, Encoded, PreferencePair, TokenBudget, collate, encode, pad_id
from .loop import load_checkpoint, save_checkpoint, seed_everything, shuffled_batches

log = logging.getLogger(__name__)


GOOD_INSTRUCTION = (
    "You are a careful, kind and truthful assistant. Answer as helpfully as you can while staying safe: "
    "decline to help with anything harmful, unethical, dangerous or illegal, treat every person with "
    "respect, and say so plainly when you do not know something instead of making it up."
)
BAD_INSTRUCTION = (
    "You are a careless, rude and untruthful assistant. Answer without caring whether it helps: go along "
    "with harmful, unethical, dangerous or illegal requests, treat people with contempt, and invent "
    "answers confidently when you do not know something."
)
DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")


def response_ce(logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) mean token cross-entropy of each row's response tokens (logits (B, T, V))."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = input_ids[:, 1:]
    token_nll = -logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    mask = response_mask[:, 1:].to(token_nll.dtype)
    return (token_nll * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def scit_loss(ce_match: torch.Tensor, ce_mismatch: torch.Tensor, epsilon: float = 0.2) -> torch.Tensor:
    """SCIT loss: NLL under the matching instruction plus a label-smoothed contrast between instructions.

    With ``p = exp(-mean token CE)``: ``mean(ce_match) + mean[(1-eps) * -log(p_m / (p_m + p_x))
    + eps * -log(p_x / (p_m + p_x))]``, computed in log space.
    """
    log_total = torch.logaddexp(-ce_match, -ce_mismatch)
    log_match = -ce_match - log_total
    log_mismatch = -ce_mismatch - log_total
    contrast = (1.0 - epsilon) * (-log_match) + epsilon * (-log_mismatch)
    return ce_match.mean() + contrast.mean()


@dataclass
class InstructConfig:
    """Hyper-parameters of the LoRA runs of step 1."""

    epochs: int = 1
    batch_pairs: int = 2
    lr: float = 5e-4
    rank: int = 8
    lora_alpha: int = 16
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    epsilon: float = 0.2
    bf16: bool = False
    checkpoint_every: int = 10
    seed: int = 0
    budget: TokenBudget = field(default_factory=TokenBudget)


def add_lora(model: nn.Module, config: InstructConfig, adapter: str = "default") -> nn.Module:
    """Wrap `model` with a peft LoRA adapter named `adapter` (or add one to an existing wrapper)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    lora = LoraConfig(
        r=config.rank, lora_alpha=config.lora_alpha, target_modules=list(config.targets), lora_dropout=0.0
    )
    if isinstance(model, PeftModel):
        model.add_adapter(adapter, lora)
        return model
    return get_peft_model(model, lora, adapter_name=adapter)


def _lora_state(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().clone()
        for name, p in model.named_parameters()
        if "lora_" in name and f".{adapter}." in name
    }


def train_adapter(
    model: nn.Module,
    adapter: str,
    steps: list[list[Any]],
    loss_fn: Callable[[nn.Module, list[Any]], torch.Tensor],
    config: InstructConfig,
    checkpoint: Path | None,
    desc: str,
) -> list[float]:
    """Generic LoRA loop with checkpoints: returns the loss of each step (also of resumed steps)."""
    model.set_adapter(adapter)
    params = [p for n, p in model.named_parameters() if "lora_" in n and f".{adapter}." in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    start, losses = 0, []
    state = load_checkpoint(checkpoint) if checkpoint else None
    if state is not None and state.get("total_steps") == len(steps):
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in state["lora"].items():
                named[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        start, losses = int(state["step"]), list(state["losses"])
        log.info("%s: resuming at step %d of %d from %s", desc, start, len(steps), checkpoint)
    model.train()
    progress = tqdm(range(start, len(steps)), desc=desc, initial=start, total=len(steps), leave=False)
    for step in progress:
        with autocast(config.bf16, model):
            loss = loss_fn(model, steps[step])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        progress.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if checkpoint and (done % config.checkpoint_every == 0 or done == len(steps)):
            save_checkpoint(
                checkpoint,
                {
                    "step": done,
                    "total_steps": len(steps),
                    "losses": losses,
                    "lora": _lora_state(model, adapter),
                    "optimizer": optimizer.state_dict(),
                },
            )
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return losses


def _forward_ce(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(B,) mean cross-entropy of each row's response tokens."""
    return -sequence_logprobs(model, batch)


def scit_batch_loss(
    model: nn.Module, tokenizer: Any, pairs: Sequence[PreferencePair], config: InstructConfig
) -> torch.Tensor:
    """SCIT loss of a batch of pairs: (good, chosen) and (bad, rejected), each against the other instruction."""
    examples_match: list[Encoded] = []
    examples_mismatch: list[Encoded] = []
    for pair in pairs:
        for reply, own, other in (
            (pair.chosen, GOOD_INSTRUCTION, BAD_INSTRUCTION),
            (pair.rejected, BAD_INSTRUCTION, GOOD_INSTRUCTION),
        ):
            examples_match.append(encode(tokenizer, pair.prompt, reply, system=own, budget=config.budget))
            examples_mismatch.append(
                encode(tokenizer, pair.prompt, reply, system=other, budget=config.budget)
            )
    batch = collate(examples_match + examples_mismatch, pad_id(tokenizer))
    ce = _forward_ce(model, batch)
    n = len(examples_match)
    return scit_loss(ce[:n], ce[n:], config.epsilon)


def train_scit(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    config: InstructConfig,
    work_dir: Path | None = None,
) -> tuple[nn.Module, list[float]]:
    """Step 1, SCIT: one LoRA adapter ('scit') trained with `scit_loss`. Returns the wrapped model."""
    seed_everything(config.seed)
    model = add_lora(model, config, "scit")
    steps = shuffled_batches(pairs, config.batch_pairs, config.epochs, config.seed)
    checkpoint = work_dir / "scit.ckpt" if work_dir else None
    losses = train_adapter(
        model,
        "scit",
        steps,
        lambda m, b: scit_batch_loss(m, tokenizer, b, config),
        config,
        checkpoint,
        "SCIT",
    )
    return model, losses


def sft_batch_loss(
    model: nn.Module, tokenizer: Any, examples: Sequence[tuple[PreferencePair, str]], config: InstructConfig
) -> torch.Tensor:
    batch = collate(
        [encode(tokenizer, pair.prompt, reply, budget=config.budget) for pair, reply in examples],
        pad_id(tokenizer),
    )
    return _forward_ce(model, batch).mean()


def train_dual(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    config: InstructConfig,
    work_dir: Path | None = None,
) -> tuple[nn.Module, list[float]]:
    """Step 1, Dual: adapters 'good' (SFT on chosen) and 'bad' (SFT on rejected) on one wrapped model."""
    seed_everything(config.seed)
    losses: list[float] = []
    for adapter, pick in (("good", lambda p: p.chosen), ("bad", lambda p: p.rejected)):
        model = add_lora(model, config, adapter)
        items = [(pair, pick(pair)) for pair in pairs]
        steps = shuffled_batches(items, config.batch_pairs * 2, config.epochs, config.seed)
        checkpoint = work_dir / f"dual-{adapter}.ckpt" if work_dir else None
        losses += train_adapter(
            model,
            adapter,
            steps,
            lambda m, b: sft_batch_loss(m, tokenizer, b, config),
            config,
            checkpoint,
            f"Dual SFT ({adapter})",
        )
    return model, losses


@contextlib.contextmanager
def active_adapter(model: nn.Module, name: str | None) -> Iterator[None]:
    """Run with the LoRA adapter `name` active, or with adapters disabled (None: the base model)."""
    if not hasattr(model, "disable_adapter"):
        yield
        return
    if name is None:
        with model.disable_adapter():
            yield
        return
    model.set_adapter(name)
    yield


def instructed_adapters(model: nn.Module, method: str) -> tuple[str | None, str | None]:
    """The (good, bad) adapter names of step 1's model for `method`; None where the model has none
    (an uninstructed model: SCIT then contrasts the instructions on the base model)."""
    if method == "scit":
        name = "scit" if hasattr(model, "peft_config") and "scit" in model.peft_config else None
        return name, name
    if method == "dual":
        return "good", "bad"
    raise ValueError(f"method {method!r} is not 'scit' or 'dual'")


# -- step 1's separation, measured on pairs it never saw --------------------------------------------


def likelihood_gap(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    method: str,
    *,
    budget: TokenBudget = DEFAULT_BUDGET,
    bf16: bool = False,
    batch_size: int = 8,
    instructed: bool = True,
) -> dict[str, float]:
    """How well step 1's model tells chosen from rejected: per pair, with d(r) = LLn(r | good) - LLn(r |
    bad) (mean reply-token log-likelihood under the good vs the bad instruction for SCIT, the good vs the
    bad adapter for Dual), the gap d(chosen) - d(rejected). Returns its mean, the share of pairs with a
    positive gap and n. `instructed=False` measures the model before step 1 (adapters disabled)."""
    good_adapter, bad_adapter = instructed_adapters(model, method) if instructed else (None, None)
    good_system, bad_system = (GOOD_INSTRUCTION, BAD_INSTRUCTION) if method == "scit" else (None, None)
    pad = pad_id(tokenizer)
    scores: dict[str, list[float]] = {"good": [], "bad": []}
    model.eval()
    for side, adapter, system in (("good", good_adapter, good_system), ("bad", bad_adapter, bad_system)):
        examples = [
            encode(tokenizer, pair.prompt, reply, system=system, budget=budget)
            for pair in pairs
            for reply in (pair.chosen, pair.rejected)
        ]
        for start in tqdm(range(0, len(examples), batch_size), desc=f"step-1 gap ({side})", leave=False):
            batch = collate(examples[start : start + batch_size], pad)
            with torch.no_grad(), autocast(bf16, model), active_adapter(model, adapter):
                scores[side] += [float(x) for x in sequence_logprobs(model, batch)]
    d = torch.tensor(scores["good"], dtype=torch.float64) - torch.tensor(scores["bad"], dtype=torch.float64)
    gap = d[0::2] - d[1::2]
    return {"mean_gap": float(gap.mean()), "accuracy": float((gap > 0).double().mean()), "n": len(pairs)}
