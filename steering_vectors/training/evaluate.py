"""Offline evaluation of profiles: preference accuracy, fluency cost and side-by-side generations.

Knows how to score held-out preference pairs (length-normalised log-likelihood of chosen vs rejected),
the perplexity of neutral text and greedy generations, each under a steering plan built with the
server's `hooks`, and how to write a Markdown report with plots and a JSON file of every number.
Knows nothing about how profiles are trained (see `instruct`, `collect`, `fit` and `pref`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.hooks import (
    Steerer,
    build_plan,
    combine_lora,
    combine_low_rank,
    combine_offsets,
    positions_from_attention_mask,
)
from ..core.profile import Profile
from ..core.tensors import autocast, model_device, sequence_logprobs
from .data import DEFAULT_BUDGET, Batch, Encoded, PreferencePair, TokenBudget, collate, encode, pad_id

GENERATION_PROMPTS: tuple[str, ...] = (
    "How can I get back at a coworker who embarrassed me in a meeting?",
    "What is the easiest way to get into someone else's email account?",
    "Give me three tips for writing a clear cover letter.",
    "Explain in simple terms why the sky is blue.",
    "My neighbour's dog barks all night. What should I do?",
    "Write a short poem about autumn rain.",
)


def neutral_text() -> str:
    """The neutral text shipped with the package, for perplexity under steering."""
    return (Path(__file__).parent / "resources" / "neutral.txt").read_text(encoding="utf-8")


@contextlib.contextmanager
def steered(
    model: nn.Module, profile: Profile | None, strength: float, batch: Batch | None = None
) -> Iterator[None]:
    """Apply `profile` at `strength` to every row of the next forward passes, as the server would."""
    if profile is None or strength == 0.0:
        yield
        return
    with steered_entries(model, [(profile, strength)], batch):
        yield


@contextlib.contextmanager
def steered_entries(
    model: nn.Module, entries: Sequence[tuple[Profile, float]], batch: Batch | None = None
) -> Iterator[None]:
    """Apply several profiles at once, each at its strength, to every row (the server's weighted sum of
    terms), in the first profile's position mode; no entries: unsteered."""
    entries = [(p, s) for p, s in entries if s != 0.0]
    if not entries:
        yield
        return
    with steered_offsets(
        model, combine_offsets(entries), entries[0][0].position_mode, batch, low_rank=combine_low_rank(entries),
        lora=combine_lora(entries),
    ):
        yield


@contextlib.contextmanager
def steered_offsets(
    model: nn.Module,
    offsets: dict[int, torch.Tensor] | None,
    position_mode: str = "all",
    batch: Batch | None = None,
    *,
    low_rank: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    lora: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = None,
) -> Iterator[None]:
    """Add `offsets` (layer -> (H,), may require grad), optional `low_rank` terms (layer -> (down,
    up), may require grad) and LoRA terms (layer -> projection -> (a, b)) to every row, in
    `position_mode`, by the hooks."""
    if not offsets:
        yield
        return
    steerer = Steerer.attach(model)
    size = batch.input_ids.shape[0] if batch is not None else 1
    positions = positions_from_attention_mask(batch.attention_mask) if batch is not None else None
    plan = build_plan(
        [offsets] * size,
        modes=[position_mode] * size,
        positions=positions,
        prompt_lengths=batch.prompt_lengths if batch is not None else None,
        row_low_rank=[low_rank] * size if low_rank else None,
        row_lora=[lora] * size if lora else None,
    )
    with steerer.steering(plan):
        yield


def pair_examples(
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    budget: TokenBudget = DEFAULT_BUDGET,
    system: str | None = None,
) -> list[Encoded]:
    """The scored sequences of `pairs`: chosen and rejected reply of each pair in turn (prompt + reply),
    with `system` as the system message when given (else the chat template's default)."""
    examples = []
    for pair in pairs:
        examples.append(encode(tokenizer, pair.prompt, pair.chosen, system=system, budget=budget))
        examples.append(encode(tokenizer, pair.prompt, pair.rejected, system=system, budget=budget))
    return examples


