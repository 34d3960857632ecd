"""RAHF step 3, fit: one offset per target layer (and, with a rank, low-rank input-dependent terms) that moves
the frozen base model's states towards ``anchor + alpha * v`` of step 2's records (`fit_offsets`, through the
same `Steerer` hooks the server uses); the paper's own LoRA parameterisation (`fit_lora`, `lora_terms`); the
closed-form baselines from the same records (`mean_pattern_offsets`, `caa_offsets`, `pca_offsets`); and
`make_profile`, which writes any fit's result as a `Profile`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.hooks import Steerer
from ..core.layers import find_decoder_layers, hidden_size_of, unwrap_model
from ..core.profile import LORA_PROJECTIONS, LoraTerms, ModelFingerprint, Profile
from ..core.tensors import autocast
from .collect import PatternRecord, forward_recorded, record_layers
from .data import Encoded, collate, pad_id
from .instruct import InstructConfig, add_lora, train_adapter
from .loop import LowRank, adam_on_offsets, batch_plan, batch_prompt_kl, factor_penalty, fit_draws, seed_everything


def mean_pattern_offsets(
    records: Sequence[PatternRecord], layers: Sequence[int], alpha: float
) -> dict[int, torch.Tensor]:
    """Baseline: alpha times the mean of v over every collected response token, per layer."""
    sums = torch.zeros(len(layers), records[0].pattern.shape[-1], dtype=torch.float64)
    count = 0
    for record in records:
        sums += record.pattern.double().sum(dim=1)
        count += record.pattern.shape[1]
    mean = (alpha * sums / count).float()
    return {layer: mean[i] for i, layer in enumerate(layers)}


def pair_differences(records: Sequence[PatternRecord], layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per layer (N, H): token-mean base state of the chosen reply minus that of the rejected, per pair."""
    by_pair: dict[int, dict[int, torch.Tensor]] = {}
    for record in records:
        if record.base_mean is None:
            raise ValueError("CAA and PCA need the base model's states: collect with base_means=True")
        by_pair.setdefault(record.pair_index, {})[record.label] = record.base_mean.double()  # (L, H)
    complete = [p for p in sorted(by_pair) if set(by_pair[p]) == {0, 1}]
    if not complete:
        raise ValueError("CAA and PCA need both replies of a pair: collect with replies='both'")
    diffs = torch.stack([by_pair[p][1] - by_pair[p][0] for p in complete])  # (N, L, H)
    return {layer: diffs[:, i].float() for i, layer in enumerate(layers)}


