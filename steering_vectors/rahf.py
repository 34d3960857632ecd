"""RAHF training: instruct (SCIT or Dual LoRA), collect activity patterns, fit offsets, baselines.

Knows the three RAHF steps as adapted in ../shared/docs/RAHF.md and writes their results as `Profile`
files. Offsets are fitted through the same `Steerer` hooks the server uses. Knows nothing about the
command line (see `pipeline_cli`) or about evaluation (see `evaluate`).

Step 1 (`train_scit`, `train_dual`) teaches a LoRA-wrapped model the difference between preferred and
dispreferred replies. Step 2 (`collect_patterns`) runs the same reply tokens through the instructed
model(s) twice and keeps, per target layer and response token, the hidden-state difference ``v``, and the
base model's hidden states ``h`` over the same tokens without any instruction. Step 3 (`fit_offsets`)
learns one offset per layer that moves the frozen base model's states towards ``h + alpha * v``; the
closed-form baselines (`mean_pattern_offsets`, `caa_offsets`, `pca_offsets`) come from the same records.

`fit_preference_offsets` (fit "pref") is this project's own addition, not part of RAHF: offsets learned
directly on a preference loss over the training pairs, through the same hooks, without steps 1 and 2.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import DEFAULT_BUDGET, Batch, Encoded, PreferencePair, TokenBudget, collate, encode, pad_id
from .hooks import Steerer, SteeringPlan
from .layers import find_decoder_layers, hidden_size_of, unwrap_model
from .profile import LORA_PROJECTIONS, LoraTerms, ModelFingerprint, Profile, atomic_write

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


# -- small utilities --------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(enabled: bool, model: nn.Module | None = None) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on the model's device type (CPU when not given), or nothing."""
    if enabled:
        device_type = model_device(model).type if model is not None else "cpu"
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


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


class _StopForward(Exception):
    """Raised by a recording hook after the deepest layer of interest: the rest of the forward is skipped."""


@contextlib.contextmanager
def record_layers(
    model: nn.Module, layers: Sequence[int], *, stop: bool = False
) -> Iterator[dict[int, torch.Tensor]]:
    """Record the outputs of decoder layers (after any steering hook) into a dict, for the block.

    Installs the steering hooks first, so recorded outputs include the terms of an active plan. With
    `stop`, the forward pass ends right after the deepest of `layers` (no later layers, no output head):
    run it through `forward_recorded`, which swallows the early exit.
    """
    Steerer.attach(model)
    decoder = find_decoder_layers(model)
    recorded: dict[int, torch.Tensor] = {}
    handles = []
    last = max(layers)
    for layer in layers:

        def hook(module: nn.Module, args: object, output: object, layer: int = layer) -> None:
            recorded[layer] = output[0] if isinstance(output, tuple) else output  # (B, T, H)
            if stop and layer == last:
                raise _StopForward

        handles.append(decoder[layer].register_forward_hook(hook))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def forward_recorded(model: nn.Module, batch: Batch) -> None:
    """One forward pass over `batch` for `record_layers`; an early exit after the last recorded layer is
    the expected end, not an error."""
    batch = batch.to(model_device(model))
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except _StopForward:
        pass


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


# -- step 1: instruct --------------------------------------------------------------------------------


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