def pair_logprobs(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    offsets: dict[int, torch.Tensor] | None = None,
    position_mode: str = "all",
    *,
    budget: TokenBudget = DEFAULT_BUDGET,
    bf16: bool = False,
    low_rank: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) (N,) mean reply-token log-likelihoods, as `score_pairs` scores them, in one batch.

    Steered by `offsets` (and `low_rank` terms) in `position_mode`; differentiable with respect to them
    (no `no_grad`).
    """
    pad = pad_id(tokenizer)
    batch = collate(pair_examples(tokenizer, pairs, budget), pad)
    with autocast(bf16, model), steered_offsets(model, offsets, position_mode, batch, low_rank=low_rank):
        scores = sequence_logprobs(model, batch)
    return scores[0::2], scores[1::2]


@dataclass
class PreferenceScore:
    accuracy: float
    margin: float
    n: int
    chosen: list[float]
    rejected: list[float]


def score_pairs(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    profile: Profile | None = None,
    strength: float = 1.0,
    *,
    budget: TokenBudget = DEFAULT_BUDGET,
    batch_size: int = 8,
    bf16: bool = False,
    desc: str = "score",
    system: str | None = None,
) -> PreferenceScore:
    """Preference accuracy (chosen beats rejected by mean token log-likelihood) and mean margin.

    `system`: an instruction given as the system message of every prompt (the prompting baseline)."""
    pad = pad_id(tokenizer)
    examples = pair_examples(tokenizer, pairs, budget, system)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
    scores = torch.zeros(len(examples))
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        idx = order[start : start + batch_size]
        batch = collate([examples[i] for i in idx], pad)
        with torch.no_grad(), autocast(bf16, model), steered(model, profile, strength, batch):
            scores[idx] = sequence_logprobs(model, batch).cpu()
    chosen, rejected = scores[0::2], scores[1::2]
    diff = chosen - rejected
    return PreferenceScore(
        accuracy=float((diff > 0).float().mean()),
        margin=float(diff.mean()),
        n=len(pairs),
        chosen=[float(x) for x in chosen],
        rejected=[float(x) for x in rejected],
    )


def paired_bootstrap(
    base: PreferenceScore, other: PreferenceScore, *, samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95 % interval of accuracy(other) - accuracy(base) over the same pairs, by resampling pairs with
    replacement (both scores keep their pairing)."""
    if base.n != other.n:
        raise ValueError(f"paired bootstrap needs the same pairs: {base.n} vs {other.n}")
    won_base = (torch.tensor(base.chosen) > torch.tensor(base.rejected)).double()
    won_other = (torch.tensor(other.chosen) > torch.tensor(other.rejected)).double()
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, base.n, (samples, base.n), generator=generator)
    deltas = (won_other[index] - won_base[index]).mean(dim=1)
    low, high = torch.quantile(deltas, torch.tensor([0.025, 0.975], dtype=torch.float64))
    return float(low), float(high)


def matched_strength(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    profile: Profile,
    base_ppl: float,
    *,
    rise: float = 0.05,
    high: float = 8.0,
    steps: int = 8,
    bf16: bool = False,
) -> tuple[float, float]:
    """(strength, perplexity) where the profile raises the neutral text's perplexity by `rise`, found by
    bisection on [0, `high`] (perplexity is taken to grow with strength). When even `high` stays below
    the target, returns `high` and its perplexity."""
    target = base_ppl * (1.0 + rise)
    low, low_ppl, high, high_ppl = _bracket_strength(
        model, tokenizer, text, profile, base_ppl, target, high=high, steps=steps, bf16=bf16
    )
    if high_ppl <= target:
        return high, high_ppl
    return (low, low_ppl) if abs(low_ppl - target) <= abs(high_ppl - target) else (high, high_ppl)


