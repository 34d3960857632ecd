"""The plumbing the training steps share: seeds, atomic checkpoints, seeded batch draws, and the one
optimiser loop that learns per-layer offsets (and low-rank terms) with resumable checkpoints.

Step 3 (`fit`) and the preference fit (`pref`) both run `adam_on_offsets` over a `batch_plan` steering every
row of a batch alike; `batch_prompt_kl` is the prompt-token fluency cost both can add. Knows no RAHF step.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.hooks import Steerer, SteeringPlan
from ..core.profile import atomic_write
from ..core.tensors import autocast, model_device
from .data import Batch

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic torch.save, so an interrupted run never leaves half a checkpoint."""
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def shuffled_batches(items: Sequence[Any], size: int, epochs: int, seed: int) -> list[list[Any]]:
    """`epochs` seeded shuffles of `items`, one after the other, cut into batches of `size`."""
    rng = random.Random(seed)
    batches: list[list[Any]] = []
    for _ in range(epochs):
        order = list(items)
        rng.shuffle(order)
        batches.extend(order[i : i + size] for i in range(0, len(order), size))
    return batches


LowRank = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (down (rank, H), up (H, rank))


def batch_plan(
    size: int, offsets: dict[int, torch.Tensor], low_rank: LowRank | None
) -> SteeringPlan:
    """The same offsets and low-rank terms on every row of a batch of `size` (differentiable)."""
    return SteeringPlan(
        offsets={layer: o.view(1, 1, -1).expand(size, 1, -1) for layer, o in offsets.items()},
        low_rank={
            layer: (down.unsqueeze(0).expand(size, -1, -1), up.unsqueeze(0).expand(size, -1, -1))
            for layer, (down, up) in (low_rank or {}).items()
        },
    )


def fit_draws(count: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The record indices of every step of a fit, drawn up front (seeded) so that a resumed run matches:
    shuffled passes over the records, `batch_size` per step."""
    rng = random.Random(seed)
    order: list[int] = []
    draws = []
    for _ in range(steps):
        if len(order) < batch_size:
            order = list(range(count))
            rng.shuffle(order)
        draws.append(order[:batch_size])
        order = order[batch_size:]
    return draws


def factor_penalty(low_rank: LowRank) -> torch.Tensor:
    """sum over layers of ||down||^2 + ||up||^2: both factors, so neither can grow while the other shrinks."""
    return sum(
        (down.float().pow(2).sum() + up.float().pow(2).sum() for down, up in low_rank.values()), torch.zeros(())
    )


def adam_on_offsets(
    layers: Sequence[int],
    hidden: int,
    lr: float,
    draws: Sequence[list[int]],
    batch_loss: Callable[[dict[int, torch.Tensor], list[int], LowRank], tuple[torch.Tensor, dict[str, str]]],
    checkpoint: Path | None,
    checkpoint_every: int,
    desc: str,
    identity: dict[str, Any] | None = None,
    rank: int = 0,
    seed: int = 0,
    initial: dict[int, torch.Tensor] | None = None,
    down_lr: float | None = None,
) -> tuple[dict[int, torch.Tensor], LowRank, list[float]]:
    """Adam on one offset per layer (zeros at first, or `initial`), one step per entry of `draws`.

    `down_lr` is the learning rate of the low-rank terms' ``down`` factors (None: `lr`): their rows start at
    unit norm, while offsets and ``up`` live on the scale of the hidden states.

    With `rank` > 0 each layer also learns a low-rank term (down: seeded random orthonormal rows, up:
    zeros at first); with 0 the low-rank terms stay empty. `batch_loss(offsets, draw, low_rank)` returns
    the step's loss (differentiable in both) and extra progress-bar fields. State goes to `checkpoint`
    every `checkpoint_every` steps and at the end; a checkpoint whose step count and `identity` match is
    resumed. Returns the offsets, the low-rank terms and every loss.
    """
    steps = len(draws)
    delta = torch.zeros(len(layers), hidden)
    if initial is not None:
        delta = torch.stack([initial[layer].float() for layer in layers])
    delta.requires_grad_(True)
    params = {"delta": delta}
    if rank:
        generator = torch.Generator().manual_seed(seed)
        basis = torch.linalg.qr(torch.randn(len(layers), hidden, rank, generator=generator))[0]
        params["down"] = basis.transpose(1, 2).contiguous().requires_grad_(True)  # (L, rank, H)
        params["up"] = torch.zeros(len(layers), hidden, rank, requires_grad=True)
    rates = {key: down_lr if key == "down" and down_lr is not None else lr for key in params}
    groups = [{"params": [tensor], "lr": rates[key]} for key, tensor in params.items()]
    optimizer = torch.optim.Adam(groups, lr=lr)
    identity = {"steps": steps, **(identity or {}), **({"rank": rank} if rank else {})}
    losses: list[float] = []
    start = 0
    state = load_checkpoint(checkpoint) if checkpoint else None
    if state is not None and all(state.get(key) == value for key, value in identity.items()):
        with torch.no_grad():
            for key, tensor in params.items():
                tensor.copy_(state[key])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = int(state["step"]), list(state["losses"])
        log.info("%s: resuming at step %d of %d from %s", desc, start, steps, checkpoint)

    def current_low_rank() -> LowRank:
        if not rank:
            return {}
        return {layer: (params["down"][i], params["up"][i]) for i, layer in enumerate(layers)}

    progress = tqdm(range(start, steps), desc=desc, initial=start, total=steps, leave=False)
    for step in progress:
        offsets = {layer: delta[i] for i, layer in enumerate(layers)}
        loss, postfix = batch_loss(offsets, draws[step], current_low_rank())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        progress.set_postfix(loss=f"{losses[-1]:.3f}", **postfix)
        done = step + 1
        if checkpoint and (done % checkpoint_every == 0 or done == steps):
            saved = {key: tensor.detach().clone() for key, tensor in params.items()}
            state = {"step": done, **saved, "optimizer": optimizer.state_dict()}
            save_checkpoint(checkpoint, {**identity, **state, "losses": losses})
    offsets = {layer: delta[i].detach().clone() for i, layer in enumerate(layers)}
    low_rank = {layer: (down.detach().clone(), up.detach().clone()) for layer, (down, up) in current_low_rank().items()}
    return offsets, low_rank, losses


def batch_prompt_kl(
    model: nn.Module,
    batch: Batch,
    offsets: dict[int, torch.Tensor],
    bf16: bool,
    low_rank: LowRank | None,
) -> torch.Tensor:
    keep = batch.attention_mask[:, 1:].bool()  # positions whose next token is real (right padding)
    batch = batch.to(model_device(model))
    with torch.no_grad(), autocast(bf16, model):
        plain = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    plan = batch_plan(batch.input_ids.shape[0], offsets, low_rank)
    with autocast(bf16, model), Steerer.attach(model).steering(plan):
        moved = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    log_p = torch.log_softmax(plain[:, :-1][keep].float(), dim=-1)
    log_q = torch.log_softmax(moved[:, :-1][keep].float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
