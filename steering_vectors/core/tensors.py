"""Small torch helpers both halves use: the device a model's weights sit on, bf16 autocast, and the
log-probabilities of a batch's response tokens.

Knows nothing of where a batch comes from: anything with `to(device)`, `input_ids`, `attention_mask` and
`response_mask` (a `training.data.Batch`) will do.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
from torch import nn

from .layers import unwrap_model


class ResponseBatch(Protocol):
    """Right-padded token rows with a mask of the response tokens (the shape of `training.data.Batch`)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: torch.device | str) -> ResponseBatch: ...


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast(enabled: bool, model: nn.Module | None = None) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on the model's device type (CPU when not given), or nothing."""
    if enabled:
        device_type = model_device(model).type if model is not None else "cpu"
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def response_token_logprobs(model: nn.Module, batch: ResponseBatch) -> torch.Tensor:
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


def sequence_logprobs(model: nn.Module, batch: ResponseBatch) -> torch.Tensor:
    """(B,) mean log-probability of each row's response tokens."""
    batch = batch.to(model_device(model))
    mask = batch.response_mask[:, 1:].float()
    return (response_token_logprobs(model, batch) * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