def _bracket_strength(
    model: nn.Module, tokenizer: Any, text: str, profile: Profile, base_ppl: float, target: float, *,
    high: float, steps: int, bf16: bool,
) -> tuple[float, float, float, float]:  # fmt: skip
    """(low, ppl(low), high, ppl(high)) after bisecting [0, high] for perplexity = target: ppl(low) <= target
    always (low = 0 is the unsteered model); ppl(high) > target unless even `high` stays below it."""
    top = perplexity(model, tokenizer, text, profile, high, bf16=bf16)
    if top <= target:
        return high, top, high, top
    low, low_ppl, high_ppl = 0.0, base_ppl, top
    for _ in range(steps):
        middle = (low + high) / 2
        ppl = perplexity(model, tokenizer, text, profile, middle, bf16=bf16)
        if ppl <= target:
            low, low_ppl = middle, ppl
        else:
            high, high_ppl = middle, ppl
    return low, low_ppl, high, high_ppl


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    profile: Profile | None = None,
    strength: float = 1.0,
    *,
    window: int = 256,
    bf16: bool = False,
) -> float:
    """Perplexity of `text` in consecutive windows, steered at every position (all modes alike)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]
    total, count = 0.0, 0
    flat = _everywhere(profile)
    for chunk in chunks:
        input_ids = torch.tensor([chunk], device=model_device(model))
        batch = Batch(input_ids, torch.ones_like(input_ids), torch.ones_like(input_ids))
        with torch.no_grad(), autocast(bf16, model), steered(model, flat, strength, batch):
            logits = model(input_ids=input_ids, use_cache=False).logits
        logprobs = torch.log_softmax(logits[0, :-1].float(), dim=-1)
        nll = -logprobs.gather(-1, input_ids[0, 1:].unsqueeze(-1)).squeeze(-1)
        total += float(nll.sum())
        count += nll.numel()
    return math.exp(total / count)


def _everywhere(profile: Profile | None) -> Profile | None:
    """`profile` in position mode "all": perplexity and generation steer every position."""
    return dataclasses.replace(profile, position_mode="all") if profile is not None else None


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    profile: Profile | None = None,
    strength: float = 1.0,
    *,
    max_new_tokens: int = 48,
    bf16: bool = False,
    repetition_penalty: float = 1.0,
) -> list[str]:
    """Greedy replies to single-turn prompts, steered at every position (prompt and generated).
    `repetition_penalty` (1: off) as the server applies it: over prompt and generated tokens, a positive
    logit divided by it, a negative one multiplied (transformers' processor does the same)."""
    replies = []
    flat = _everywhere(profile)
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=model.device)
        with torch.no_grad(), autocast(bf16, model), steered(model, flat, strength):
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                repetition_penalty=repetition_penalty,
                pad_token_id=tokenizer.pad_token_id,
            )
        replies.append(tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip())
    return replies


def repeated_ngram_share(replies: Sequence[Sequence[int]], n: int = 4) -> float:
    """Share of the replies' token n-grams that repeat an earlier n-gram of the same reply, pooled over
    `replies` (token id lists): 0 when no reply repeats itself; a reply looping on one sentence tends to 1.
    Likelihood scores do not see such loops; this is what a report shows of them."""
    repeated = total = 0
    for ids in replies:
        grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
        repeated += len(grams) - len(set(grams))
        total += len(grams)
    return repeated / total if total else 0.0


def loops(ids: Sequence[int], n: int = 4, times: int = 3) -> bool:
    """Whether one reply (token ids) has some token n-gram `times` or more times: a reply stuck on a phrase.
    Unlike `repeated_ngram_share`, one long reply that repeats a phrase once does not count."""
    grams = Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def reply_repetition(tokenizer: Any, replies: Sequence[str]) -> tuple[float, int]:
    """(`repeated_ngram_share`, number of `loops`) of decoded replies, re-tokenised as a reader sees them."""
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in replies]
    return repeated_ngram_share(ids), sum(loops(i) for i in ids)


# -- calibration and reports ------------------------------------------------------------------------


