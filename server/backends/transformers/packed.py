"""Weight-only int4/int8 linear layers for decoding on the CPU.

Decoding a small model on a CPU reads every weight once per step for a handful of rows, so a step costs
the time to stream the weights from memory, not the arithmetic. Storing them in 4 or 8 bits cuts that
traffic 8x or 4x. PyTorch ships CPU kernels for exactly this (`_weight_int4pack_mm_for_cpu`,
`_weight_int8pack_mm`: bf16 activations, int4 codes with a bf16 scale and zero per group of 32 input
features, or int8 codes with a bf16 scale per output feature). They are underscore-named ATen ops;
torchao wraps the same idea for GPUs, but its CPU int8 path measured ~2.5x slower than calling the op
directly on this machine kind (498 µs vs 200 µs for a 576x1536 layer at 8 rows) and it warns about
missing CUDA libraries at import, so the two ops are called here and checked against a float
reference when a layer is packed (a layer whose check fails stays in float).

Where the quantised kernels lose (many rows: prefill, large batches, compute-bound on bf16 without
AMX), a `PackedLinear` runs the layer's original float weight instead: `max_rows` picks the path per
call, so prefill stays in float and decode of up to `max_rows` rows uses the packed weights.

What `mode` packs:

- ``int4``: decoder linears as int4 groups of 32 (min/max asymmetric), the output head as int8.
- ``int8``: every linear as per-channel int8.
- ``auto``: ``int4`` when every decoder linear's weights already are 4-bit group values, i.e. the
  4-bit codes reproduce the float weights exactly (true for the embedded default, dequantised from a
  Q4_1 GGUF); otherwise nothing. So ``auto`` never requantises a model that was not 4-bit already.
- ``none``: nothing.

Steering is untouched: hooks sit on decoder-layer outputs, which stay in the model's dtype.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from steering_vectors.core.layers import find_decoder_layers

log = logging.getLogger(__name__)

GROUP = 32
QuantizeMode = Literal["auto", "none", "int4", "int8"]
Int4Groups = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # codes (N, K), scale (N, K/G), low (N, K/G)
_CHECK_TOLERANCE = 1e-2  # kernel vs its own dequantised weight on a random probe, relative (bf16 rounding)


def int4_groups(weight: torch.Tensor) -> Int4Groups:
    """Asymmetric 4-bit codes per group of `GROUP` input features.

    weight: (N, K) with K % GROUP == 0 -> codes (N, K) int32 in 0..15, scale (N, K/G), low (N, K/G)
    with ``weight ≈ codes * scale + low`` per group.
    """
    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round((groups - low.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15)
    return codes.to(torch.int32).reshape(n, k), scale, low


def _rebuild(codes: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, centre: int = 0) -> torch.Tensor:
    """(codes - centre) * scale + shift per group: codes (N, K), scale and shift (N, K/G) -> (N, K) float."""
    n, k = codes.shape
    groups = (codes.reshape(n, k // GROUP, GROUP).float() - centre) * scale.unsqueeze(-1) + shift.unsqueeze(-1)
    return groups.reshape(n, k)


def int4_error(weight: torch.Tensor, groups: Int4Groups | None = None) -> float:
    """Largest |weight - dequantised int4 weight| relative to max |weight| (0.0 for 4-bit group values).

    `groups`: `int4_groups(weight)` when already computed.
    """
    codes, scale, low = groups if groups is not None else int4_groups(weight)
    peak = float(weight.detach().float().abs().max()) or 1.0
    return float((_rebuild(codes, scale, low) - weight.detach().float()).abs().max()) / peak


class PackedLinear(nn.Module):
    """A linear layer with a weight-only int4 or int8 copy for calls of at most `max_rows` rows.

    Keeps the original float weight (shared, not copied) for larger calls. Bias stays in float.
    `kernel_error` is how far the packed kernel's output is from the weight the packed copy stands
    for, on a random probe (relative; bf16 rounding only when kernel and layout are right).
    `groups` (int4 only): `int4_groups` of the weight when the caller has them already.
    """

    def __init__(
        self,
        linear: nn.Linear,
        bits: int,
        max_rows: int,
        groups: Int4Groups | None = None,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        weight = linear.weight
        self.out_features, self.in_features = weight.shape
        self.bits, self.max_rows = bits, max_rows
        self.weight = weight
        self.bias = linear.bias
        w = weight.detach().float()
        if bits == 4:
            if self.in_features % GROUP:
                raise ValueError(f"in_features {self.in_features} is not a multiple of {GROUP}")
            codes, scale, low = groups if groups is not None else int4_groups(w)
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            # the kernel computes (code - 8) * scale + zero per group: zero = low + 8 * scale
            scales = torch.stack([scale, low + 8 * scale], dim=-1).transpose(0, 1).contiguous()  # (K/G, N, 2)
        else:
            scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            packed = torch.round(w / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)  # (N, K)
            scales = scale
            codes = None
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales", scales.to(torch.bfloat16), persistent=False)
        self.kernel_error = self._probe_error(self._dequantized(codes))

    def dequantized(self) -> torch.Tensor:
        """The float (N, K) weight the packed copy stands for (its scales rounded to bf16)."""
        return self._dequantized(int4_groups(self.weight)[0] if self.bits == 4 else None)

    def _dequantized(self, codes: torch.Tensor | None) -> torch.Tensor:
        scales = self.scales.float()
        if self.bits == 8:
            return self.packed.float() * scales.unsqueeze(1)
        return _rebuild(codes, scales[..., 0].T, scales[..., 1].T, centre=8)  # scale, zero: (N, K/G)

    def _probe_error(self, reference_weight: torch.Tensor) -> float:
        probe = torch.randn(3, self.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        with torch.no_grad():
            reference = F.linear(probe.float(), reference_weight, None)
            got = self.packed_forward(probe).float()
            if self.bias is not None:
                got = got - self.bias.float()
        return float((got - reference).abs().max()) / (float(reference.abs().max()) or 1.0)

    def packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The quantised path for any row count: (..., K) -> (..., N) in x's dtype."""
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.bits == 4:
            out = torch._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales)
        else:
            out = torch._weight_int8pack_mm(rows, self.packed, self.scales)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > self.max_rows * self.in_features:
            return F.linear(x, self.weight, self.bias)
        return self.packed_forward(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, max_rows={self.max_rows}"
        )


