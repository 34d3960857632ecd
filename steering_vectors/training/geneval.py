"""The generation evaluation of `rahf eval --generation` and `rahf compare --generation`: rows (profiles,
compositions of profiles, or a system prompt) judged by the replies they produce on a set's dev prompts.

Two steps, so that replies may come from anywhere (the library's `genmetrics.generate_replies`, or the server's
engine in bench/generation.py) and are always scored the same way:
1. `collect_replies`: greedy replies — and, with `samples`, seeded sampled ones — of the unsteered model and of
   every row at every strength of its grid;
2. `score_replies` (no steering may be active: the judge and the perplexity read the unsteered model): per row
   and strength, the win rate against the unsteered replies under the set's judge (ties half, paired bootstrap
   interval over prompts), loop rate, distinct-2, length, refusal rate and perplexity under the unsteered model;
   the default strength chosen on half A of the prompts (`genmetrics.choose_strength_half_split`) and every
   number reported on half B, with the whole set beside it. Sampled replies are scored against the unsteered
   model's sampled replies of the same seed, on all prompts and on half B.
`generation_lines` and `plot_generation` turn the result into a report section and a picture;
`generation_record` into the section a profile file carries (`core.generation_record`, `rahf eval
--generation --gen-annotate DIR`, `bench/generation.py --annotate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..core.generation_record import GenerationRecord
from ..core.profile import Profile
from . import genmetrics as gm
from .evaluate import loops

Prompt = gm.Prompt


@dataclass
class GenRow:
    """One row of the evaluation: `entries` (profile, weight) steer together at weight × strength for every
    strength of `strengths`; no entries and a `system` text: good-instruction prompting (strength 1 only)."""

    name: str
    entries: list[tuple[Profile, float]] = field(default_factory=list)
    strengths: list[float] = field(default_factory=lambda: [1.0])
    system: str | None = None
    method: str = ""

    @classmethod
    def of_profile(cls, profile: Profile, strengths: Sequence[float], name: str | None = None) -> GenRow:
        grid = sorted({float(s) for s in strengths if s != 0} | {float(profile.default_strength)})
        return cls(name or profile.name, [(profile, 1.0)], grid, method=profile.method)

    def weighted(self, strength: float) -> list[tuple[Profile, float]]:
        return [(profile, weight * strength) for profile, weight in self.entries]


@dataclass(frozen=True)
class GenSettings:
    """How replies are made: new tokens, and how many seeded sampled sets beside the greedy one."""

    max_new_tokens: int = 96
    samples: int = 0
    temperature: float = 0.7
    top_p: float = 0.9
    tie: float = 1e-4
    bf16: bool = False


# (prompts, entries, system, sample seed or None) -> one reply per prompt
Generate = Callable[[Sequence[Prompt], list[tuple[Profile, float]], "str | None", "int | None"], list[str]]


def library_generate(model: nn.Module, tokenizer: Any, settings: GenSettings) -> Generate:
    """Replies from `genmetrics.generate_replies` (one prompt at a time, steered at every position)."""

    def generate(prompts: Sequence[Prompt], entries: list[tuple[Profile, float]], system: str | None,
                 seed: int | None) -> list[str]:  # fmt: skip
        return gm.generate_replies(
            model, tokenizer, prompts, entries=entries, system=system, max_new_tokens=settings.max_new_tokens,
            sample=seed is not None, seed=seed or 0, temperature=settings.temperature, top_p=settings.top_p,
            bf16=settings.bf16,
        )  # fmt: skip

    return generate


def collect_replies(
    prompts: Sequence[Prompt], rows: Sequence[GenRow], generate: Generate, settings: GenSettings,
    *, log: Callable[[str], None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """{"unsteered": {"greedy": [...], "sampled": [[...] per seed]}, "rows": {name: {strength: {...}}}}."""
    names = [row.name for row in rows]
    if len(set(names)) != len(names) or "unsteered" in names:
        raise ValueError(f"row names must be distinct and not 'unsteered': {names}")
    seeds = list(range(settings.samples))

    def replies(entries: list[tuple[Profile, float]], system: str | None) -> dict[str, Any]:
        return {"greedy": generate(prompts, entries, system, None),
                "sampled": [generate(prompts, entries, system, seed) for seed in seeds]}  # fmt: skip

    out: dict[str, Any] = {"unsteered": replies([], None), "rows": {}}
    for row in rows:
        out["rows"][row.name] = {}
        for strength in row.strengths:
            out["rows"][row.name][strength] = replies(row.weighted(strength), row.system)
            if log:
                log(f"generation: {row.name} x{strength:g}: {len(prompts)} replies")
    return out


def score_replies(
    model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt], rows: Sequence[GenRow], replies: dict[str, Any],
    judge: Any, settings: GenSettings, *, judge_name: str = "", halves: Sequence[str] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Every number of the generation evaluation (see the module docstring); JSON-ready (strengths as text)."""
    prompts = list(prompts)
    halves = list(halves) if halves is not None else [gm.dev_half(p) for p in prompts]
    in_b = [h == "b" for h in halves]
    pick_b = [i for i, keep in enumerate(in_b) if keep]
    cache: dict[int, tuple[list[float], list[bool], list[tuple[float, int]]]] = {}

    def measured(texts: list[str]) -> tuple[list[float], list[bool], list[tuple[float, int]]]:
        key = id(texts)
        if key not in cache:
            cache[key] = (judge.score(prompts, texts).tolist(), [loops(t) for t in gm.reply_tokens(tokenizer, texts)],
                          gm.reply_nll(model, tokenizer, prompts, texts, bf16=settings.bf16))  # fmt: skip
        return cache[key]

    def versus(texts: list[str], base: list[str], keep: list[int] | None = None) -> dict[str, Any]:
        keep = keep if keep is not None else list(range(len(prompts)))
        rewards, base_rewards = measured(texts)[0], measured(base)[0]
        return gm.win_rate_from_scores([rewards[i] for i in keep], [base_rewards[i] for i in keep],
                                       same=[texts[i] == base[i] for i in keep], tie=settings.tie)  # fmt: skip

    def metrics(texts: list[str], keep: list[int] | None = None) -> dict[str, Any]:
        keep = keep if keep is not None else list(range(len(prompts)))
        nll = measured(texts)[2]
        return {**gm.reply_metrics(tokenizer, [texts[i] for i in keep]),
                "perplexity": gm.pooled_perplexity([nll[i] for i in keep])}  # fmt: skip

    base = replies["unsteered"]
    result: dict[str, Any] = {
        "prompts": len(prompts), "half_a": halves.count("a"), "half_b": halves.count("b"), "judge": judge_name,
        "settings": {"max_new_tokens": settings.max_new_tokens, "samples": settings.samples,
                     "temperature": settings.temperature, "top_p": settings.top_p, "tie": settings.tie},
        "unsteered": {"half_b": metrics(base["greedy"], pick_b), "all": metrics(base["greedy"]),
                      "examples": base["greedy"][:3]},
        "rows": {},
    }  # fmt: skip
    if base["sampled"]:
        result["unsteered"]["sampled"] = [{**metrics(texts), "half_b": metrics(texts, pick_b)}
                                          for texts in base["sampled"]]  # fmt: skip
    for row in rows:
        at = replies["rows"][row.name]
        table: dict[float, gm.GenerationRows] = {}
        for strength, texts in [(0.0, base["greedy"]), *((s, at[s]["greedy"]) for s in row.strengths)]:
            rewards, looped, nll = measured(texts)
            table[strength] = gm.GenerationRows(
                score=gm.win_outcomes(rewards, measured(base["greedy"])[0],
                                      same=[a == b for a, b in zip(texts, base["greedy"], strict=True)],
                                      tie=settings.tie),
                looped=looped, nll=nll,
            )  # fmt: skip
        choice = gm.choose_strength_half_split(prompts, table, halves=halves)
        strengths = {}
        for strength in row.strengths:
            texts = at[strength]["greedy"]
            entry = {
                "half_a": choice.half_a[strength],
                "half_b": {**metrics(texts, pick_b), "win": versus(texts, base["greedy"], pick_b)},
                "all": {**metrics(texts), "win": versus(texts, base["greedy"])},
                "examples": texts[:3],
            }
            if base["sampled"]:
                entry["sampled"] = [{**metrics(t), "win": versus(t, b),
                                     "half_b": {**metrics(t, pick_b), "win": versus(t, b, pick_b)}}
                                    for t, b in zip(at[strength]["sampled"], base["sampled"], strict=True)]
            strengths[f"{strength:g}"] = entry
        defaults = [p.default_strength for p, _ in row.entries]
        result["rows"][row.name] = {
            "method": row.method, "system": row.system, "chosen_strength": choice.strength,
            "file_default": defaults[0] if len(defaults) == 1 else None,
            "unsteered_half_a": choice.half_a[0.0], "strengths": strengths,
        }  # fmt: skip
    return result


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f} %"


