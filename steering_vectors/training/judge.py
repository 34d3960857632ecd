"""The generation judge: a Bradley–Terry reward model that scores replies, and the pairs it learns from.

Knows
- the judge split: a fixed share of a training file's prompts (by a hash of the prompt, the same rule for
  every run and set) that only the judge learns from; `without_judge_pairs` is what the RAHF pipeline
  calls so that no profile's fit or calibration pair shares a prompt with them. The judge pairs are split
  again, by another hash of the prompt, into judge-train and judge-held-out;
- two kinds of judge behind one interface, `score(prompts, replies) -> (N,) rewards`:
  "head", a linear Bradley–Terry head on frozen features of the base model (reply tokens' mean hidden state
  and the last token's, at chosen layers), and "lora", the base model with LoRA adapters and a scalar head
  on the last token's final hidden state, trained end to end with the Bradley–Terry loss;
- how to train both (resumable), measure pair accuracy, and save / load them as safetensors files with
  their metadata (kind, set, base-model fingerprint, split rule, held-out accuracy);
- `win_rate` of one list of replies against another under a judge, ties counted half, with a paired
  bootstrap interval (`genmetrics.win_rate_from_scores`).
Knows nothing about steering, profiles or generation (see `evaluate` and `genmetrics`); the command that
rebuilds the shipped judges is bench/judge.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.tensors import autocast
from .data import Batch, DataFormatError, Encoded, Message, PreferencePair, TokenBudget, _prompt_key, collate, encode
from .data import pad_id as tokenizer_pad_id
from .loop import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

JUDGE_SHARE = 0.25  # of a training file's prompts, for the judge only
JUDGE_HELD_SHARE = 0.3  # of the judge prompts, never trained on: the judge's own held-out accuracy
SPLIT_RULE = (
    f"judge: sha256('judge:' + prompt JSON)[:8] / 2^64 < {JUDGE_SHARE}; held-out: sha256('judge-held:' + "
    f"prompt JSON)[:8] / 2^64 < {JUDGE_HELD_SHARE} (prompt JSON: json.dumps(messages, sort_keys=True))"
)
JUDGE_BUDGET = TokenBudget(prompt=128, response=128)  # 256 tokens at most per scored sequence (CPU)
FORMAT = "rahf-judge"
KINDS = ("head", "lora")
Prompt = str | Sequence[Message]


# -- the judge split --------------------------------------------------------------------------------


def _bucket(salt: str, pair: PreferencePair) -> float:
    """A number in [0, 1) fixed by the prompt alone: pairs of one prompt always land together."""
    digest = hashlib.sha256(f"{salt}:{_prompt_key(pair)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_judge_prompt(pair: PreferencePair) -> bool:
    """Whether the pair's prompt belongs to the judge split (the same answer in every run and process)."""
    return _bucket("judge", pair) < JUDGE_SHARE


def without_judge_pairs(pairs: Sequence[PreferencePair]) -> list[PreferencePair]:
    """`pairs` less those of judge prompts: what a profile's fit and calibration may use."""
    return [pair for pair in pairs if not is_judge_prompt(pair)]


@dataclass
class JudgeSplit:
    """The judge's pairs of one training file: those it learns from and those it is measured on."""

    train: list[PreferencePair]
    held: list[PreferencePair]

    def settings(self) -> dict[str, Any]:
        return {"rule": SPLIT_RULE, "train": len(self.train), "held": len(self.held)}


def judge_split(pairs: Sequence[PreferencePair]) -> JudgeSplit:
    """The judge pairs of `pairs` (a training file), split by prompt into judge-train and judge-held-out."""
    train, held = [], []
    for pair in pairs:
        if is_judge_prompt(pair):
            (held if _bucket("judge-held", pair) < JUDGE_HELD_SHARE else train).append(pair)
    return JudgeSplit(train, held)


# -- encoding ---------------------------------------------------------------------------------------


def _messages(prompt: Prompt) -> list[Message]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def encode_reply(tokenizer: Any, prompt: Prompt, reply: str, budget: TokenBudget = JUDGE_BUDGET) -> Encoded:
    """Prompt (chat template) + reply within `budget`. An empty reply (a model that stopped at once) is scored
    as the end-of-sequence token alone, so every reply gets a reward."""
    try:
        return encode(tokenizer, _messages(prompt), reply, budget=budget)
    except DataFormatError:
        encoded = encode(tokenizer, _messages(prompt), "x", budget=budget)
        prompt_ids = encoded.input_ids[: encoded.prompt_len]
        return Encoded((*prompt_ids, int(tokenizer.eos_token_id)), len(prompt_ids))


