"""What differs between the transformers versions this backend supports, in one place.

- The decoder's cache argument: `cache` from 5.24 (with `past_key_values` deprecated), `past_key_values`
  before. Passing the other name is silently swallowed by `**kwargs` in the older versions: the
  attention then runs without the slot cache and fails in `scaled_dot_product_attention` ("expanded
  size ... must match"), which is what the engine did on 5.17. The name is read from the decoder's
  signature, never guessed from a version number.
- Attention masks: every supported version passes a 4-D mask `(batch, 1, query, key)` through to the
  attention unchanged (`masking_utils` returns "an already prepared 4D mask" as-is). sdpa and flash
  attention take it as booleans (True = attend); eager attention adds it, so it gets 0 / the dtype's
  minimum.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

BOOL_MASK_ATTENTION = ("sdpa", "flash_attention_2", "flash_attention_3")


def cache_keyword(decoder: nn.Module) -> str:
    """The name under which `decoder.forward` takes a KV cache object."""
    parameters = inspect.signature(decoder.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise TypeError(f"{type(decoder).__name__}.forward takes neither `cache` nor `past_key_values`")


def uses_bool_mask(config: object) -> bool:
    return (getattr(config, "_attn_implementation", None) or "sdpa") in BOOL_MASK_ATTENTION


def attention_mask(allowed: torch.Tensor, *, bool_mask: bool, dtype: torch.dtype) -> torch.Tensor:
    """`allowed` (True = the query may see the key) as the attention implementation takes it."""
    if bool_mask:
        return allowed
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)


def packs_gqa_for_one_token() -> bool:
    """Whether transformers' sdpa attention runs a one-token query with grouped kv heads by laying the
    query heads of each kv head out as a query sequence (`pack_gqa`, newer 5.x) rather than by repeating
    the kv heads (`repeat_kv`, older 5.x). The lean decode step does the same, so that it stays
    bit-identical to the transformers forward of the installed version."""
    try:
        from transformers.integrations import sdpa_attention
    except ImportError:
        return False
    return hasattr(sdpa_attention, "pack_gqa")