@dataclass
class PackReport:
    """What `pack_model` did: the mode asked for and chosen, layers packed per bit width, layers kept."""

    requested: str
    mode: str
    max_rows: int
    packed: dict[int, int] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    reason: str = ""

    def summary(self) -> str:
        parts = [f"quantize={self.requested} -> {self.mode}"]
        parts += [f"{count} linears int{bits}" for bits, count in sorted(self.packed.items())]
        if self.kept:
            parts.append(f"{len(self.kept)} kept in float")
        if self.mode != "none":
            parts.append(f"float weights above {self.max_rows} rows")
        if self.reason:
            parts.append(self.reason)
        return ", ".join(parts)


def _decoder_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear inside the decoder layers."""
    found = []
    for layer in find_decoder_layers(model):
        for parent in layer.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    found.append((parent, name, child))
    return found


def _head(model: nn.Module) -> tuple[nn.Module, str, nn.Linear] | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return None
    for name, child in model.named_children():
        if child is head:
            return model, name, head
    return None


def _checked(
    linear: nn.Linear,
    bits: int,
    max_rows: int,
    groups: Int4Groups | None = None,
) -> PackedLinear | None:
    """A packed copy of `linear` whose kernel output matches its dequantised weight on a probe, else None.

    This checks the kernel and the packing layout, not the quantisation error (the mode decides that).
    """
    try:
        packed = PackedLinear(linear, bits, max_rows, groups)
    except (RuntimeError, ValueError) as exc:  # kernel missing or shape it does not take
        log.info("keeping %s in float: %s", tuple(linear.weight.shape), exc)
        return None
    if not packed.kernel_error <= _CHECK_TOLERANCE:
        log.warning(
            "keeping %s in float: packed output differs by %.3g", tuple(linear.weight.shape), packed.kernel_error
        )
        return None
    return packed


def pack_model(model: nn.Module, mode: QuantizeMode = "auto", max_rows: int = 16) -> PackReport:
    """Replace the model's linears by `PackedLinear`s as `mode` says (in place); returns what it did."""
    report = PackReport(requested=mode, mode=mode, max_rows=max_rows)
    device = next(model.parameters()).device
    if mode == "none":
        return report
    if device.type != "cpu":  # the kernels are CPU-only: switched off, and said so
        report.mode, report.reason = "none", f"packed kernels are CPU-only (model on {device.type})"
        (log.info if mode == "auto" else log.warning)("weights not packed: %s", report.reason)
        return report
    already = Counter(m.bits for m in model.modules() if isinstance(m, PackedLinear))
    if already:  # packed before (the same model served twice): leave it as it is
        report.mode, report.packed, report.reason = f"int{min(already)}", dict(already), "already packed"
        return report
    body = _decoder_linears(model)
    not_four_bit = "weights are not 4-bit group values"
    if mode == "auto":
        if not body or any(linear.in_features % GROUP for _, _, linear in body):
            report.mode, report.reason = "none", not_four_bit
            return report
        report.mode = "int4"
    body_bits = 4 if report.mode == "int4" else 8
    targets = [(parent, name, linear, body_bits) for parent, name, linear in body]
    head = _head(model)
    if head is not None:
        targets.append((*head, 8))
    # pack everything first, replace afterwards: `auto` stops at the first weight that is not 4-bit
    replacements: list[tuple[nn.Module, str, PackedLinear | None]] = []
    for parent, name, linear, bits in targets:
        groups = int4_groups(linear.weight) if bits == 4 else None
        if mode == "auto" and groups is not None and int4_error(linear.weight, groups) > 1e-6:
            report.mode, report.reason = "none", not_four_bit
            return report
        replacements.append((parent, name, _checked(linear, bits, max_rows, groups)))
    counts: Counter[int] = Counter()
    for parent, name, packed in replacements:
        if packed is None:
            report.kept.append(f"{type(parent).__name__}.{name}")
            continue
        setattr(parent, name, packed)
        counts[packed.bits] += 1
    report.packed = dict(counts)
    return report
