"""Steering inside vLLM's workers: the worker extension and the device tables it keeps.

`SteeringWorker` is given to vLLM as `worker_extension_cls` (an engine argument: vLLM mixes the class
into every worker it starts, in this process or in others, and `collective_rpc("rahf_...")` reaches the
methods on every rank). Nothing of vLLM is forked or patched at import: `rahf_install` puts forward hooks
on the loaded model's decoder layers (and on the fused q/k/v projections of layers that LoRA terms
steer) and wraps the model runner's `_model_forward` so that each step fills one table before the
forward runs.

The arithmetic is the transformers backend's (`steering_vectors.core.hooks.apply_plan` / `apply_lora`), laid
out for a flattened batch of tokens instead of padded rows:

- every loaded profile has a slot `s` (1..S-1; slot 0 stays zeros); per decoder layer `l` the tables
  hold its offset `OFF[l][s]` (H), its low-rank factors (`DOWN[l]` (S*R, H), `UP[l]` (H, S*R), each slot
  padded with zero ranks to the widest R) and its LoRA factors per fused q/k/v projection;
- before a step's forward, `W` (tokens, k) gets each token's strength for each of the k slots the batch
  uses: the request's strengths in the columns of its profiles' slots, zero in generated-position mode for
  prompt tokens and in prompt-position mode for generated ones, zero for unsteered requests and padding; the
  tables of those k slots are gathered once per batch composition (low-rank and LoRA factors packed to the
  ranks they have at each layer, with the W column each rank belongs to);
- after decoder layer `l` (vLLM keeps the residual stream as `hidden + residual`; the layer's output is
  that pair), the residual gets ``W @ OFF[l]`` plus ``((rmsnorm(h) @ DOWN[l].T) * W_r) @ UP[l].T`` with
  `h = hidden + residual` (the stream transformers' decoder layer returns) and `W_r` W repeated per
  rank; a fused q/k/v output gets ``((x @ A.T) * W_r) @ B.T`` of its input x.

The stored tables have fixed shapes (S slots, the widest rank), and the step's values reach the forward only
through `W`: no host synchronisation inside the forward. The per-composition gathering and the skipped
layers suit eager mode, which is the mode this backend runs (docs/engine.md, "What is compiled"). Tokens
with zero strength get an exact zero added, so unsteered requests are bit-identical to a run without
steering. A step with no steered token skips the hooks. Tensor parallelism: every rank
applies the same offsets and low-rank terms to its (replicated) residual and the rows of the LoRA terms
that its q/k/v shard holds. This module imports torch and the library's runtime core
(`steering_vectors.core`: the profile format, the hooks' constants) only, never its training half.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from steering_vectors.core.hooks import LOW_RANK_EPS
from steering_vectors.core.profile import POSITION_MODES

log = logging.getLogger(__name__)

EXTRA_KEY = "rahf"  # SamplingParams.extra_args[EXTRA_KEY] = {"slots": [...], "strengths": [...], "mode": ...}
PROJECTIONS = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class RequestSteering:
    """What a request carries to the workers: profile slots, their strengths, the position mode ("all":
    every token, "generated": positions at or past the prompt length, "prompt": positions before it)."""

    slots: tuple[int, ...]
    strengths: tuple[float, ...]
    mode: str = "all"

    def __post_init__(self) -> None:
        if self.mode not in POSITION_MODES:
            raise ValueError(f"position mode {self.mode!r} is not one of {POSITION_MODES}")

    def to_extra(self) -> dict[str, Any]:
        return {"slots": list(self.slots), "strengths": list(self.strengths), "mode": self.mode}

    @classmethod
    def from_extra(cls, extra: Any) -> RequestSteering | None:
        spec = extra.get(EXTRA_KEY) if isinstance(extra, dict) else None
        if not spec:
            return None
        return cls(tuple(int(s) for s in spec["slots"]), tuple(float(v) for v in spec["strengths"]),
                   str(spec.get("mode", "all")))


def decoder_layers(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(absolute layer index, module) of the decoder layers this rank holds (pipeline parallelism leaves
    placeholders for the others)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise RuntimeError(f"cannot find the decoder layers of {type(model).__name__} (model.model.layers)")
    start = int(getattr(inner, "start_layer", 0))
    end = int(getattr(inner, "end_layer", len(layers)))
    return [(i, layers[i]) for i in range(start, end)]


def _qkv_rows(attn: nn.Module, tp_rank: int, tp_size: int) -> dict[str, slice]:
    """Which rows of each full projection (q, k, v) this rank's fused q/k/v output holds, and where."""
    head_dim = int(attn.head_dim)
    q_local, kv_local = int(attn.q_size), int(attn.kv_size)
    total_kv = int(getattr(attn, "total_num_kv_heads", kv_local // head_dim))
    q_start = tp_rank * q_local
    if total_kv >= tp_size:
        kv_start = tp_rank * kv_local
    else:  # kv heads replicated: this rank holds head tp_rank // (tp_size // total_kv)
        kv_start = (tp_rank // (tp_size // total_kv)) * head_dim
    return {"q_proj": slice(q_start, q_start + q_local), "k_proj": slice(kv_start, kv_start + kv_local),
            "v_proj": slice(kv_start, kv_start + kv_local)}


class SteeringTables:
    """The profile slots of one worker and the hooks that read them."""

    def __init__(self, runner: Any, model: nn.Module, *, num_slots: int, max_tokens: int,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        self.runner = runner
        self.layers = decoder_layers(model)
        first = self.layers[0][1] if self.layers else None
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
        self.num_slots = int(num_slots)
        self.max_tokens = int(max_tokens)
        self.tp_rank, self.tp_size = int(tp_rank), int(tp_size)
        self.W = torch.zeros(self.max_tokens, self.num_slots, dtype=torch.float32, device=self.device)
        self.active = False  # whether this step has a steered token
        self.offsets: dict[int, torch.Tensor] = {}  # layer -> (S, H)
        self.low_rank: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> (S*R, H), (H, S*R)
        self.low_rank_rank = 0
        self.lora: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> A (S*R, H), B (local out, S*R)
        self.lora_rank = 0
        self.slot_layers: dict[int, set[int]] = {}  # slot -> layers it steers
        self.slot_lora: dict[int, dict[int, int]] = {}  # slot -> layer -> its LoRA columns (ranks of q, k, v)
        self.slot_low_rank: dict[int, dict[int, int]] = {}  # slot -> layer -> its low-rank rank
        self.version = 0  # changes with every load and free: the gathered tables of `_use` are then stale
        self._use: dict[str, dict[int, Any]] = {"offsets": {}, "low_rank": {}, "lora": {}}
        self._use_key: tuple[Any, ...] | None = None
        self._specs: dict[str, tuple[Any, RequestSteering | None]] = {}
        self.step_W = self.W
        self._expanded: dict[int, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._lora_hooks: dict[int, Any] = {}
        self._qkv = {i: layer.self_attn.qkv_proj for i, layer in self.layers
                     if hasattr(getattr(layer, "self_attn", None), "qkv_proj")}
        self._qkv_rows = ({i: _qkv_rows(layer.self_attn, self.tp_rank, self.tp_size) for i, layer in self.layers
                           if i in self._qkv}) if first is not None else {}
        for index, layer in self.layers:
            self._hooks.append(layer.register_forward_hook(self._layer_hook(index)))
        self._original_forward = runner._model_forward
        runner._model_forward = self._model_forward

    # -- profiles -------------------------------------------------------------------------------------

    def load(self, slot: int, data: bytes) -> dict[str, Any]:
        """Put the profile file `data` into `slot` (replacing what it held)."""
        from steering_vectors.core.profile import Profile

        if not 0 < slot < self.num_slots:
            raise ValueError(f"slot {slot} is outside 1..{self.num_slots - 1}")
        profile = Profile.from_bytes(data, source=f"slot {slot}")
        self.free(slot)
        held = {i for i, _ in self.layers}
        for layer, offset in profile.offsets.items():
            if layer not in held:
                continue
            table = self.offsets.get(layer)
            if table is None:
                table = self.offsets[layer] = torch.zeros(self.num_slots, offset.numel(), device=self.device)
            table[slot] = offset.to(self.device, torch.float32)
        self.slot_layers[slot] = set(profile.offsets) & held
        low = {layer: terms for layer, terms in profile.low_rank.items() if layer in held}
        if low:
            self._grow_low_rank(max(down.shape[0] for down, _ in low.values()))
            for layer, (down, up) in low.items():
                tables = self.low_rank.get(layer)
                if tables is None:
                    tables = self.low_rank[layer] = self._zeros_low_rank()
                rank = down.shape[0]
                base = slot * self.low_rank_rank
                tables[0][base:base + rank] = down.to(self.device, torch.float32)
                tables[1][:, base:base + rank] = up.to(self.device, torch.float32)
            self.slot_low_rank[slot] = {layer: down.shape[0] for layer, (down, _) in low.items()}
        lora = {layer: terms for layer, terms in profile.lora.items() if layer in held}
        if lora:
            missing = sorted(set(lora) - set(self._qkv))
            if missing:
                raise ValueError(f"LoRA terms at layers {missing}, whose attention has no fused q/k/v projection")
            self._grow_lora(max(a.shape[0] for terms in lora.values() for a, _ in terms.values()))
            for layer, terms in lora.items():
                a_table, b_table = self.lora.get(layer) or self._zeros_lora(layer)
                self.lora[layer] = (a_table, b_table)
                rows = self._qkv_rows[layer]
                out = 0
                for name in PROJECTIONS:
                    width = rows[name].stop - rows[name].start
                    if name in terms:
                        a, b = terms[name]
                        rank = a.shape[0]
                        # one projection's ranks take their own columns: base + its offset within the slot
                        col = slot * self.lora_rank + out_rank_offset(terms, name)
                        a_table[col:col + rank] = a.to(self.device, torch.float32)
                        b_table[out:out + width, col:col + rank] = b[rows[name]].to(self.device, torch.float32)
                    out += width
                self._ensure_lora_hook(layer)
            self.slot_lora[slot] = {layer: sum(a.shape[0] for a, _ in terms.values()) for layer, terms in lora.items()}
        self.version += 1
        return {"slot": slot, "layers": sorted(self.slot_layers[slot]), "lora_layers": sorted(lora)}

    def free(self, slot: int) -> None:
        """Zero `slot` in every table."""
        for table in self.offsets.values():
            table[slot].zero_()
        if self.low_rank_rank:
            base = slot * self.low_rank_rank
            for down, up in self.low_rank.values():
                down[base:base + self.low_rank_rank].zero_()
                up[:, base:base + self.low_rank_rank].zero_()
        if self.lora_rank:
            base = slot * self.lora_rank
            for a, b in self.lora.values():
                a[base:base + self.lora_rank].zero_()
                b[:, base:base + self.lora_rank].zero_()
        self.slot_layers.pop(slot, None)
        self.slot_lora.pop(slot, None)
        self.slot_low_rank.pop(slot, None)
        self.version += 1

    def _zeros_low_rank(self) -> tuple[torch.Tensor, torch.Tensor]:
        width = self.num_slots * self.low_rank_rank
        return (torch.zeros(width, self.hidden, device=self.device),
                torch.zeros(self.hidden, width, device=self.device))

    def _grow_low_rank(self, rank: int) -> None:
        if rank <= self.low_rank_rank:
            return
        old, self.low_rank_rank = self.low_rank_rank, rank
        for layer, (down, up) in list(self.low_rank.items()):
            new_down, new_up = self._zeros_low_rank()
            for slot in range(self.num_slots):
                new_down[slot * rank:slot * rank + old] = down[slot * old:(slot + 1) * old]
                new_up[:, slot * rank:slot * rank + old] = up[:, slot * old:(slot + 1) * old]
            self.low_rank[layer] = (new_down, new_up)

    def _out_width(self, layer: int) -> int:
        return sum(r.stop - r.start for r in self._qkv_rows[layer].values())

    def _zeros_lora(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = self.num_slots * self.lora_rank
        return (torch.zeros(width, self.hidden, device=self.device),
                torch.zeros(self._out_width(layer), width, device=self.device))

    def _grow_lora(self, rank: int) -> None:
        rank *= len(PROJECTIONS)  # a slot's columns hold the ranks of its q, k and v terms side by side
        if rank <= self.lora_rank:
            return
        old, self.lora_rank = self.lora_rank, rank
        for layer, (a, b) in list(self.lora.items()):
            new_a, new_b = self._zeros_lora(layer)
            for slot in range(self.num_slots):
                new_a[slot * rank:slot * rank + old] = a[slot * old:(slot + 1) * old]
                new_b[:, slot * rank:slot * rank + old] = b[:, slot * old:(slot + 1) * old]
            self.lora[layer] = (new_a, new_b)

    def _ensure_lora_hook(self, layer: int) -> None:
        if layer not in self._lora_hooks:
            self._lora_hooks[layer] = self._qkv[layer].register_forward_hook(self._qkv_hook(layer))

    # -- each step ------------------------------------------------------------------------------------

    def prepare(self, positions: torch.Tensor | None) -> None:
        """Fill the step's strength table for the batch the runner is about to run: `W` (rows, k), one column per
        slot that some request of the batch uses with a non-zero strength (`active`), and the tables of those
        slots only (`_use`; gathered again only when that set or a slot changes, as the transformers backend
        rebuilds its plan only when the batch changes)."""
        runner = self.runner
        batch = runner.input_batch
        count = int(batch.num_reqs)
        self.active = False
        if count == 0 or not self.slot_layers:
            return
        steered: list[tuple[int, RequestSteering, int]] = []
        for i, req_id in enumerate(batch.req_ids[:count]):
            state = runner.requests.get(req_id)
            params = getattr(state, "sampling_params", None)
            spec = self._spec(req_id, params)
            if spec is not None:
                steered.append((i, spec, int(state.num_prompt_tokens)))
        if not steered:
            return
        active = sorted({slot for _, spec, _ in steered for slot, v in zip(spec.slots, spec.strengths, strict=True)
                         if v and slot in self.slot_layers})
        if not active:
            return
        starts = np.asarray(runner.query_start_loc.np[:count + 1], dtype=np.int64)
        tokens = int(starts[-1])
        rows = max(tokens, int(positions.shape[0]) if positions is not None else 0)
        if rows > self.max_tokens:
            raise RuntimeError(f"a step of {rows} tokens is longer than the steering table ({self.max_tokens})")
        column = {slot: j for j, slot in enumerate(active)}
        per_request = np.zeros((count, len(active)), dtype=np.float32)
        # per request: steered positions are [start, end): generated mode starts at the prompt length, prompt
        # mode ends there; the defaults (0, no end) steer every position
        start = np.zeros(count, dtype=np.int64)
        end = np.full(count, np.iinfo(np.int64).max, dtype=np.int64)
        for i, spec, prompt in steered:
            for slot, strength in zip(spec.slots, spec.strengths, strict=True):
                if slot in column:
                    per_request[i, column[slot]] += strength
            if spec.mode == "generated":
                start[i] = prompt
            elif spec.mode == "prompt":
                end[i] = prompt
        owner = np.repeat(np.arange(count), np.diff(starts))
        W = self.W[:rows, : len(active)]
        W.zero_()
        W[:tokens] = torch.from_numpy(per_request[owner]).to(self.device, non_blocking=True)
        if any(spec.mode != "all" for _, spec, _ in steered):
            if positions is None:
                raise RuntimeError("generated- or prompt-position steering needs the step's positions")
            where = positions[:tokens].to(torch.int64)
            low = torch.from_numpy(start[owner]).to(self.device, non_blocking=True)
            high = torch.from_numpy(end[owner]).to(self.device, non_blocking=True)
            W[:tokens] *= ((where >= low) & (where < high)).unsqueeze(1).to(W.dtype)
        key = (tuple(active), self.version)
        if key != self._use_key:
            self._use = self._gather(active)
            self._use_key = key
        self.step_W = W
        self._expanded = {}  # id(owner) -> W[:, owner], once per step
        self.active = True

    def _spec(self, req_id: str, params: Any) -> RequestSteering | None:
        """A request's steering, parsed once (cached by request id while it runs)."""
        if params is None:
            return None
        cached = self._specs.get(req_id)
        if cached is not None and cached[0] is params:
            return cached[1]
        spec = RequestSteering.from_extra(getattr(params, "extra_args", None))
        if len(self._specs) > 4096:
            self._specs.clear()
        self._specs[req_id] = (params, spec)
        return spec

    def _gather(self, active: list[int]) -> dict[str, dict[int, Any]]:
        """The tables of the `active` slots, per layer that one of them steers: offsets (k, H) in the order of
        `active` (the columns of the step's W); low-rank and LoRA factors packed to the ranks those slots have
        at that layer, with `owner` naming the W column each rank belongs to."""
        index = torch.tensor(active, device=self.device)
        layers = set().union(*(self.slot_layers.get(s, set()) for s in active))
        use: dict[str, dict[int, Any]] = {"offsets": {}, "low_rank": {}, "lora": {}}
        owners: dict[tuple[int, ...], torch.Tensor] = {}  # one tensor per pattern: layers share the step's W[:, owner]
        for layer in layers:
            if layer in self.offsets:
                use["offsets"][layer] = self.offsets[layer].index_select(0, index)
        # low rank: down (rows, H), up (H, rows); LoRA: a (cols, H), b (out, cols): rows of the first, columns
        # of the second
        for kind, per_slot, width, tables in (
            ("low_rank", self.slot_low_rank, self.low_rank_rank, self.low_rank),
            ("lora", self.slot_lora, self.lora_rank, self.lora),
        ):
            for layer in set().union(*(per_slot.get(s, {}).keys() for s in active)):
                picks, owner = [], []
                for j, slot in enumerate(active):
                    rank = per_slot.get(slot, {}).get(layer, 0)
                    picks.extend(range(slot * width, slot * width + rank))
                    owner.extend([j] * rank)
                picks_t = torch.tensor(picks, device=self.device)
                first, second = tables[layer]
                shared = owners.setdefault(tuple(owner), torch.tensor(owner, device=self.device))
                use[kind][layer] = (first.index_select(0, picks_t), second.index_select(1, picks_t), shared)
        return use

    def _model_forward(self, *args: Any, **kwargs: Any) -> Any:
        self.prepare(kwargs.get("positions"))
        try:
            return self._original_forward(*args, **kwargs)
        finally:
            self.active = False

    def steer(self, target: torch.Tensor, stream: torch.Tensor, layer: int) -> torch.Tensor:
        """`target` (tokens, H) plus the steering of `layer` for the residual stream `stream`: ``W @ offsets``
        and, where the layer has low-rank terms, ``((rmsnorm(stream) @ down.T) * W[:, owner]) @ up.T``. One
        fused add-matmul per term; rows whose strengths are all zero get an exact zero added."""
        W = self.step_W[: stream.shape[0]]
        out = target if target.dtype == torch.float32 else target.float()
        out = torch.addmm(out, W, self._use["offsets"][layer])
        factors = self._use["low_rank"].get(layer)
        if factors is not None:
            x = stream.float()
            x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + LOW_RANK_EPS)
            down, up, owner = factors
            out = torch.addmm(out, (x @ down.T).mul_(self._expand(owner, W.shape[0])), up.T)
        return out if out.dtype == target.dtype else out.to(target.dtype)

    def _expand(self, owner: torch.Tensor, rows: int) -> torch.Tensor:
        """W[:rows, owner] (the strength of each rank's slot, per token), computed once per step and owner."""
        key = id(owner)
        expanded = self._expanded.get(key)
        if expanded is None or expanded.shape[0] != rows:
            expanded = self._expanded[key] = self.step_W[:rows].index_select(1, owner)
        return expanded

    def _layer_hook(self, layer: int):  # noqa: ANN202 - torch hook signature
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not self.active or layer not in self._use["offsets"]:
                return None
            if isinstance(output, tuple) and len(output) == 2 and output[1] is not None:
                hidden, residual = output
                stream = hidden + residual if layer in self._use["low_rank"] else hidden
                return hidden, self.steer(residual, stream, layer)
            hidden = output[0] if isinstance(output, tuple) else output
            steered = self.steer(hidden, hidden, layer)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered

        return hook

    def _qkv_hook(self, layer: int):  # noqa: ANN202 - torch hook signature
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not self.active or layer not in self._use["lora"]:
                return None
            x = args[0]
            out, bias = output if isinstance(output, tuple) else (output, None)
            a, b, owner = self._use["lora"][layer]
            z = (x.float() @ a.T).mul_(self._expand(owner, x.shape[0]))
            steered = torch.addmm(out if out.dtype == torch.float32 else out.float(), z, b.T)
            out = steered if steered.dtype == out.dtype else steered.to(out.dtype)
            return (out, bias) if isinstance(output, tuple) else out

        return hook

    def remove(self) -> None:
        for handle in [*self._hooks, *self._lora_hooks.values()]:
            handle.remove()
        self._hooks, self._lora_hooks = [], {}
        self.runner._model_forward = self._original_forward


def out_rank_offset(terms: dict[str, tuple[torch.Tensor, torch.Tensor]], name: str) -> int:
    """Where projection `name`'s ranks start within a slot's LoRA columns: after the ranks of the
    projections before it (in PROJECTIONS order) that the profile has at this layer."""
    offset = 0
    for other in PROJECTIONS:
        if other == name:
            return offset
        if other in terms:
            offset += terms[other][0].shape[0]
    raise KeyError(name)


class SteeringWorker:
    """vLLM worker extension (`worker_extension_cls`): the `rahf_*` methods `collective_rpc` calls on
    every worker. Profiles travel as their file bytes (safetensors), which every transport carries."""

    def rahf_install(self, num_slots: int) -> dict[str, Any]:
        runner = self.model_runner  # type: ignore[attr-defined]
        tables = getattr(self, "_rahf_tables", None)
        if tables is not None:
            tables.remove()
        try:
            from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

            tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        except Exception:  # noqa: BLE001 - no distributed state: one rank
            tp_rank, tp_size = 0, 1
        max_tokens = int(runner.scheduler_config.max_num_batched_tokens)
        model = runner.get_model()
        self._rahf_tables = SteeringTables(runner, model, num_slots=num_slots, max_tokens=max_tokens + 64,
                                           tp_rank=tp_rank, tp_size=tp_size)
        return {"layers": [i for i, _ in self._rahf_tables.layers], "tp_rank": tp_rank, "tp_size": tp_size,
                "device": str(self._rahf_tables.device), "max_tokens": max_tokens}

    def rahf_load(self, slot: int, data: bytes) -> dict[str, Any]:
        return self._rahf_tables.load(int(slot), bytes(data))

    def rahf_free(self, slot: int) -> None:
        self._rahf_tables.free(int(slot))

    def rahf_capture(self, layers: list[int] | None) -> None:
        """Record the residual stream after `layers` at every forward from now on (None: stop); tests."""
        tables = self._rahf_tables
        for handle in getattr(self, "_rahf_capture_hooks", []):
            handle.remove()
        self._rahf_capture_hooks = []
        self._rahf_captured: dict[int, list[torch.Tensor]] = {}
        if layers is None:
            return
        modules = dict(tables.layers)
        for layer in layers:
            def record(module: nn.Module, args: Any, output: Any, layer: int = layer) -> None:
                stream = output[0] + output[1] if isinstance(output, tuple) and output[1] is not None else (
                    output[0] if isinstance(output, tuple) else output)
                self._rahf_captured.setdefault(layer, []).append(stream.detach().float().cpu().tolist())
            # registered after the steering hook, so it sees the steered stream
            self._rahf_capture_hooks.append(modules[layer].register_forward_hook(record))

    def rahf_captured(self) -> dict[int, list[Any]]:
        return getattr(self, "_rahf_captured", {})
