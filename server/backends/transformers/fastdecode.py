"""A lean decode step for Llama-family decoders: the same arithmetic as transformers, fewer operations.

At batch 1 on a 2-core CPU a decode step of the 135M default model is ~50 ms, and less than half of it
is matrix products: the rest is the Python and small tensor operations of 30 transformers decoder
layers (mask creation, rotary tables per layer call, `view`/`transpose` chains, hook dispatch, the
attention interface lookup). This module runs one token per row through the decoder with:

- the q/k/v and gate/up projections fused into one packed int4 matrix product each, when the layers
  are `PackedLinear`s (their packed codes concatenated, checked bit-for-bit against separate calls at
  build time); float layers are called one by one, never copied;
- one fused `rms_norm` per norm;
- cos/sin for the step's positions computed once (by the model's own rotary module, so every rope
  variant and its attention scaling is honoured), not once per layer;
- grouped-query attention as one `scaled_dot_product_attention` over the slot cache, laid out as the
  installed transformers does it for one-token queries (the query heads of a group as a sequence, or
  the kv heads repeated in older versions: `compat.packs_gqa_for_one_token`);
- steering added from the step's `SteeringPlan` after each steered layer by the library's `apply_plan`,
  and a plan's LoRA terms added to the q/k/v outputs by `apply_lora`, the same functions the hooks call,
  so the hooks are not involved and the arithmetic is theirs.

Only models whose modules have the Llama structure are taken (`LlamaDecodeStep.build` returns None
otherwise), and the engine checks the step against the transformers forward once at start-up; the
regular path is used when either says no. Prefill always uses the regular path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from steering_vectors.core.hooks import SteeringPlan, apply_lora, apply_plan

from . import compat
from .packed import GROUP, PackedLinear

log = logging.getLogger(__name__)

# model types whose decoder layers are LlamaDecoderLayer-shaped: pre-norm RMSNorm, rotary q/k,
# grouped-query attention over the whole cache, SiLU-gated MLP, no q/k norms, no sliding window
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

Projection = Callable[[torch.Tensor], Sequence[torch.Tensor]]


class _FusedInt4:
    """Several int4 `PackedLinear`s with the same input as one packed matrix product."""

    def __init__(self, parts: Sequence[PackedLinear]) -> None:
        self.packed = torch.cat([p.packed for p in parts], dim=0)  # (N, K/2)
        self.scales = torch.cat([p.scales for p in parts], dim=1)  # (K/G, N, 2)
        self.sizes = [p.out_features for p in parts]
        self.bias: torch.Tensor | None = None
        if any(p.bias is not None for p in parts):
            self.bias = torch.cat(
                [p.bias if p.bias is not None else torch.zeros(p.out_features, dtype=p.weight.dtype) for p in parts]
            )

    def __call__(self, x: torch.Tensor) -> Sequence[torch.Tensor]:
        out = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.scales).to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.split(self.sizes, dim=-1)


def _projection(parts: Sequence[nn.Module]) -> tuple[Projection, bool]:
    """One callable for linears sharing an input: fused when all are int4-packed and the fused product
    equals the separate ones bit for bit on a probe; else the layers one by one. Returns (callable, fused)."""

    def separate(x: torch.Tensor) -> Sequence[torch.Tensor]:
        return [part(x) for part in parts]

    if not all(isinstance(p, PackedLinear) and p.bits == 4 for p in parts):
        return separate, False
    fused = _FusedInt4(parts)  # type: ignore[arg-type]
    probe = torch.randn(2, parts[0].in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = fused(probe)
        alone = [p.packed_forward(probe) for p in parts]  # type: ignore[operator]
    if all(torch.equal(a, b) for a, b in zip(together, alone, strict=True)):
        return fused, True
    log.warning("fused int4 projection differs from its parts; calling them one by one")
    return separate, False


@dataclass
class _Layer:
    in_norm: torch.Tensor  # (H,)
    qkv: Projection
    o_proj: nn.Module
    post_norm: torch.Tensor
    gate_up: Projection
    down_proj: nn.Module


class LlamaDecodeStep:
    """One decode step (one token per row) of a Llama-family model over the engine's slot cache.

    `max_rows`: the step is used for at most this many rows (the packed layers' own row limit when the
    model is packed: above it they switch to float weights, which the fused products do not have).
    """

    def __init__(self, model: nn.Module) -> None:
        decoder = model.get_decoder()
        config = model.config
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.norm = decoder.norm.weight
        self.eps = float(decoder.norm.variance_epsilon)
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.groups = self.heads // self.kv_heads
        self.scaling = float(decoder.layers[0].self_attn.scaling)
        self.pack_gqa = compat.packs_gqa_for_one_token()
        self.layers: list[_Layer] = []
        fused = 0
        rows: list[int] = []
        for layer in decoder.layers[: config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, fused_qkv = _projection([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up, fused_gate_up = _projection([mlp.gate_proj, mlp.up_proj])
            fused += fused_qkv + fused_gate_up
            rows += [m.max_rows for m in layer.modules() if isinstance(m, PackedLinear)]
            self.layers.append(
                _Layer(
                    in_norm=layer.input_layernorm.weight,
                    qkv=qkv,
                    o_proj=attn.o_proj,
                    post_norm=layer.post_attention_layernorm.weight,
                    gate_up=gate_up,
                    down_proj=mlp.down_proj,
                )
            )
        self.fused = fused
        self.max_rows = min(rows) if rows else None  # None: any row count

    @classmethod
    def build(cls, model: nn.Module) -> LlamaDecodeStep | None:
        """The step for `model`, or None when its structure is not the one this step computes."""
        reason = _unsupported(model)
        if reason:
            log.info("lean decode step not used: %s", reason)
            return None
        return cls(model)

    def applies(self, rows: int) -> bool:
        return self.max_rows is None or rows <= self.max_rows

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: object,
        plan: SteeringPlan | None,
    ) -> torch.Tensor:
        """input_ids, positions: (n,); mask: (n, 1, 1, kv) as the attention takes it (bool: True = attend,
        float: additive); `cache` set up with `for_decode`. Returns the final-normed hidden states (n, H)."""
        n = input_ids.shape[0]
        hidden = self.embed(input_ids)  # (n, H)
        cos, sin = self.rotary(hidden, positions.unsqueeze(0))  # (1, n, D)
        cos, sin = cos.view(n, 1, self.head_dim), sin.view(n, 1, self.head_dim)
        shape = (hidden.shape[-1],)
        q_shape = (n, self.heads, self.head_dim)
        kv_shape = (n, self.kv_heads, self.head_dim)
        half = self.head_dim // 2
        steered = plan.to(hidden.device).offsets if plan is not None else {}
        lora_layers = {index for index, _ in plan.lora} if plan is not None else set()
        for index, layer in enumerate(self.layers):
            x = F.rms_norm(hidden, shape, layer.in_norm, self.eps)
            q, k, v = layer.qkv(x)
            if index in lora_layers:  # as the projection hooks: (n, 1, out)
                x1 = x.unsqueeze(1)
                q = apply_lora(q.unsqueeze(1), x1, plan, index, "q_proj")[:, 0]
                k = apply_lora(k.unsqueeze(1), x1, plan, index, "k_proj")[:, 0]
                v = apply_lora(v.unsqueeze(1), x1, plan, index, "v_proj")[:, 0]
            q, k = q.view(q_shape), k.view(kv_shape)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
            keys, values = cache.update(k.unsqueeze(2), v.view(kv_shape).unsqueeze(2), index)  # (n, Hkv, kv, D)
            if self.pack_gqa:  # the g query heads of a kv head as a length-g query sequence against its keys
                query = q.view(n, self.kv_heads, self.groups, self.head_dim)
            else:  # every kv head repeated g times, one query position per head
                query = q.view(n, self.heads, 1, self.head_dim)
                if self.groups > 1:
                    kv = keys.shape[2]
                    expanded = (n, self.kv_heads, self.groups, kv, self.head_dim)
                    keys = keys[:, :, None].expand(expanded).reshape(n, self.heads, kv, self.head_dim)
                    values = values[:, :, None].expand(expanded).reshape(n, self.heads, kv, self.head_dim)
            attn = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.scaling)
            hidden = hidden + layer.o_proj(attn.reshape(n, self.heads * self.head_dim))
            x = F.rms_norm(hidden, shape, layer.post_norm, self.eps)
            gate, up = layer.gate_up(x)
            hidden = hidden + layer.down_proj(F.silu(gate) * up)
            if index in steered:
                hidden = apply_plan(hidden.unsqueeze(1), plan, index)[:, 0]  # as the hook: (n, 1, H)
        return F.rms_norm(hidden, shape, self.norm, self.eps)


def _unsupported(model: nn.Module) -> str:
    """Why the lean step cannot stand in for `model`'s decoder forward ('' when it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "layers with attention other than full attention"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    try:
        decoder = model.get_decoder()
        layers = decoder.layers
        for part in ("embed_tokens", "rotary_emb", "norm"):
            getattr(decoder, part)
    except AttributeError as exc:
        return f"unexpected decoder structure ({exc})"
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj"), (attn, "o_proj")]
        names += [(mlp, "gate_proj"), (mlp, "up_proj"), (mlp, "down_proj")]
        if any(getattr(owner, name, None) is None for owner, name in names):
            return "a decoder layer without the q/k/v/o and gate/up/down projections"
        if any(hasattr(attn, norm) for norm in ("q_norm", "k_norm")):
            return "query/key norms"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if not hasattr(norm, "variance_epsilon") or getattr(norm, "bias", None) is not None:
                return f"a {type(norm).__name__} that is not an RMSNorm"
    return ""