def caa_offsets(records: Sequence[PatternRecord], layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Baseline CAA: mean over pairs of the base-model difference chosen minus rejected."""
    return {layer: d.double().mean(dim=0).float() for layer, d in pair_differences(records, layers).items()}


def pca_offsets(records: Sequence[PatternRecord], layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Baseline RepE-PCA: first principal direction of the pair differences, signed and scaled by labels.

    The unit direction u (top right-singular vector of the centred differences) points so that the mean
    projection m of the differences on it is positive; the offset is m * u.
    """
    out = {}
    for layer, diffs in pair_differences(records, layers).items():
        d = diffs.double()
        _, _, vh = torch.linalg.svd(d - d.mean(dim=0), full_matrices=False)
        direction = vh[0]
        projection = float((d @ direction).mean())
        if projection < 0:
            direction, projection = -direction, -projection
        out[layer] = (direction * projection).float()
    return out


@dataclass
class FitConfig:
    """Adam on per-layer offsets (and, with `rank` > 0, low-rank input-dependent terms) with the RAHF
    alignment loss towards ``anchor + alpha * v``, plus ``kl *`` the prompt-token KL(unsteered || steered)
    of the batch's prompts and ``l2 * sum_l (||down_l||^2 + ||up_l||^2)`` on the low-rank factors."""

    alpha: float = 1.0
    steps: int = 80
    batch_size: int = 8
    lr: float | None = None  # None: a quarter of the RMS entry of the mean-pattern offsets
    rank: int = 0
    kl: float = 0.0
    l2: float = 0.0
    init: str = "zeros"  # or "shift": offsets start at `shift_offsets` (needs the records' base means)
    down_lr: float = 1e-3  # Adam's lr of the unit-norm `down` rows; offsets and `up` take `lr`
    bf16: bool = False
    checkpoint_every: int = 20
    seed: int = 0


def shift_offsets(records: Sequence[PatternRecord], layers: Sequence[int], alpha: float) -> dict[int, torch.Tensor]:
    """A closed-form start for the RAHF fit: the mean shift from the base model's states to the target,
    ``s_l = mean(target_l) - mean(base_l)`` (per record, over reply tokens), taken layer by layer as the part
    the earlier target layers have not added yet (the residual stream carries an offset forward):
    ``delta_l = s_l - s_prev``."""
    sums = torch.zeros(len(layers), records[0].pattern.shape[-1], dtype=torch.float64)
    for record in records:
        if record.base_mean is None:
            raise ValueError("the 'shift' start needs the base model's states: collect with base_means=True")
        sums += record.target(alpha).double().mean(dim=1) - record.base_mean.double()
    shift = sums / len(records)
    previous = torch.zeros_like(shift[0])
    out = {}
    for i, layer in enumerate(layers):
        out[layer] = (shift[i] - previous).float()
        previous = shift[i]
    return out


def alignment_loss(
    model: nn.Module,
    records: Sequence[PatternRecord],
    layers: Sequence[int],
    offsets: dict[int, torch.Tensor],
    alpha: float,
    pad_id: int,
    bf16: bool = False,
    low_rank: LowRank | None = None,
) -> torch.Tensor:
    """mean over target layers and reply tokens of || h^steered_l(x)[t] - (anchor_l(x)[t] + alpha v_l(t)) ||_2.

    The frozen model is steered by `offsets` (layer -> (H,)) and optional `low_rank` terms (layer -> (down,
    up)), all may require grad, through the server's hooks at every position; the pass stops after the
    deepest target layer.
    """
    batch = collate([Encoded(r.input_ids, r.prompt_len) for r in records], pad_id)
    plan = batch_plan(batch.input_ids.shape[0], offsets, low_rank)
    steerer = Steerer.attach(model)
    with autocast(bf16, model), record_layers(model, layers, stop=True) as recorded, steerer.steering(plan):
        forward_recorded(model, batch)
    device = recorded[layers[0]].device
    total = torch.zeros((), dtype=torch.float32, device=device)
    count = 0
    for row, record in enumerate(records):
        keep = batch.response_mask[row].bool().to(device)
        target = record.target(alpha).to(device)
        for i, layer in enumerate(layers):
            steered = recorded[layer][row][keep].float()  # (T, H)
            total = total + (steered - target[i]).norm(dim=-1).sum()
            count += steered.shape[0]
    return total / count


def records_prompt_kl(
    model: nn.Module,
    records: Sequence[PatternRecord],
    offsets: dict[int, torch.Tensor],
    pad_id: int,
    bf16: bool = False,
    low_rank: LowRank | None = None,
) -> torch.Tensor:
    """`prompt_kl` over the prompt tokens of pattern records (each prompt once)."""
    prompts = list(dict.fromkeys(tuple(r.input_ids[: r.prompt_len]) for r in records))
    batch = collate([Encoded(p, 0) for p in prompts], pad_id)
    return batch_prompt_kl(model, batch, offsets, bf16, low_rank)


def fit_offsets(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[PatternRecord],
    layers: Sequence[int],
    config: FitConfig,
    checkpoint: Path | None = None,
) -> tuple[dict[int, torch.Tensor], LowRank, list[float]]:
    """Step 3: learn offsets (layer -> (H,)) and, with `config.rank`, low-rank terms of the frozen model
    by Adam on `alignment_loss` (+ KL and L2 terms, see `FitConfig`). Returns offsets, low-rank terms
    (empty for rank 0) and each step's total loss."""
    seed_everything(config.seed)
    base = unwrap_model(model)
    hidden = records[0].pattern.shape[-1]
    lr = config.lr
    if lr is None:
        reference = torch.stack(list(mean_pattern_offsets(records, layers, config.alpha).values()))
        lr = 0.25 * float(reference.pow(2).mean().sqrt()) or 1e-3
    draws = fit_draws(len(records), config.steps, config.batch_size, config.seed)
    pad = pad_id(tokenizer)

    def batch_loss(
        offsets: dict[int, torch.Tensor], indices: list[int], low_rank: LowRank
    ) -> tuple[torch.Tensor, dict[str, str]]:
        batch = [records[i] for i in indices]
        align = alignment_loss(base, batch, layers, offsets, config.alpha, pad, config.bf16, low_rank)
        total, postfix = align, {"align": f"{float(align.detach()):.3f}"}
        if config.l2 and low_rank:
            total = total + config.l2 * factor_penalty(low_rank)
        if config.kl:
            kl = records_prompt_kl(base, batch, offsets, pad, config.bf16, low_rank)
            total = total + config.kl * kl
            postfix["kl"] = f"{float(kl.detach()):.4f}"
        return total, postfix

    identity = {
        "alpha": config.alpha, "kl": config.kl, "l2": config.l2, "records": len(records), "init": config.init,
        "down_lr": config.down_lr, "lr": lr,
    }
    initial = shift_offsets(records, layers, config.alpha) if config.init == "shift" else None
    return adam_on_offsets(
        layers, hidden, lr, draws, batch_loss, checkpoint, config.checkpoint_every, "fit RAHF terms",
        identity=identity, rank=config.rank, seed=config.seed, initial=initial, down_lr=config.down_lr,
    )


def fit_lora(
    model: nn.Module,
    tokenizer: Any,
    records: Sequence[PatternRecord],
    layers: Sequence[int],
    config: FitConfig,
    lora: InstructConfig,
    checkpoint: Path | None = None,
    adapter: str = "rahf",
) -> tuple[nn.Module, list[float]]:
    """Step 3 in the paper's own parameterisation: a LoRA adapter `adapter` (``lora``'s rank, alpha and
    target projections, q/v by default) on the frozen base model, trained with `alignment_loss` towards
    ``anchor + alpha * v`` on the same records and batches as `fit_offsets` (AdamW at ``lora.lr``). The
    result changes the model's weights for every row, so the server cannot switch it per request; it
    measures what that parameterisation gains over offsets + low-rank terms. Returns the wrapped model
    (`adapter` active; unload it to get the base model back) and each step's loss."""
    seed_everything(config.seed)
    draws = fit_draws(len(records), config.steps, config.batch_size, config.seed)
    steps = [[records[i] for i in draw] for draw in draws]
    pad = pad_id(tokenizer)
    wrapped = add_lora(model, lora, adapter)

    def loss_fn(m: nn.Module, batch: list[PatternRecord]) -> torch.Tensor:
        # autocast is the caller's (train_adapter); no steering plan: the adapter is the change
        return alignment_loss(m, batch, layers, {}, config.alpha, pad, bf16=False)

    losses = train_adapter(wrapped, adapter, steps, loss_fn, lora, checkpoint, "fit RAHF LoRA")
    wrapped.set_adapter(adapter)
    return wrapped, losses


def lora_terms(model: nn.Module, adapter: str = "rahf") -> tuple[dict[int, torch.Tensor], LoraTerms]:
    """A peft LoRA adapter as profile terms, so the server can apply it per row: per decoder layer and
    attention projection ``(a, scaling * b)`` (peft adds ``scaling * B(A(x))`` with no dropout here), and a
    zero offset at each of those layers. Layers whose ``b`` is all zero (never trained, e.g. past the
    deepest target layer of the fit) are left out."""
    hidden = hidden_size_of(model)
    terms: LoraTerms = {}
    for index, layer in enumerate(find_decoder_layers(model)):
        attention = getattr(layer, "self_attn", None)
        for name in LORA_PROJECTIONS:
            module = getattr(attention, name, None)
            if module is None or adapter not in getattr(module, "lora_A", {}):
                continue
            a = module.lora_A[adapter].weight.detach().float()
            b = module.lora_B[adapter].weight.detach().float() * float(module.scaling[adapter])
            if bool((b != 0).any()):
                terms.setdefault(index, {})[name] = (a.clone(), b.clone())
    return {layer: torch.zeros(hidden) for layer in terms}, terms


# -- profiles ----------------------------------------------------------------------------------------

FIT_METHODS = ("rahf", "lora", "mean", "caa", "pca", "pref")
RECORD_FITS = ("rahf", "mean", "caa", "pca")  # the fits that need steps 1 and 2 (patterns)


def make_profile(
    name: str,
    offsets: dict[int, torch.Tensor],
    *,
    fit: str,
    fingerprint: ModelFingerprint | None,
    provenance: dict[str, Any],
    description: str = "",
    default_strength: float = 1.0,
    position_mode: str = "all",
    low_rank: LowRank | None = None,
    lora: LoraTerms | None = None,
) -> Profile:
    return Profile(
        name=name,
        offsets=offsets,
        low_rank=dict(low_rank or {}),
        lora=dict(lora or {}),
        description=description,
        fingerprint=fingerprint,
        default_strength=default_strength,
        position_mode=position_mode,
        method="pref" if fit == "pref" else f"rahf-{provenance.get('instruct', 'none')}/{fit}",
        provenance={**provenance, "fit": fit, "created_unix": int(time.time())},
    )


def offsets_rms(offsets: dict[int, torch.Tensor]) -> float:
    values = torch.stack(list(offsets.values()))
    return math.sqrt(float(values.pow(2).mean()))