def pair_sequences(
    tokenizer: Any, pairs: Sequence[PreferencePair], budget: TokenBudget = JUDGE_BUDGET
) -> list[Encoded]:
    """Chosen then rejected reply of every pair, in turn (index 2i: chosen of pair i, 2i + 1: rejected)."""
    out = []
    for pair in pairs:
        out.append(encode_reply(tokenizer, pair.prompt, pair.chosen, budget))
        out.append(encode_reply(tokenizer, pair.prompt, pair.rejected, budget))
    return out


def _batches(examples: Sequence[Encoded], batch_size: int) -> Iterator[list[int]]:
    """Indices of `examples` in batches of similar length (less padding)."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _last_index(batch: Batch) -> torch.Tensor:
    """(B,) position of each row's last real token (right padding)."""
    return batch.attention_mask.sum(dim=1) - 1


# -- the interface ----------------------------------------------------------------------------------


class Judge(Protocol):
    """Anything that scores replies to prompts: a larger reward is a better reply."""

    kind: str

    def score(self, prompts: Sequence[Prompt], replies: Sequence[str]) -> torch.Tensor:
        """(N,) float32 rewards of `replies[i]` to `prompts[i]`."""
        ...


def pair_accuracy(judge: Judge, pairs: Sequence[PreferencePair]) -> dict[str, float]:
    """Share of pairs whose chosen reply gets the higher reward (a tie counts half), and the mean margin."""
    if not pairs:
        return {"accuracy": float("nan"), "margin": float("nan"), "n": 0}
    prompts = [p.prompt for p in pairs]
    chosen = judge.score(prompts, [p.chosen for p in pairs])
    rejected = judge.score(prompts, [p.rejected for p in pairs])
    diff = chosen - rejected
    won = (diff > 0).double() + 0.5 * (diff == 0).double()
    return {"accuracy": float(won.mean()), "margin": float(diff.mean()), "n": len(pairs)}


def win_rate(
    judge: Judge, prompts: Sequence[Prompt], replies_a: Sequence[str], replies_b: Sequence[str], *,
    samples: int = 2000, seed: int = 0, tie: float = 1e-4,
) -> dict[str, float]:  # fmt: skip
    """How often `replies_a[i]` beats `replies_b[i]` under `judge` (identical replies and rewards within `tie`
    count half), with a paired bootstrap 95 % interval over prompts (`genmetrics.win_rate_from_scores`)."""
    from .genmetrics import win_rate_from_scores

    if not len(prompts) == len(replies_a) == len(replies_b):
        raise ValueError(f"win rate needs one reply of each side per prompt: {len(prompts)}, {len(replies_a)}, "
                         f"{len(replies_b)}")  # fmt: skip
    a = judge.score(prompts, replies_a)
    b = judge.score(prompts, replies_b)
    same = [x == y for x, y in zip(replies_a, replies_b, strict=True)]
    return win_rate_from_scores(a.tolist(), b.tolist(), same=same, tie=tie, samples=samples, seed=seed)


# -- kind "head": a linear head on frozen features ----------------------------------------------------


POOLS = ("mean", "last")  # mean over the reply's tokens; the last token's state


def feature_layers(num_layers: int) -> list[int]:
    """The hidden-state indices features are read from (0: embeddings, i: after decoder layer i; the last
    one has the final norm applied): five spread over the upper two thirds of the model."""
    return sorted({round(num_layers * f) for f in (0.4, 0.55, 0.7, 0.85, 1.0)})


