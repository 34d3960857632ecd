"""Fitting conditions: a probe on the prompt that says when a profile should act (`profile.Condition`).

From two sets of conversations — prompts the condition should fire on and prompts it should not — this module
reads the prompts' states after each candidate decoder layer (forward passes only, the chat template applied
as the server applies it), fits a direction per layer on a training part, and chooses the layer, what it reads
(the mean over the prompt's tokens or the last token) and the threshold on a held-out part by a grid search:
the highest fire rate on should-fire prompts whose false-fire rate on should-not prompts stays within a bound,
ties to the wider separation. Two methods: `logistic` (the default: an L2-regularised logistic regression on
standardised states, scored as a dot product, `Condition.kind` "linear") and `mean-difference` (the two classes'
mean states subtracted, scored by cosine similarity — CAST's form: Lee et al., "Programming Refusal with
Conditional Activation Steering", ICLR 2025). The report has the confusion matrix of the choice and every grid
point. This is this project's own implementation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.profile import CONDITION_READS, Condition

Message = dict[str, str]


@dataclass
class ConditionFit:
    """The chosen condition and how it was chosen."""

    condition: Condition
    held_out: dict[str, int]  # tp, fn (should fire), fp, tn (should not)
    grid: list[dict[str, Any]] = field(default_factory=list)  # every (layer, reads) with its best threshold
    counts: dict[str, int] = field(default_factory=dict)  # prompts used: fire/no-fire, train/held-out

    def report(self) -> dict[str, Any]:
        held = self.held_out
        positives, negatives = held["tp"] + held["fn"], held["fp"] + held["tn"]
        return {
            "condition": self.condition.summary(),
            "held_out": {**held, "fire_rate_should_fire": held["tp"] / max(positives, 1),
                         "fire_rate_should_not": held["fp"] / max(negatives, 1)},
            "counts": self.counts,
            "grid": self.grid,
        }


def render_prompt(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """The prompt's token ids as the server's chat route makes them (template with the generation prompt)."""
    turns = [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def prompt_states(
    model: nn.Module, prompts: Sequence[Sequence[int]], layers: Sequence[int], *, batch_tokens: int = 4096,
    max_tokens: int = 512, progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[int, torch.Tensor]]:
    """For each prompt (token ids; longer ones keep their last `max_tokens`), its mean state and its last
    token's state after each of `layers`: {"mean": {layer: (N, H)}, "last": {layer: (N, H)}}, float32 on the
    CPU. Right-padded batches of about `batch_tokens` tokens, padding masked out."""
    device = next(model.parameters()).device
    ids = [list(p)[-max_tokens:] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: dict[str, dict[int, torch.Tensor]] = {reads: {} for reads in CONDITION_READS}
    chunks: dict[str, dict[int, list[tuple[list[int], torch.Tensor]]]] = {
        reads: {layer: [] for layer in layers} for reads in CONDITION_READS}
    start, done = 0, 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * len(ids[order[end]]) <= batch_tokens:
            end += 1
        batch = order[start:end]
        width = max(len(ids[i]) for i in batch)
        tokens = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            tokens[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        hidden = model(input_ids=tokens.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                       use_cache=False).hidden_states
        lengths = mask.sum(dim=1)
        weights = mask.unsqueeze(-1).float().to(device)
        for layer in layers:
            states = hidden[layer + 1].float()
            means = (states * weights).sum(dim=1) / lengths.to(device).unsqueeze(1)
            lasts = states[torch.arange(len(batch), device=device), (lengths - 1).to(device)]
            chunks["mean"][layer].append((batch, means.cpu()))
            chunks["last"][layer].append((batch, lasts.cpu()))
        done += len(batch)
        if progress is not None:
            progress(done, len(ids))
        start = end
    for reads in CONDITION_READS:
        for layer in layers:
            hidden_size = chunks[reads][layer][0][1].shape[1]
            table = torch.zeros(len(ids), hidden_size)
            for batch, values in chunks[reads][layer]:
                table[torch.tensor(batch)] = values
            out[reads][layer] = table
    return out


def split_held_out(count: int, fraction: float, *, seed: int, salt: str) -> tuple[list[int], list[int]]:
    """Indices 0..count-1 into (train, held-out) by a hash of (seed, salt, index): fixed, reproducible."""
    train, held = [], []
    for i in range(count):
        digest = hashlib.sha256(f"{seed}:{salt}:{i}".encode()).digest()
        (held if int.from_bytes(digest[:8], "big") / 2**64 < fraction else train).append(i)
    return train, held


METHODS = ("logistic", "mean-difference")


def logistic_direction(positive: torch.Tensor, negative: torch.Tensor, *, l2: float = 1e-2,
                       steps: int = 200) -> tuple[torch.Tensor, float]:
    """(w, b) of an L2-regularised logistic regression separating `positive` (N, H) from `negative` (M, H), on
    standardised features (L-BFGS), mapped back to the raw states: the logit of h is ``h @ w + b``."""
    states = torch.cat([positive, negative]).double()
    labels = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).double()
    mean, scale = states.mean(dim=0), states.std(dim=0) + 1e-6
    z = (states - mean) / scale
    weight = torch.zeros(states.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ weight + bias, labels)
        loss = loss + l2 * (weight * weight).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(closure)
    w = (weight / scale).detach()
    b = float(bias.detach() - (mean / scale * weight.detach()).sum())
    return w.float(), b


def _fit_direction(method: str, positive: torch.Tensor, negative: torch.Tensor) -> tuple[torch.Tensor, str]:
    if method == "logistic":
        return logistic_direction(positive, negative)[0], "linear"
    if method == "mean-difference":
        return positive.mean(dim=0) - negative.mean(dim=0), "cosine"
    raise ValueError(f"method {method!r} is not one of {METHODS}")


def choose_threshold(fire: torch.Tensor, no_fire: torch.Tensor, *, max_false_fire: float) -> tuple[float, float, float]:
    """(threshold, fire rate on `fire`, fire rate on `no_fire`) of "score > threshold": among thresholds between
    the scores whose false-fire rate is within `max_false_fire`, the one with the highest fire rate, then the
    widest margin (the midpoint between neighbouring scores)."""
    scores = torch.cat([fire, no_fire]).sort().values
    candidates = torch.cat([scores[:1] - 1e-3, (scores[1:] + scores[:-1]) / 2, scores[-1:] + 1e-3])
    best: tuple[float, float, float, float] | None = None  # (hit, -false, margin, threshold)
    for threshold in candidates.tolist():
        hit = float((fire > threshold).float().mean())
        false = float((no_fire > threshold).float().mean())
        if false > max_false_fire:
            continue
        margin = float(min((fire - threshold).abs().min(), (no_fire - threshold).abs().min()))
        key = (hit, -false, margin, threshold)
        if best is None or key[:3] > best[:3]:
            best = key
    if best is None:  # nothing within the bound: never fire
        threshold = float(scores[-1]) + 1e-3
        return threshold, 0.0, 0.0
    return best[3], best[0], -best[1]


def fit_condition(
    fire: dict[str, dict[int, torch.Tensor]],
    no_fire: dict[str, dict[int, torch.Tensor]],
    *,
    held_out: float = 0.3,
    max_false_fire: float = 0.02,
    seed: int = 0,
    reads: Sequence[str] = CONDITION_READS,
    method: str = "logistic",
) -> ConditionFit:
    """Choose the condition from `prompt_states` of the two sets (module docstring)."""
    layers = sorted(next(iter(fire.values())))
    n_fire, n_not = len(next(iter(fire["mean"].values()))), len(next(iter(no_fire["mean"].values())))
    fire_train, fire_held = split_held_out(n_fire, held_out, seed=seed, salt="fire")
    not_train, not_held = split_held_out(n_not, held_out, seed=seed, salt="no-fire")
    if not (fire_train and fire_held and not_train and not_held):
        raise ValueError("too few prompts: each set needs some for training and some held out")
    grid: list[dict[str, Any]] = []
    best: tuple[tuple[float, float, float], Condition] | None = None
    for mode in reads:
        for layer in layers:
            positive, negative = fire[mode][layer], no_fire[mode][layer]
            direction, kind = _fit_direction(method, positive[fire_train], negative[not_train])
            if float(direction.norm()) == 0.0 or not bool(torch.isfinite(direction).all()):
                continue
            probe = Condition(layer=layer, direction=direction, threshold=0.0, reads=mode, kind=kind)  # scores only
            pos_scores = probe.scores(positive[fire_held])
            neg_scores = probe.scores(negative[not_held])
            threshold, hit, false = choose_threshold(pos_scores, neg_scores, max_false_fire=max_false_fire)
            spread = float(torch.cat([pos_scores, neg_scores]).std()) or 1.0
            separation = float(pos_scores.mean() - neg_scores.mean()) / spread
            grid.append({"layer": layer, "reads": mode, "threshold": threshold, "fire_rate_should_fire": hit,
                         "fire_rate_should_not": false, "separation": separation})
            key = (hit, -false, separation)
            if best is None or key > best[0]:
                best = (key, dataclasses.replace(probe, threshold=threshold))
    if best is None:
        raise ValueError("no layer separates the two sets (every direction is zero)")
    condition = best[1]
    positive = condition.scores(fire[condition.reads][condition.layer][fire_held])
    negative = condition.scores(no_fire[condition.reads][condition.layer][not_held])
    tp = int((positive > condition.threshold).sum())
    fp = int((negative > condition.threshold).sum())
    confusion = {"tp": tp, "fn": len(fire_held) - tp, "fp": fp, "tn": len(not_held) - fp}
    counts = {"fire_train": len(fire_train), "fire_held_out": len(fire_held), "no_fire_train": len(not_train),
              "no_fire_held_out": len(not_held)}
    return ConditionFit(condition=condition, held_out=confusion, grid=grid, counts=counts)


def evaluate_condition(condition: Condition, states: dict[str, dict[int, torch.Tensor]]) -> torch.Tensor:
    """Whether `condition` fires on each prompt of `prompt_states` (bool (N,))."""
    scores = condition.scores(states[condition.reads][condition.layer])
    return scores > condition.threshold if condition.comparison == ">" else scores < condition.threshold


def unique_prompts(conversations: Sequence[Sequence[Message]]) -> list[list[Message]]:
    """The conversations without repeats, in first-seen order."""
    seen: set[str] = set()
    out = []
    for messages in conversations:
        key = json.dumps(list(messages), sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append([dict(m) for m in messages])
    return out