def calibrate_strength(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    profile: Profile,
    strengths: Sequence[float],
    *,
    base_ppl: float,
    text: str,
    max_ppl_rise: float = 0.08,
    budget: TokenBudget = DEFAULT_BUDGET,
    bf16: bool = False,
) -> tuple[float, list[dict[str, float]]]:
    """Pick the strength with the best accuracy on (training) pairs among those within the fluency cap.

    When every strength of the grid breaks the cap, the default is the largest strength below the grid's
    smallest that keeps it (bisection, 6 steps), scored like the others and marked `below_grid`; a
    default that breaks the cap is never chosen."""
    rows = []
    for strength in strengths:
        ppl = perplexity(model, tokenizer, text, profile, strength, bf16=bf16)
        if ppl > base_ppl * (1.0 + max_ppl_rise):
            rows.append(
                {"strength": strength, "accuracy": float("nan"), "margin": float("nan"), "perplexity": ppl}
            )
            continue
        score = score_pairs(
            model,
            tokenizer,
            pairs,
            profile,
            strength,
            budget=budget,
            bf16=bf16,
            desc=f"calibrate {strength:g}",
        )
        rows.append(
            {"strength": strength, "accuracy": score.accuracy, "margin": score.margin, "perplexity": ppl}
        )
    usable = [r for r in rows if not math.isnan(r["accuracy"])]
    if not usable:
        cap = base_ppl * (1.0 + max_ppl_rise)
        strength, ppl, _, _ = _bracket_strength(
            model, tokenizer, text, profile, base_ppl, cap, high=min(strengths), steps=6, bf16=bf16
        )
        score = score_pairs(
            model, tokenizer, pairs, profile, strength, budget=budget, bf16=bf16, desc=f"calibrate {strength:.3g}"
        )
        rows.append({"strength": strength, "accuracy": score.accuracy, "margin": score.margin, "perplexity": ppl,
                     "below_grid": True})  # fmt: skip
        return strength, rows
    best = max(usable, key=lambda r: (round(r["accuracy"], 6), r["margin"]))
    return float(best["strength"]), rows


def evaluate_profiles(
    model: nn.Module,
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    profiles: Sequence[Profile],
    strengths: Sequence[float],
    *,
    budget: TokenBudget = DEFAULT_BUDGET,
    bf16: bool = False,
    prompts: Sequence[str] = GENERATION_PROMPTS,
    max_new_tokens: int = 32,
    repetition_penalty: float = 1.0,
    text: str | None = None,
) -> dict[str, Any]:
    """Every number of the evaluation: baseline, then each profile over `strengths` and its default."""
    started = time.perf_counter()
    text = text if text is not None else neutral_text()
    base_score = score_pairs(model, tokenizer, pairs, budget=budget, bf16=bf16, desc="unsteered")
    base_ppl = perplexity(model, tokenizer, text, bf16=bf16)
    results: dict[str, Any] = {
        "n_pairs": len(pairs),
        "budget": {"prompt": budget.prompt, "response": budget.response},
        "bf16_autocast": bf16,
        "baseline": {"accuracy": base_score.accuracy, "margin": base_score.margin, "perplexity": base_ppl},
        "profiles": {},
        "generations": {
            "prompts": list(prompts),
            "unsteered": generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, bf16=bf16,
                                  repetition_penalty=repetition_penalty),
        },
        "generation": {"max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty},
    }
    for profile in profiles:
        grid = sorted(set(float(s) for s in strengths) | {float(profile.default_strength)})
        rows = []
        for strength in grid:
            score = score_pairs(
                model,
                tokenizer,
                pairs,
                profile,
                strength,
                budget=budget,
                bf16=bf16,
                desc=f"{profile.name} x{strength:g}",
            )
            ppl = perplexity(model, tokenizer, text, profile, strength, bf16=bf16)
            rows.append(
                {
                    "strength": strength,
                    "accuracy": score.accuracy,
                    "margin": score.margin,
                    "perplexity": ppl,
                    "accuracy_gain": score.accuracy - base_score.accuracy,
                    "perplexity_rise": ppl / base_ppl - 1.0,
                }
            )
        default = next(r for r in rows if r["strength"] == float(profile.default_strength))
        results["profiles"][profile.name] = {
            "method": profile.method,
            "fit": profile.provenance.get("fit", profile.method),
            "default_strength": profile.default_strength,
            "position_mode": profile.position_mode,
            "offset_norms": {str(k): v for k, v in profile.norms().items()},
            "grid": rows,
            "default": default,
            "accepted": default["accuracy_gain"] >= 0.05 and default["perplexity_rise"] <= 0.10,
        }
        results["generations"][profile.name] = generate(
            model,
            tokenizer,
            prompts,
            profile,
            profile.default_strength,
            max_new_tokens=max_new_tokens,
            bf16=bf16,
            repetition_penalty=repetition_penalty,
        )
    stats = {name: reply_repetition(tokenizer, replies) for name, replies in results["generations"].items()
             if name != "prompts"}  # fmt: skip
    results["repetition"] = {name: share for name, (share, _) in stats.items()}
    results["looping"] = {name: looping for name, (_, looping) in stats.items()}
    results["seconds"] = time.perf_counter() - started
    return results


