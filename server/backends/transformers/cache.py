"""The slot KV cache of the continuous-batching engine.

Knows a preallocated K/V buffer with one row per running sequence plus a scratch row, and which rows
and positions the next forward covers. Duck-types the part of a transformers `Cache` that attention
layers call (`update`), so the standard model forward (and the lean decode step) write into it.
"""

from __future__ import annotations

import torch

_LAZY_BYTES = 64 * 1024 * 1024  # above this, glibc maps fresh zero pages: allocate without touching them


class SlotCache:
    """K/V of `slots` sequences, preallocated: per layer (S + 1, Hkv, L, D); row S is scratch.

    Duck-types the part of a transformers `Cache` that attention layers call (`update`). Before each
    forward the engine says which rows and positions the forward covers (`for_decode`/`for_prefill`).
    Pages of the big zero tensors are touched only when written, so memory grows with use.
    """

    def __init__(
        self,
        num_layers: int,
        slots: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        shape = (2, num_layers, slots + 1, kv_heads, max_len, head_dim)
        numel = 1
        for size in shape:
            numel *= size
        if device.type == "cpu" and numel * dtype.itemsize >= _LAZY_BYTES:
            # Fresh anonymous memory from the OS is zero and costs nothing until touched.
            buffer = torch.empty(shape, dtype=dtype, device=device)
        else:
            buffer = torch.zeros(shape, dtype=dtype, device=device)
        self.keys = list(buffer[0].unbind(0))  # per layer (S + 1, Hkv, L, D)
        self.values = list(buffer[1].unbind(0))
        self.max_len = max_len
        self._rows = slice(0, 0)
        self._write: tuple[torch.Tensor | int, slice, torch.Tensor | slice] = (0, slice(None), slice(0, 0))
        self._kv_len = 0
        self._decode: bool | None = False  # None: batched prefill

    def for_decode(self, n: int, positions: torch.Tensor, kv_len: int) -> None:
        """Next forward: rows 0..n-1, one token each, at `positions` (n,)."""
        self._rows = slice(0, n)
        self._write = (torch.arange(n, device=positions.device), slice(None), positions)
        self._kv_len = kv_len
        self._decode = True

    def for_prefill(self, row: int, start: int, length: int) -> None:
        """Next forward: one row, `length` tokens from position `start`."""
        self._rows = slice(row, row + 1)
        self._write = (row, slice(None), slice(start, start + length))
        self._kv_len = start + length
        self._decode = False

    def for_prefill_batch(self, first_row: int, lengths: torch.Tensor, length: int) -> None:
        """Next forward: rows first_row.., whole prompts of `lengths` (k,) right-padded to `length`;
        padding K/V goes to the scratch row."""
        k = lengths.shape[0]
        steps = torch.arange(length, device=lengths.device).unsqueeze(0)  # (1, T)
        rows = torch.arange(first_row, first_row + k, device=lengths.device).unsqueeze(1)  # (k, 1)
        scratch = len(self.keys[0]) - 1
        self._rows = slice(first_row, first_row + k)
        self._write = (torch.where(steps < lengths.unsqueeze(1), rows, scratch), slice(None), steps.expand(k, -1))
        self._kv_len = length
        self._decode = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new K/V (B, Hkv, T, D) and return the rows' K/V up to the longest (B, Hkv, kv, D)."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._decode:
            keys[self._write] = key_states[:, :, 0]  # (n, Hkv, D)
            values[self._write] = value_states[:, :, 0]
        elif self._decode is None:
            keys[self._write] = key_states.transpose(1, 2)  # (k, T, Hkv, D)
            values[self._write] = value_states.transpose(1, 2)
        else:
            keys[self._write] = key_states[0]  # (Hkv, T, D)
            values[self._write] = value_states[0]
        return keys[self._rows, :, : self._kv_len], values[self._rows, :, : self._kv_len]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` positions of row `src` into row `dst`."""
        if src == dst or length <= 0:
            return
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[dst, :, :length] = keys[src, :, :length]
            values[dst, :, :length] = values[src, :, :length]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len