def _train_adapter(
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


def _batches(items: Sequence[Any], size: int, epochs: int, seed: int) -> list[list[Any]]:
    rng = random.Random(seed)
    batches: list[list[Any]] = []
    for _ in range(epochs):
        order = list(items)
        rng.shuffle(order)
        batches.extend(order[i : i + size] for i in range(0, len(order), size))
    return batches


def response_token_logprobs(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(B, T-1) log-probability of each next token, computed only where it is a response token (else 0).

    The output head runs on response positions only: with a 49k vocabulary it is a large share of the cost.
    """
    base = unwrap_model(model)
    batch = batch.to(model_device(base))
    hidden = base.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)[0]
    keep = batch.response_mask[:, 1:].bool()  # positions t whose next token t+1 is a response token
    logits = base.lm_head(hidden[:, :-1][keep])  # (N, V)
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, batch.input_ids[:, 1:][keep].unsqueeze(-1))
    out = torch.zeros(keep.shape, dtype=torch.float32, device=picked.device)
    out[keep] = picked.squeeze(-1)
    return out


def _forward_ce(model: nn.Module, batch: Batch) -> torch.Tensor:
    batch = batch.to(model_device(model))
    mask = batch.response_mask[:, 1:].float()
    return -(response_token_logprobs(model, batch) * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


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
    steps = _batches(pairs, config.batch_pairs, config.epochs, config.seed)
    checkpoint = work_dir / "scit.ckpt" if work_dir else None
    losses = _train_adapter(
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
        steps = _batches(items, config.batch_pairs * 2, config.epochs, config.seed)
        checkpoint = work_dir / f"dual-{adapter}.ckpt" if work_dir else None
        losses += _train_adapter(
            model,
            adapter,
            steps,
            lambda m, b: sft_batch_loss(m, tokenizer, b, config),
            config,
            checkpoint,
            f"Dual SFT ({adapter})",
        )
    return model, losses


# -- step 2: collect activity patterns --------------------------------------------------------------


@dataclass
class PatternRecord:
    """One (prompt, reply): base-model ids and, per target layer (rows of the tensors), reply-token states.

    anchor: (L, T, H) hidden states of the step-1 model on the plain input (no instruction) over the reply
        tokens: SCIT's instructed model, Dual's model tuned on chosen replies. The RAHF target starts here.
    pattern: (L, T, H) the activity pattern v (good minus bad) over the same reply tokens.
    base_mean: (L, H) token-mean of the base model's states over the reply (for CAA and PCA), or None
        when not collected.
    """

    input_ids: tuple[int, ...]
    prompt_len: int
    label: int  # 1 for the chosen reply, 0 for the rejected one
    pair_index: int
    anchor: torch.Tensor
    pattern: torch.Tensor
    base_mean: torch.Tensor | None = None

    def nbytes(self) -> int:
        tensors = [self.anchor, self.pattern] + ([self.base_mean] if self.base_mean is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def target(self, alpha: float) -> torch.Tensor:
        """(L, T, H) float32 RAHF target ``anchor + alpha * pattern``."""
        return self.anchor.float() + alpha * self.pattern.float()


class PatternStore:
    """Records of step 2, kept in memory up to `memory_limit` bytes and spilled to disk in shards beyond."""

    def __init__(
        self, layers: Sequence[int], spill_dir: Path | None = None, memory_limit: int = 512 << 20
    ) -> None:
        self.layers = list(layers)
        self.spill_dir = spill_dir
        self.memory_limit = memory_limit
        self._memory: list[PatternRecord] = []
        self._shards: list[Path] = []
        self._memory_bytes = 0
        self.count = 0

    def add(self, record: PatternRecord) -> None:
        self._memory.append(record)
        self._memory_bytes += record.nbytes()
        self.count += 1
        if self.spill_dir is not None and self._memory_bytes > self.memory_limit:
            self.spill()

    def spill(self) -> None:
        if not self._memory or self.spill_dir is None:
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"patterns-{len(self._shards):04d}.pt"
        save_checkpoint(path, {"records": [vars(r) for r in self._memory]})
        self._shards.append(path)
        self._memory, self._memory_bytes = [], 0

    @property
    def spilled(self) -> int:
        return len(self._shards)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[PatternRecord]:
        for shard in self._shards:
            for data in torch.load(shard, map_location="cpu", weights_only=False)["records"]:
                yield PatternRecord(**data)
        yield from self._memory

    def all(self) -> list[PatternRecord]:
        return list(self)

    def save(self, path: Path) -> None:
        """One file with every record; shards are written one at a time, so memory stays bounded."""
        self.spill()
        save_checkpoint(path, {"layers": self.layers, "shards": [str(p) for p in self._shards], "records": [
            vars(r) for r in self._memory
        ]})

    @classmethod
    def load(cls, path: Path) -> PatternStore:
        data = torch.load(path, map_location="cpu", weights_only=False)
        store = cls(data["layers"])
        for shard in data.get("shards", []):
            for record in torch.load(shard, map_location="cpu", weights_only=False)["records"]:
                store.add(PatternRecord(**record))
        for record in data["records"]:
            store.add(PatternRecord(**record))
        return store


def _hidden_rows(model: nn.Module, batch: Batch, layers: Sequence[int], bf16: bool) -> list[torch.Tensor]:
    """Per row, (L, T_response, H) float32 hidden states at `layers` over the response tokens.

    The forward pass stops after the deepest of `layers`."""
    with torch.no_grad(), autocast(bf16, model), record_layers(model, layers, stop=True) as recorded:
        forward_recorded(model, batch)
    stacked = torch.stack([recorded[layer].float().cpu() for layer in layers], dim=1)  # (B, L, T, H)
    rows = []
    for row in range(batch.input_ids.shape[0]):
        keep = batch.response_mask[row].bool()
        rows.append(stacked[row][:, keep].clone())
    return rows


@contextlib.contextmanager
def _adapter(model: nn.Module, name: str | None) -> Iterator[None]:
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


def collect_patterns(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    layers: Sequence[int],
    *,
    method: str,
    budget: TokenBudget = DEFAULT_BUDGET,
    replies: str = "both",
    batch_size: int = 8,
    bf16: bool = False,
    spill_dir: Path | None = None,
    memory_limit: int = 512 << 20,
    base_means: bool = True,
    dtype: torch.dtype = torch.float32,
) -> PatternStore:
    """Step 2: for each pair and reply, v = h(good) - h(bad) over the reply tokens, and the anchor.

    method "scit": one model (adapter 'scit', or none), good/bad instruction as system prompt; the anchor
        is the same model on the plain input.
    method "dual": adapters 'good' and 'bad' on the plain input; the anchor is the 'good' states.
    base_means: also keep the token-mean of the base model's states (adapters disabled) for CAA and PCA.
    dtype: storage type of anchor and pattern (float16 halves the memory of a large run).
    replies: "chosen", "rejected" or "both". Every forward pass stops after the deepest of `layers`.
    """
    good_adapter, bad_adapter = instructed_adapters(model, method)
    which = {"chosen": (1,), "rejected": (0,), "both": (1, 0)}[replies]
    items = [(i, pair, label) for i, pair in enumerate(pairs) for label in which]
    store = PatternStore(layers, spill_dir, memory_limit)
    pad = pad_id(tokenizer)
    good_system, bad_system = (GOOD_INSTRUCTION, BAD_INSTRUCTION) if method == "scit" else (None, None)
    model.eval()
    for start in tqdm(range(0, len(items), batch_size), desc="collect patterns", leave=False):
        chunk = items[start : start + batch_size]
        texts = [(pair, pair.chosen if label else pair.rejected) for _, pair, label in chunk]
        plain_ex = [encode(tokenizer, p.prompt, r, budget=budget) for p, r in texts]
        plain = collate(plain_ex, pad)
        base_rows: list[torch.Tensor | None] = [None] * len(chunk)
        if base_means:
            with _adapter(model, None):
                base_rows = list(_hidden_rows(model, plain, layers, bf16))
        with _adapter(model, good_adapter):
            if method == "scit":
                good_ex = [encode(tokenizer, p.prompt, r, system=good_system, budget=budget) for p, r in texts]
                good_rows = _hidden_rows(model, collate(good_ex, pad), layers, bf16)
                anchor_rows = _hidden_rows(model, plain, layers, bf16)
            else:
                good_rows = anchor_rows = _hidden_rows(model, plain, layers, bf16)
        with _adapter(model, bad_adapter):
            if method == "scit":
                bad_ex = [encode(tokenizer, p.prompt, r, system=bad_system, budget=budget) for p, r in texts]
                bad_rows = _hidden_rows(model, collate(bad_ex, pad), layers, bf16)
            else:
                bad_rows = _hidden_rows(model, plain, layers, bf16)
        for (index, _, label), example, base, anchor, good, bad in zip(
            chunk, plain_ex, base_rows, anchor_rows, good_rows, bad_rows, strict=True
        ):
            store.add(
                PatternRecord(
                    input_ids=example.input_ids,
                    prompt_len=example.prompt_len,
                    label=label,
                    pair_index=index,
                    anchor=anchor.to(dtype),
                    pattern=(good - bad).to(dtype),
                    base_mean=base.double().mean(dim=1).float() if base is not None else None,
                )
            )
    return store


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
    from .evaluate import sequence_logprobs

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
            with torch.no_grad(), autocast(bf16, model), _adapter(model, adapter):
                scores[side] += [float(x) for x in sequence_logprobs(model, batch)]
    d = torch.tensor(scores["good"], dtype=torch.float64) - torch.tensor(scores["bad"], dtype=torch.float64)
    gap = d[0::2] - d[1::2]
    return {"mean_gap": float(gap.mean()), "accuracy": float((gap > 0).double().mean()), "n": len(pairs)}


# -- step 3: offsets ---------------------------------------------------------------------------------


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


LowRank = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (down (rank, H), up (H, rank))


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


def _batch_plan(
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
    plan = _batch_plan(batch.input_ids.shape[0], offsets, low_rank)
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
    return _batch_prompt_kl(model, batch, offsets, bf16, low_rank)


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
    draws = _fit_draws(len(records), config.steps, config.batch_size, config.seed)
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
    draws = _fit_draws(len(records), config.steps, config.batch_size, config.seed)
    steps = [[records[i] for i in draw] for draw in draws]
    pad = pad_id(tokenizer)
    wrapped = add_lora(model, lora, adapter)

    def loss_fn(m: nn.Module, batch: list[PatternRecord]) -> torch.Tensor:
        # autocast is the caller's (_train_adapter); no steering plan: the adapter is the change
        return alignment_loss(m, batch, layers, {}, config.alpha, pad, bf16=False)

    losses = _train_adapter(wrapped, adapter, steps, loss_fn, lora, checkpoint, "fit RAHF LoRA")
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


def _fit_draws(count: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
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


# -- our addition: offsets learned on the preference metric itself ---------------------------------


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
    from .evaluate import pair_logprobs

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
    from .data import encode_prompt

    examples = [Encoded(tuple(encode_prompt(tokenizer, p.prompt, budget=budget.prompt)), 0) for p in pairs]
    return _batch_prompt_kl(model, collate(examples, pad_id(tokenizer)), offsets, bf16, low_rank)


def _batch_prompt_kl(
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
    plan = _batch_plan(batch.input_ids.shape[0], offsets, low_rank)
    with autocast(bf16, model), Steerer.attach(model).steering(plan):
        moved = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    log_p = torch.log_softmax(plain[:, :-1][keep].float(), dim=-1)
    log_q = torch.log_softmax(moved[:, :-1][keep].float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


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
    from .layers import hidden_size_of

    seed_everything(config.seed)
    base = unwrap_model(model)
    base.eval()
    epochs = -(-config.steps * config.batch_pairs // len(pairs))  # enough epochs for every step
    draws = _batches(range(len(pairs)), config.batch_pairs, epochs, config.seed)[: config.steps]

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