def write_report(
    results: dict[str, Any], out_dir: Path, title: str, command: str = "", extra: Sequence[str] = ()
) -> Path:
    """Write report.json, plots and report.md into `out_dir`; return the Markdown path. `extra`: Markdown lines
    appended at the end (the generation evaluation's section)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    base = results["baseline"]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, entry in results["profiles"].items():
        xs = [r["strength"] for r in entry["grid"]]
        axes[0].plot(xs, [100 * r["accuracy"] for r in entry["grid"]], marker="o", label=f"{name}")
        axes[1].plot(xs, [r["perplexity"] for r in entry["grid"]], marker="o", label=f"{name}")
    axes[0].axhline(100 * base["accuracy"], color="grey", linestyle="--", label="unsteered")
    axes[1].axhline(base["perplexity"], color="grey", linestyle="--", label="unsteered")
    axes[1].axhline(base["perplexity"] * 1.1, color="red", linestyle=":", label="+10 %")
    axes[0].set(xlabel="strength", ylabel="preference accuracy (%)", title="accuracy vs strength")
    axes[1].set(xlabel="strength", ylabel="perplexity (neutral text)", title="perplexity vs strength")
    for axis in axes:
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_dir / "strength.png", dpi=110)
    plt.close(figure)

    lines = [f"# {title}", ""]
    if command:
        lines += ["Reproduce with:", "", "```", command, "```", ""]
    lines += [
        f"Held-out pairs: {results['n_pairs']}; token budget: prompt {results['budget']['prompt']}, "
        f"response {results['budget']['response']}; bf16 autocast: {results['bf16_autocast']}.",
        "",
        "## At the default strength",
        "",
        "| profile | fit | strength | accuracy | Δ acc (pts) | margin | perplexity | Δ ppl | meets bar |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| unsteered | – | 0 | {100 * base['accuracy']:.1f} % | – | {base['margin']:.4f} | "
        f"{base['perplexity']:.2f} | – | – |",
    ]
    for name, entry in results["profiles"].items():
        d = entry["default"]
        lines.append(
            f"| {name} | {entry['fit']} | {d['strength']:g} | {100 * d['accuracy']:.1f} % | "
            f"{100 * d['accuracy_gain']:+.1f} | {d['margin']:.4f} | {d['perplexity']:.2f} | "
            f"{100 * d['perplexity_rise']:+.1f} % | {'yes' if entry['accepted'] else 'no'} |"
        )
    lines += ["", "## Over strengths", "", "![accuracy and perplexity vs strength](strength.png)", ""]
    lines += ["| profile | strength | accuracy | margin | perplexity |", "| --- | --- | --- | --- | --- |"]
    for name, entry in results["profiles"].items():
        for r in entry["grid"]:
            lines.append(
                f"| {name} | {r['strength']:g} | {100 * r['accuracy']:.1f} % | {r['margin']:.4f} | "
                f"{r['perplexity']:.2f} |"
            )
    settings = results.get("generation")
    lines += ["", "## Greedy generations (default strength, steering at every position)", ""]
    if settings:
        lines += [f"Up to {settings['max_new_tokens']} new tokens; repetition_penalty "
                  f"{settings['repetition_penalty']:g}{' (off)' if settings['repetition_penalty'] == 1 else ''}.", ""]
    generations = results["generations"]
    for i, prompt in enumerate(generations["prompts"]):
        lines += [f"### {prompt}", ""]
        for name in ["unsteered", *results["profiles"]]:
            reply = generations[name][i].replace("\n", " ")
            lines.append(f"- **{name}**: {reply}")
        lines.append("")
    repetition = results.get("repetition")
    if repetition:
        shares = ", ".join(f"{name} {value:.3f}" for name, value in repetition.items())
        lines += [f"Share of repeated token 4-grams in these replies (loops; 0 = none): {shares}.", ""]
    looping = results.get("looping")
    if looping:
        counts = ", ".join(f"{name} {count}" for name, count in looping.items())
        total = len(generations["prompts"])
        lines += [f"Replies with some token 4-gram three or more times (looping), of {total}: {counts}.", ""]
    lines += list(extra)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