def pooled_features(
    model: nn.Module, examples: Sequence[Encoded], layers: Sequence[int], *, pad: int, batch_size: int = 8,
    bf16: bool = False, desc: str = "features",
) -> torch.Tensor:  # fmt: skip
    """(N, len(layers), 2, H) float32: per example and layer, the mean hidden state over reply tokens and the
    last token's hidden state, from the frozen `model` (no steering: call outside any steering context)."""
    from ..core.layers import unwrap_model

    base = unwrap_model(model)
    device = next(base.parameters()).device
    out: torch.Tensor | None = None
    batches = list(_batches(examples, batch_size))
    for idx in tqdm(batches, desc=desc, leave=False):
        batch = collate([examples[i] for i in idx], pad).to(device)
        with torch.no_grad(), autocast(bf16):
            hidden = base.model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                output_hidden_states=True,
            ).hidden_states  # fmt: skip
        mask = batch.response_mask.unsqueeze(-1).float()  # (B, T, 1)
        last = _last_index(batch)
        rows = torch.arange(len(idx), device=device)
        feats = []
        for layer in layers:
            h = hidden[layer].float()  # (B, T, H)
            mean = (h * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
            feats.append(torch.stack([mean, h[rows, last]], dim=1))  # (B, 2, H)
        block = torch.stack(feats, dim=1).cpu()  # (B, L, 2, H)
        if out is None:
            out = torch.zeros((len(examples), *block.shape[1:]))
        out[idx] = block
    assert out is not None, "no examples"
    return out


@dataclass
class HeadParams:
    """A linear Bradley–Terry head over standardised features of chosen layers and pools."""

    layers: list[int]
    pools: list[str]
    weight: torch.Tensor  # (D,)
    mean: torch.Tensor  # (D,) feature standardisation, from judge-train
    std: torch.Tensor  # (D,)
    l2: float

    def select(self, features: torch.Tensor, all_layers: Sequence[int]) -> torch.Tensor:
        """(N, D) of (N, L, 2, H) features read at `all_layers`: this head's layers and pools, flattened."""
        li = [list(all_layers).index(layer) for layer in self.layers]
        pi = [POOLS.index(p) for p in self.pools]
        return features[:, li][:, :, pi].reshape(features.shape[0], -1)

    def rewards(self, selected: torch.Tensor) -> torch.Tensor:
        return ((selected - self.mean) / self.std) @ self.weight


def fit_bt_head(
    chosen: torch.Tensor, rejected: torch.Tensor, *, l2: float, steps: int = 200
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight, mean, std) of a linear Bradley–Terry head on (P, D) chosen / rejected features:
    minimises mean softplus(-(w·(c - r))) + l2·|w|² on standardised features (L-BFGS, full batch; the loss
    is convex, so the result does not depend on a seed). No bias: it cancels in every difference."""
    both = torch.cat([chosen, rejected]).double()
    mean, std = both.mean(dim=0), both.std(dim=0).clamp_min(1e-6)
    diff = ((chosen.double() - mean) / std) - ((rejected.double() - mean) / std)
    weight = torch.zeros(diff.shape[1], dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = nn.functional.softplus(-(diff @ weight)).mean() + l2 * (weight * weight).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return weight.detach().float(), mean.float(), std.float()


def diff_accuracy(diff: torch.Tensor) -> float:
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean()) if diff.numel() else float("nan")


def accuracy_interval(
    diff: torch.Tensor, pairs: Sequence[PreferencePair], *, samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % interval of the pair accuracy of reward differences `diff` (P,), by resampling prompts with all their
    pairs: pairs of one prompt (one alpaca instruction, several models' outputs) are not independent draws."""
    won = (diff > 0).double() + 0.5 * (diff == 0).double()
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(_prompt_key(pair), []).append(i)
    members = list(groups.values())
    generator = torch.Generator().manual_seed(seed)
    means = []
    for _ in range(samples):
        picked = torch.randint(0, len(members), (len(members),), generator=generator).tolist()
        means.append(float(won[[i for g in picked for i in members[g]]].mean()))
    quantiles = torch.tensor([0.025, 0.975], dtype=torch.float64)
    low, high = torch.quantile(torch.tensor(means, dtype=torch.float64), quantiles)
    return float(low), float(high)


def _folds(pairs: Sequence[PreferencePair], k: int) -> list[int]:
    """A fold per pair, by a hash of its prompt (pairs of one prompt share a fold)."""
    return [min(int(_bucket("judge-fold", pair) * k), k - 1) for pair in pairs]


HEAD_L2 = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # 1.0 won on both sets at first: the grid goes past it
HEAD_POOLS: tuple[tuple[str, ...], ...] = (("mean",), ("last",), ("mean", "last"))
HEAD_LAYERS = ("final", "upper", "all")  # the last index (final norm applied), the one before it, all of them


def select_head(
    features: torch.Tensor, pairs: Sequence[PreferencePair], all_layers: Sequence[int], *, folds: int = 5,
    l2_grid: Sequence[float] = HEAD_L2,
) -> tuple[HeadParams, list[dict[str, Any]]]:  # fmt: skip
    """Choose the pools, layers and L2 of a head by `folds`-fold cross-validation on judge-train pairs
    (features: (2P, L, 2, H), chosen then rejected per pair), then fit it on all of them.
    Returns the head and the cross-validation table."""
    fold = torch.tensor(_folds(pairs, folds))
    table = []
    best: tuple[float, HeadParams] | None = None
    for pools, which in [(p, w) for p in HEAD_POOLS for w in HEAD_LAYERS]:
        layers = {"final": [all_layers[-1]], "upper": [all_layers[-2]], "all": list(all_layers)}[which]
        probe = HeadParams(layers, list(pools), torch.zeros(0), torch.zeros(0), torch.zeros(0), 0.0)
        x = probe.select(features, all_layers)
        chosen, rejected = x[0::2], x[1::2]
        for l2 in l2_grid:
            diffs = []
            for f in range(folds):
                train, test = fold != f, fold == f
                if not test.any() or not train.any():
                    continue
                w, mu, sd = fit_bt_head(chosen[train], rejected[train], l2=l2)
                diffs.append(((chosen[test] - mu) / sd - (rejected[test] - mu) / sd) @ w)
            accuracy = diff_accuracy(torch.cat(diffs))
            table.append({"pools": list(pools), "layers": layers, "l2": l2, "cv_accuracy": accuracy})
            if best is None or accuracy > best[0]:
                best = (accuracy, HeadParams(layers, list(pools), torch.zeros(0), torch.zeros(0), torch.zeros(0), l2))
    assert best is not None
    head = best[1]
    x = head.select(features, all_layers)
    head.weight, head.mean, head.std = fit_bt_head(x[0::2], x[1::2], l2=head.l2)
    return head, table


@dataclass
class HeadJudge:
    """Kind "head": frozen base-model features, a linear Bradley–Terry head. The model is used read-only, so a
    generation model may be shared, as long as no steering is active while the judge scores."""

    model: nn.Module
    tokenizer: Any
    head: HeadParams
    all_layers: list[int] = field(default_factory=list)
    budget: TokenBudget = JUDGE_BUDGET
    bf16: bool = False
    batch_size: int = 8
    kind: str = "head"

    def score(self, prompts: Sequence[Prompt], replies: Sequence[str]) -> torch.Tensor:
        examples = [encode_reply(self.tokenizer, p, r, self.budget) for p, r in zip(prompts, replies, strict=True)]
        features = pooled_features(
            self.model, examples, self.head.layers, pad=tokenizer_pad_id(self.tokenizer),
            batch_size=self.batch_size, bf16=self.bf16, desc="judge",
        )  # fmt: skip
        return self.head.rewards(self.head.select(features, self.head.layers))


# -- kind "lora": LoRA adapters and a scalar head, trained end to end --------------------------------------


@dataclass
class LoraJudgeConfig:
    """Hyper-parameters of the "lora" judge."""

    rank: int = 8
    lora_alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    lr: float = 2e-4
    head_lr: float = 1e-3
    epochs: int = 1
    batch_pairs: int = 4
    seed: int = 0
    bf16: bool = False
    checkpoint_every: int = 10
    max_pairs: int | None = None  # a seeded sample of the judge-train pairs (`training_subset`): CPU time
    top_layers: int | None = None  # adapters on the last this many decoder layers only: less to backpropagate

    def lora_settings(self) -> dict[str, Any]:
        return {"rank": self.rank, "lora_alpha": self.lora_alpha, "targets": list(self.targets),
                "top_layers": self.top_layers}  # fmt: skip


def training_subset(pairs: Sequence[PreferencePair], n: int | None, seed: int = 0) -> list[PreferencePair]:
    """The first `n` of a seeded shuffle of `pairs` (all when None): the same subset for every kind, so kinds
    compared at equal data see the same pairs."""
    from .data import sample_pairs

    return list(pairs) if n is None or n >= len(pairs) else sample_pairs(pairs, n, seed=seed)


class RewardModel(nn.Module):
    """A (LoRA-wrapped) causal LM's final hidden state at the last token, through a scalar head."""

    def __init__(self, model: nn.Module, hidden: int) -> None:
        super().__init__()
        self.model = model
        self.head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.head.weight)  # every reply starts equal: the first steps are pure head learning
        nn.init.zeros_(self.head.bias)

    def forward(self, batch: Batch) -> torch.Tensor:
        from ..core.layers import unwrap_model

        base = unwrap_model(self.model)
        hidden = base.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)[0]
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), _last_index(batch)]
        return self.head(last.float()).squeeze(-1)  # (B,)


