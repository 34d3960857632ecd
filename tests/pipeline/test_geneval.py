"""The generation evaluation (`geneval`, `rahf eval --generation`): hand-computed scores with a stand-in judge,
replies that equal the library's generation, compositions, and the command end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from steering_vectors.cli import main
from steering_vectors.core.models import load_model
from steering_vectors.core.profile import Profile
from steering_vectors.training import geneval
from steering_vectors.training import genmetrics as gm
from steering_vectors.training.judge import HeadJudge, HeadParams, save_judge


class LengthJudge:  # a stand-in judge: the longer reply is better
    kind = "length"

    def score(self, prompts, replies):
        return torch.tensor([float(len(r)) for r in replies])


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    return load_model(tiny_model_dir)


def _profile(tiny, name: str, seed: int, default: float = 1.0) -> Profile:
    generator = torch.Generator().manual_seed(seed)
    hidden = tiny.model.config.hidden_size
    return Profile(name, {1: 3 * torch.randn(hidden, generator=generator)}, default_strength=default)


def test_scores_are_the_hand_computed_win_rates_and_the_half_a_choice_respects_loops(tiny, monkeypatch) -> None:
    monkeypatch.setattr(gm, "reply_nll", lambda model, tok, prompts, texts, **kw: [(1.0, 1)] * len(texts))
    prompts = ["p0", "p1", "p2", "p3"]
    halves = ["a", "a", "b", "b"]
    loop = "go " * 14  # a token 4-gram three times: a loop
    replies = {
        "unsteered": {"greedy": ["aa", "bb", "cc", "dd"], "sampled": [["a", "b", "c", "d"]]},
        "rows": {"p": {
            1.0: {"greedy": ["aaa", "bbb", "cc", "dddd"], "sampled": [["aa", "b", "c", "d"]]},
            2.0: {"greedy": [loop, loop, "c", "d"], "sampled": [["", "", "", ""]]},
        }},
    }  # fmt: skip
    row = geneval.GenRow("p", [(Profile("p", {1: torch.zeros(64)}), 1.0)], [1.0, 2.0], method="m")
    settings = geneval.GenSettings(samples=1)
    result = geneval.score_replies(tiny.model, tiny.tokenizer, prompts, [row], replies, LengthJudge(), settings,
                                   judge_name="len", halves=halves)  # fmt: skip
    got = result["rows"]["p"]
    # half A: both strengths win both prompts, but strength 2 loops on both (unsteered: none): strength 1 is chosen
    assert got["strengths"]["2"]["half_a"]["score"] == 1.0 and not got["strengths"]["2"]["half_a"]["meets"]
    assert got["strengths"]["1"]["half_a"]["score"] == 1.0 and got["strengths"]["1"]["half_a"]["meets"]
    assert got["chosen_strength"] == 1.0
    # strength 1 on half B: "cc" is the same reply (a tie), "dddd" beats "dd"
    win_b = got["strengths"]["1"]["half_b"]["win"]
    assert (win_b["win_rate"], win_b["wins"], win_b["ties"], win_b["losses"]) == (0.75, 1, 1, 0)
    assert got["strengths"]["1"]["all"]["win"]["win_rate"] == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert got["strengths"]["2"]["half_b"]["win"]["win_rate"] == 0.0
    assert got["strengths"]["2"]["all"]["loop_rate"] == 0.5 and got["strengths"]["1"]["all"]["loop_rate"] == 0.0
    # sampled replies against the unsteered samples of the same seed: "aa" > "a", then three ties
    assert got["strengths"]["1"]["sampled"][0]["win"]["win_rate"] == pytest.approx((1 + 0.5 * 3) / 4)
    assert got["strengths"]["2"]["sampled"][0]["win"]["win_rate"] == 0.0
    assert (result["half_a"], result["half_b"], result["judge"]) == (2, 2, "len")
    text = "\n".join(geneval.generation_lines(result))
    assert "| p | 1 (chosen) | 75.0 % [" in text and "| p | 2 | 0.0 % [0.0 %, 0.0 %] | 0.0 % |" in text
    assert json.loads(json.dumps(result))["rows"]["p"]["chosen_strength"] == 1.0  # JSON-ready as it is


def test_replies_are_the_librarys_and_a_composition_sums_its_profiles(tiny) -> None:
    p = _profile(tiny, "p", 1)
    prompts = ["hello", [{"role": "user", "content": "tell me"}]]
    rows = [
        geneval.GenRow.of_profile(p, [1.0, 2.0, 0.0]),
        geneval.GenRow("p+p", [(p, 1.0), (p, 1.0)], [1.0]),
        geneval.GenRow("prompt", [], [1.0], system="Be brief."),
    ]
    assert rows[0].strengths == [1.0, 2.0]  # strength 0 is the unsteered row, always run
    settings = geneval.GenSettings(max_new_tokens=6)
    generate = geneval.library_generate(tiny.model, tiny.tokenizer, settings)
    got = geneval.collect_replies(prompts, rows, generate, settings)
    assert got["unsteered"]["greedy"] == gm.generate_replies(tiny.model, tiny.tokenizer, prompts, max_new_tokens=6)
    for strength in (1.0, 2.0):
        want = gm.generate_replies(tiny.model, tiny.tokenizer, prompts, p, strength, max_new_tokens=6)
        assert got["rows"]["p"][strength]["greedy"] == want
    assert got["rows"]["p+p"][1.0]["greedy"] == got["rows"]["p"][2.0]["greedy"]  # 1·δ + 1·δ == 2·δ exactly
    assert got["rows"]["p"][2.0]["greedy"] != got["unsteered"]["greedy"]
    assert got["rows"]["prompt"][1.0]["greedy"] == gm.generate_replies(
        tiny.model, tiny.tokenizer, prompts, system="Be brief.", max_new_tokens=6
    )
    with pytest.raises(ValueError, match="distinct"):
        geneval.collect_replies(prompts, [rows[0], rows[0]], generate, settings)


def _judge_file(tiny, path: Path) -> Path:
    hidden = tiny.model.config.hidden_size
    generator = torch.Generator().manual_seed(0)
    head = HeadParams([1], ["mean"], torch.randn(hidden, generator=generator), torch.zeros(hidden),
                      torch.ones(hidden), 0.01)  # fmt: skip
    save_judge(path, HeadJudge(tiny.model, tiny.tokenizer, head, [1]), data_set="toy", fingerprint=tiny.fingerprint,
               report={})  # fmt: skip
    return path


def test_rahf_eval_generation_end_to_end(tiny, tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "dev.jsonl"
    rows = [{"prompt": f"Question {i}?", "chosen": "Yes, surely.", "rejected": "No."} for i in range(6)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p, q = _profile(tiny, "p", 1, default=2.0), _profile(tiny, "q", 2)
    files = [p.save(tmp_path / "p.safetensors"), q.save(tmp_path / "q.safetensors")]
    judge = _judge_file(tiny, tmp_path / "toy-head.safetensors")
    out = tmp_path / "report"
    argv = ["eval", *map(str, files), "--data", str(data), "--out", str(out), "--model", str(tiny_model_dir),
            "--max-pairs", "2", "--strengths", "1", "--gen-prompts", "0", "--bf16", "off", "--generation",
            "--judge", str(judge), "--gen-tokens", "5", "--gen-limit", "4", "--gen-compose"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())["generation_eval"]
    assert report["prompts"] == 4 and report["half_a"] + report["half_b"] == 4
    assert sorted(report["rows"]) == ["p", "p+q", "q"]  # report.json sorts its keys
    assert list(report["rows"]["p"]["strengths"]) == ["1", "2"]  # the grid and the file's default
    assert list(report["rows"]["p+q"]["strengths"]) == ["1"]
    prompts = [(({"role": "user", "content": f"Question {i}?"}),) for i in range(4)]
    want = gm.generate_replies(tiny.model, tiny.tokenizer, prompts, p, 2.0, max_new_tokens=5)
    assert report["rows"]["p"]["strengths"]["2"]["examples"] == want[:3]
    for entry in report["rows"]["p"]["strengths"].values():
        assert entry["all"]["win"]["n"] == 4 and entry["half_b"]["n"] == report["half_b"]
    text = (out / "report.md").read_text()
    assert "## Generations judged" in text and "judge `toy-head.safetensors`" in text
    assert (out / "generation.png").stat().st_size > 1000
    capsys.readouterr()
    # no judge for the data: one line, before the model loads or anything is written
    missing = tmp_path / "report2"
    argv = ["eval", str(files[0]), "--data", str(data), "--out", str(missing), "--model", str(tiny_model_dir),
            "--generation", "--judges", str(tmp_path / "no-judges")]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rahf eval: error: ") and "no judge kept" in err[-1] and not missing.exists()