def generation_lines(result: dict[str, Any]) -> list[str]:
    """A Markdown section: every row at every strength, half B's numbers, the half-A choice marked."""
    settings, base = result["settings"], result["unsteered"]
    lines = [
        "## Generations judged", "",
        f"Greedy replies (up to {settings['max_new_tokens']} new tokens) to {result['prompts']} dev prompts, each "
        f"once; judge `{result['judge']}`. The strength is chosen on half A ({result['half_a']} prompts: best win "
        f"rate with loop rate ≤ unsteered's and perplexity ≤ +10 %); the table reports half B ({result['half_b']} "
        f"prompts), win rate against the unsteered replies with a paired bootstrap 95 % interval (ties half).",
        "",
        f"Unsteered, half B: loops {_pct(base['half_b']['loop_rate'])}, distinct-2 "
        f"{base['half_b']['distinct_2']:.3f}, length {base['half_b']['length']:.0f} tokens, refusals "
        f"{_pct(base['half_b']['refusal_rate'])}, perplexity {base['half_b']['perplexity']:.2f}.",
        "",
        "| row | strength | win rate, half B [95 % CI] | loops | distinct-2 | length | refusals | perplexity | "
        "half A: win / loops / meets |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]  # fmt: skip
    for name, row in result["rows"].items():
        for strength, entry in row["strengths"].items():
            b, a, win = entry["half_b"], entry["half_a"], entry["half_b"]["win"]
            mark = " (chosen)" if float(strength) == row["chosen_strength"] else ""
            lines.append(
                f"| {name} | {strength}{mark} | {_pct(win['win_rate'])} [{_pct(win['low'])}, {_pct(win['high'])}] | "
                f"{_pct(b['loop_rate'])} | {b['distinct_2']:.3f} | {b['length']:.0f} | {_pct(b['refusal_rate'])} | "
                f"{b['perplexity']:.2f} | {_pct(a['score'])} / {_pct(a['loop_rate'])} / "
                f"{'yes' if a['meets'] else 'no'} |"
            )
        if row["chosen_strength"] == 0:
            lines.append(f"| {name} | 0 (chosen: no strength meets the limits on half A) | – | – | – | – | – | – | – |")
    if settings["samples"]:
        lines += ["", f"Sampled replies (temperature {settings['temperature']:g}, top-p {settings['top_p']:g}, "
                  f"{settings['samples']} seeds), win rate against the unsteered samples of the same seed, on all "
                  "prompts and on half B:", "",
                  "| row | strength | seed | win rate, all [95 % CI] | loops, all | win rate, half B [95 % CI] | "
                  "loops, half B |", "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for name, row in result["rows"].items():
            for strength, entry in row["strengths"].items():
                for seed, s in enumerate(entry.get("sampled", [])):
                    win, b = s["win"], s.get("half_b")
                    half_b = (f"{_pct(b['win']['win_rate'])} [{_pct(b['win']['low'])}, {_pct(b['win']['high'])}] | "
                              f"{_pct(b['loop_rate'])}") if b else "– | –"  # fmt: skip
                    lines.append(f"| {name} | {strength} | {seed} | {_pct(win['win_rate'])} [{_pct(win['low'])}, "
                                 f"{_pct(win['high'])}] | {_pct(s['loop_rate'])} | {half_b} |")  # fmt: skip
    return lines


def plot_generation(result: dict[str, Any], path: Path) -> Path:
    """Win rate (half B, with its interval) and loop rate against strength, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    base_loops = result["unsteered"]["half_b"]["loop_rate"]
    for name, row in result["rows"].items():
        xs = [0.0, *(float(s) for s in row["strengths"])]
        wins = [row["strengths"][s]["half_b"]["win"] for s in row["strengths"]]
        ys = [50.0, *(100 * w["win_rate"] for w in wins)]
        low = [0.0, *(100 * (w["win_rate"] - w["low"]) for w in wins)]
        high = [0.0, *(100 * (w["high"] - w["win_rate"]) for w in wins)]
        axes[0].errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, label=name)
        axes[1].plot(xs, [100 * base_loops, *(100 * row["strengths"][s]["half_b"]["loop_rate"]
                                               for s in row["strengths"])], marker="o", label=name)  # fmt: skip
    axes[0].axhline(50, color="grey", linestyle="--", label="unsteered (50 %)")
    axes[1].axhline(100 * base_loops, color="grey", linestyle="--", label="unsteered")
    axes[0].set(xlabel="strength", ylabel="win rate vs unsteered, half B (%)", title="judge win rate")
    axes[1].set(xlabel="strength", ylabel="replies that loop, half B (%)", title="loop rate")
    for axis in axes:
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def generation_record(
    result: dict[str, Any], row: str, *, data_set: str, replies: str, judge_sha256: str = "", source: str = "",
    decoding: dict[str, float] | None = None, conditions: str = "ignored",
) -> GenerationRecord:  # fmt: skip
    """The generation section of row `row`'s profile, from a `score_replies` result: half B's win rate, loop and
    refusal rates and perplexity at every strength, the unsteered row and the strength chosen on half A.
    `replies`: "engine" or "library" (who made them); `decoding`: the profile's decoding defaults the steered replies
    took; `conditions`: "ignored" or "honoured"."""
    if row not in result["rows"]:
        raise ValueError(f"the generation result has no row {row!r} (its rows: {sorted(result['rows'])})")
    entry = result["rows"][row]

    def rates(half_b: dict[str, Any]) -> dict[str, Any]:
        return {key: half_b[key] for key in ("loop_rate", "refusal_rate", "perplexity")}

    strengths = sorted(
        ({"strength": float(strength), **{k: measured["half_b"]["win"][k] for k in ("win_rate", "low", "high")},
          **rates(measured["half_b"])} for strength, measured in entry["strengths"].items()),
        key=lambda r: r["strength"],
    )  # fmt: skip
    record = {"set": data_set, "judge": result["judge"], "judge_sha256": judge_sha256, "replies": replies,
              "max_new_tokens": result["settings"]["max_new_tokens"], "prompts": result["prompts"],
              "half_a": result["half_a"], "half_b": result["half_b"], "chosen_strength": entry["chosen_strength"],
              "unsteered": rates(result["unsteered"]["half_b"]), "strengths": strengths, "source": source,
              "decoding": dict(decoding or {}), "conditions": conditions}
    return GenerationRecord.from_json(record)  # checked as a file's section is checked


def data_set_name(data: str | Path) -> str:
    """The preference set a data path names: the folder (alpaca_helpful) or the folder of a .jsonl file."""
    data = Path(data)
    return data.parent.name if data.suffix == ".jsonl" else data.name


def judge_file_for(judge: Path | None, judges: Path, data: str | Path) -> Path:
    """`judge` when given, else the judge `judges/report.json` keeps for the data folder's name (alpaca_helpful,
    hh_harmless); a clear error when there is none."""
    if judge is not None:
        if not Path(judge).is_file():
            raise FileNotFoundError(f"--judge {judge}: no such file")
        return Path(judge)
    from .judge_build import kept_judge_file

    name = data_set_name(data)
    path = kept_judge_file(judges, name)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the judge kept for {name} is missing; run bench/judge.py")
    return path


def evaluate_from_args(args: Any, model: nn.Module, tokenizer: Any, prompts: Sequence[Prompt],
                       rows: Sequence[GenRow], bf16: bool, judge_path: Path) -> dict[str, Any]:  # fmt: skip
    """The whole evaluation with the library's replies, as `rahf eval` / `rahf compare --generation` run it;
    `judge_path` as `judge_file_for` resolved it (the commands resolve it first, to fail before any work)."""
    import logging

    from .judge import load_judge

    settings = GenSettings(max_new_tokens=args.gen_tokens, samples=args.gen_samples, bf16=bf16)
    prompts = list(prompts)[: args.gen_limit] if args.gen_limit else list(prompts)
    judge = load_judge(judge_path, model, tokenizer, bf16=bf16)  # checks the base model before any reply is made
    replies = collect_replies(prompts, rows, library_generate(model, tokenizer, settings), settings,
                              log=logging.getLogger(__name__).info)  # fmt: skip
    return score_replies(model, tokenizer, prompts, rows, replies, judge, settings, judge_name=judge_path.name)