def wrap_lora(model: nn.Module, config: LoraJudgeConfig, layers: list[int] | None = None) -> nn.Module:
    """`model` with a fresh LoRA adapter (peft) on `layers` (default: the config's top layers, else all), only
    the adapter trainable."""
    from peft import LoraConfig, get_peft_model

    from ..core.layers import find_decoder_layers

    if layers is None and config.top_layers:
        count = len(find_decoder_layers(model))
        layers = list(range(max(count - config.top_layers, 0), count))
    lora = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha, target_modules=list(config.targets),
                      lora_dropout=0.0, layers_to_transform=layers)  # fmt: skip
    return get_peft_model(model, lora)


def train_lora_judge(
    model: nn.Module, tokenizer: Any, pairs: Sequence[PreferencePair], config: LoraJudgeConfig,
    checkpoint: Path | None = None, budget: TokenBudget = JUDGE_BUDGET,
) -> tuple[RewardModel, list[float]]:  # fmt: skip
    """Train a "lora" judge on `pairs` with the Bradley–Terry loss -log σ(r(chosen) - r(rejected)); resumes from
    `checkpoint` (adapter, head, optimiser, step, losses) when it exists. `model` is wrapped in place."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from ..core.layers import hidden_size_of

    pairs = training_subset(pairs, config.max_pairs, config.seed)
    torch.manual_seed(config.seed)
    reward = RewardModel(wrap_lora(model, config), hidden_size_of(model))
    reward.head.requires_grad_(True)
    lora_params = [p for n, p in reward.model.named_parameters() if "lora_" in n]
    for p in lora_params:
        p.requires_grad_(True)
    optimiser = torch.optim.AdamW(
        [{"params": lora_params, "lr": config.lr}, {"params": reward.head.parameters(), "lr": config.head_lr}],
        weight_decay=0.0,
    )
    order = list(range(len(pairs)))
    schedule: list[list[int]] = []
    for epoch in range(config.epochs):
        random.Random(config.seed + epoch).shuffle(order)
        schedule += [order[i : i + config.batch_pairs] for i in range(0, len(order), config.batch_pairs)]
    step, losses = 0, []
    state = None if checkpoint is None else load_checkpoint(checkpoint)
    if state is not None:
        set_peft_model_state_dict(reward.model, state["lora"])
        reward.head.load_state_dict(state["head"])
        optimiser.load_state_dict(state["optimiser"])
        step, losses = state["step"], state["losses"]
        log.info("resumed the lora judge at step %d of %d", step, len(schedule))
    pad = tokenizer_pad_id(tokenizer)
    device = next(reward.parameters()).device
    reward.train()
    bar = tqdm(total=len(schedule), initial=step, desc="lora judge")
    while step < len(schedule):
        chunk = [pairs[i] for i in schedule[step]]
        batch = collate(pair_sequences(tokenizer, chunk, budget), pad).to(device)
        with autocast(config.bf16):
            scores = reward(batch)
        loss = nn.functional.softplus(-(scores[0::2] - scores[1::2])).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if checkpoint is not None and (step % config.checkpoint_every == 0 or step == len(schedule)):
            save_checkpoint(checkpoint, {
                "lora": get_peft_model_state_dict(reward.model), "head": reward.head.state_dict(),
                "optimiser": optimiser.state_dict(), "step": step, "losses": losses,
            })  # fmt: skip
    bar.close()
    reward.eval()
    reward.requires_grad_(False)
    return reward, losses


@dataclass
class LoraJudge:
    """Kind "lora": a reward model of its own (the base model wrapped with the judge's adapter). Never share
    its model with generation: the adapter changes every forward pass."""

    reward: RewardModel
    tokenizer: Any
    budget: TokenBudget = JUDGE_BUDGET
    bf16: bool = False
    batch_size: int = 8
    kind: str = "lora"

    def score(self, prompts: Sequence[Prompt], replies: Sequence[str]) -> torch.Tensor:
        examples = [encode_reply(self.tokenizer, p, r, self.budget) for p, r in zip(prompts, replies, strict=True)]
        pad = tokenizer_pad_id(self.tokenizer)
        device = next(self.reward.parameters()).device
        out = torch.zeros(len(examples))
        for idx in _batches(examples, self.batch_size):
            batch = collate([examples[i] for i in idx], pad).to(device)
            with torch.no_grad(), autocast(self.bf16):
                out[idx] = self.reward(batch).float().cpu()
        return out


# -- files ------------------------------------------------------------------------------------------


def save_judge(path: Path, judge: HeadJudge | LoraJudge, *, data_set: str, fingerprint: Any,
               report: dict[str, Any]) -> None:  # fmt: skip
    """Write a judge as safetensors: the head's tensors (and for "lora" the adapter's), and metadata: format,
    kind, set, the base model's fingerprint, the split rule, the token budget and `report` (accuracies, pair
    counts, settings) as JSON."""
    from safetensors.torch import save

    from ..core.profile import atomic_write

    tensors: dict[str, torch.Tensor] = {}
    settings: dict[str, Any] = {}
    if isinstance(judge, HeadJudge):
        head = judge.head
        tensors = {"head.weight": head.weight, "head.mean": head.mean, "head.std": head.std}
        settings = {"layers": head.layers, "pools": head.pools, "l2": head.l2}
    else:
        from peft import get_peft_model_state_dict

        tensors = {f"lora.{k}": v for k, v in get_peft_model_state_dict(judge.reward.model).items()}
        tensors["head.weight"] = judge.reward.head.weight.detach()
        tensors["head.bias"] = judge.reward.head.bias.detach()
        config = judge.reward.model.peft_config["default"]
        layers = config.layers_to_transform
        settings = {"rank": config.r, "lora_alpha": config.lora_alpha, "targets": sorted(config.target_modules),
                    "layers": list(layers) if layers is not None else None}  # fmt: skip
    metadata = {
        "format": FORMAT, "kind": judge.kind, "set": data_set, "fingerprint": fingerprint.to_json(),
        "split_rule": SPLIT_RULE, "budget": json.dumps([judge.budget.prompt, judge.budget.response]),
        "settings": json.dumps(settings, sort_keys=True), "report": json.dumps(report, sort_keys=True, default=str),
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, metadata))


def judge_metadata(path: Path) -> dict[str, Any]:
    """A judge file's metadata, JSON fields decoded."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata() or {})
    if meta.get("format") != FORMAT:
        raise DataFormatError(f"{path}: not a judge file (format {meta.get('format')!r})")
    for key in ("fingerprint", "budget", "settings", "report"):
        meta[key] = json.loads(meta[key])
    return meta


