"""RAHF step 2, collect activity patterns: the same reply tokens through step 1's model twice (good and bad)
keep, per target layer and response token, the hidden-state difference ``v`` (the pattern) and the anchor
the fit aims from; with `base_means`, the base model's token-mean states for the closed-form baselines.

`record_layers` / `forward_recorded` read decoder-layer outputs through the steering hooks (the forward
pass can stop after the deepest layer of interest); the fit (step 3) and the server's few-example fit
(`quickfit`) read states the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.hooks import Steerer
from ..core.layers import find_decoder_layers
from ..core.tensors import autocast, model_device
from .data import DEFAULT_BUDGET, Batch, PreferencePair, TokenBudget, collate, encode, pad_id
from .instruct import BAD_INSTRUCTION, GOOD_INSTRUCTION, active_adapter, instructed_adapters
from .loop import save_checkpoint


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
            with active_adapter(model, None):
                base_rows = list(_hidden_rows(model, plain, layers, bf16))
        with active_adapter(model, good_adapter):
            if method == "scit":
                good_ex = [encode(tokenizer, p.prompt, r, system=good_system, budget=budget) for p, r in texts]
                good_rows = _hidden_rows(model, collate(good_ex, pad), layers, bf16)
                anchor_rows = _hidden_rows(model, plain, layers, bf16)
            else:
                good_rows = anchor_rows = _hidden_rows(model, plain, layers, bf16)
        with active_adapter(model, bad_adapter):
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