def load_judge(path: Path, model: nn.Module, tokenizer: Any, *, bf16: bool = False,
               check_fingerprint: bool = True) -> HeadJudge | LoraJudge:  # fmt: skip
    """The judge saved in `path`, on `model` (the base model it was trained on: checked by fingerprint).
    A "head" judge uses `model` read-only; a "lora" judge wraps it with its adapter (pass a copy of its own)."""
    from safetensors.torch import load_file

    from ..core.models import model_fingerprint

    meta = judge_metadata(path)
    if check_fingerprint:
        have, want = model_fingerprint(model, tokenizer).digest, meta["fingerprint"].get("digest", "")
        if want and have != want:
            raise DataFormatError(f"{path}: the judge was trained on another base model ({want[:12]} != {have[:12]})")
    tensors = load_file(str(path))
    budget = TokenBudget(*meta["budget"])
    settings = meta["settings"]
    if meta["kind"] == "head":
        head = HeadParams(settings["layers"], settings["pools"], tensors["head.weight"], tensors["head.mean"],
                          tensors["head.std"], settings["l2"])  # fmt: skip
        return HeadJudge(model, tokenizer, head, list(head.layers), budget=budget, bf16=bf16)
    from peft import set_peft_model_state_dict

    from ..core.layers import hidden_size_of

    config = LoraJudgeConfig(
        rank=settings["rank"], lora_alpha=settings["lora_alpha"], targets=tuple(settings["targets"])
    )
    reward = RewardModel(wrap_lora(model, config, settings.get("layers")), hidden_size_of(model))
    set_peft_model_state_dict(reward.model, {k[len("lora.") :]: v for k, v in tensors.items() if k.startswith("lora.")})
    reward.head.weight.data.copy_(tensors["head.weight"])
    reward.head.bias.data.copy_(tensors["head.bias"])
    reward.eval()
    reward.requires_grad_(False)
    return LoraJudge(reward, tokenizer, budget=budget, bf16=bf16)


def length_baseline(pairs: Sequence[PreferencePair]) -> float:
    """Pair accuracy of "the longer reply wins" (characters; a tie counts half): what a judge must beat to be
    more than a length detector."""
    if not pairs:
        return math.nan
    diff = torch.tensor([float(len(p.chosen) - len(p.rejected)) for p in pairs])
    return diff_accuracy(diff)
