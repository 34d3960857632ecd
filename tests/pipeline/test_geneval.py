"""The generation evaluation (`geneval`, `rahf eval --generation`): hand-computed scores with a stand-in judge,
replies that equal the library's generation, compositions, and the command end to end on the tiny model
(with --gen-annotate); bench/generation.py's numbers are `score_replies`', its annotations, and the shipped
profiles' generation sections hold exactly the numbers of their docs/bench-generation-*.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench import generation as bench_generation
from steering_vectors.cli import main
from steering_vectors.core.models import load_model
from steering_vectors.core.profile import Profile
from steering_vectors.training import geneval
from steering_vectors.training import genmetrics as gm
from steering_vectors.training.judge import HeadJudge, HeadParams, load_judge, save_judge
from steering_vectors.training.pipeline import file_sha256


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
    # ... and on half B alone: two ties; the empty replies lose both
    assert got["strengths"]["1"]["sampled"][0]["half_b"]["win"]["win_rate"] == 0.5
    assert got["strengths"]["2"]["sampled"][0]["half_b"]["win"]["win_rate"] == 0.0
    assert result["unsteered"]["sampled"][0]["half_b"]["n"] == 2 and result["unsteered"]["sampled"][0]["n"] == 4
    assert (result["half_a"], result["half_b"], result["judge"]) == (2, 2, "len")
    text = "\n".join(geneval.generation_lines(result))
    assert "| p | 1 (chosen) | 75.0 % [" in text and "| p | 2 | 0.0 % [0.0 %, 0.0 %] | 0.0 % |" in text
    assert "| p | 1 | 0 | 62.5 % [" in text and "| 50.0 % [50.0 %, 50.0 %] | 0.0 % |" in text
    assert json.loads(json.dumps(result))["rows"]["p"]["chosen_strength"] == 1.0  # JSON-ready as it is
    # the section a profile file carries: half B's numbers, as scored
    record = geneval.generation_record(result, "p", data_set="toy", replies="library", judge_sha256="0" * 64)
    assert (record.data_set, record.judge, record.prompts, record.half_a, record.half_b) == ("toy", "len", 4, 2, 2)
    assert record.chosen_strength == 1.0 and [r.strength for r in record.strengths] == [1.0, 2.0]
    assert [(r.win_rate, r.low, r.high) for r in record.strengths] == [
        (w["win_rate"], w["low"], w["high"]) for w in (got["strengths"][s]["half_b"]["win"] for s in ("1", "2"))]
    assert record.strengths[1].loop_rate == got["strengths"]["2"]["half_b"]["loop_rate"] == 0.0  # loops on half A only
    assert record.unsteered.perplexity == result["unsteered"]["half_b"]["perplexity"] == pytest.approx(math.e)
    with pytest.raises(ValueError, match="no row 'q'"):
        geneval.generation_record(result, "q", data_set="toy", replies="library")


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
            "--judge", str(judge), "--gen-tokens", "5", "--gen-limit", "4", "--gen-compose",
            "--gen-annotate", str(tmp_path / "judged")]  # fmt: skip
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
    # --gen-annotate: each profile again, with its row's result as its generation section, the same tensors
    for original in (p, q):
        annotated = Profile.load(tmp_path / "judged" / f"{original.name}.safetensors")
        assert annotated.generation == geneval.generation_record(
            report, original.name, data_set=tmp_path.name, replies="library",
            judge_sha256=file_sha256(judge), source=str(out / "report.json"))
        assert annotated.tensor_digest() == original.tensor_digest() and annotated.generation.prompts == 4
    capsys.readouterr()
    # --gen-annotate without --generation, or over an input file: refused before any work
    for extra in (["--gen-annotate", str(tmp_path / "x")], ["--generation", "--gen-annotate", str(tmp_path)]):
        assert main(["eval", str(files[0]), "--data", str(data), "--out", str(tmp_path / "r3"), *extra]) == 2
        assert "--gen-annotate" in capsys.readouterr().err and not (tmp_path / "r3").exists()
    # no judge for the data: one line, before the model loads or anything is written
    missing = tmp_path / "report2"
    argv = ["eval", str(files[0]), "--data", str(data), "--out", str(missing), "--model", str(tiny_model_dir),
            "--generation", "--judges", str(tmp_path / "no-judges")]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rahf eval: error: ") and "no judge kept" in err[-1] and not missing.exists()


# -- bench/generation.py: replies from the server's engine, every number the library's ----------------------


def test_the_engine_bench_reports_the_librarys_numbers_and_annotates_the_profile(tiny, tiny_model_dir,
                                                                                   tmp_path: Path) -> None:
    from server.backends.transformers import create
    from server.config import Settings

    backend = create(Settings(max_batch_size=4, max_queue=64), model=load_model(tiny_model_dir))
    p = _profile(tiny, "p", 1, default=2.0)
    prompts = [({"role": "user", "content": f"Question {i}?"},) for i in range(3)]  # halves b, a, b
    judge = _judge_file(tiny, tmp_path / "toy-head.safetensors")
    result = bench_generation.measure(backend, p, prompts, [1.0], judge, max_new_tokens=5)
    # three prompts: the examples are every reply, so the library can score them again
    at = {float(s): {"greedy": e["examples"], "sampled": []} for s, e in result["rows"]["p"]["strengths"].items()}
    assert sorted(at) == [1.0, 2.0] and at[2.0]["greedy"] != result["unsteered"]["examples"]
    replies = {"unsteered": {"greedy": result["unsteered"]["examples"], "sampled": []}, "rows": {"p": at}}
    want = geneval.score_replies(backend.model, backend.tokenizer, prompts, [geneval.GenRow.of_profile(p, [1.0])],
                                 replies, load_judge(judge, backend.model, backend.tokenizer),
                                 geneval.GenSettings(max_new_tokens=5), judge_name=judge.name)  # fmt: skip
    assert result == want

    report = {**result, "profile": "p.safetensors", "set": "toy", "replies": "engine",
              "judge_sha256": file_sha256(judge), "tensors_sha256": p.tensor_digest()}  # fmt: skip
    source = p.save(tmp_path / "p.safetensors")
    annotated = bench_generation.annotate(source, report, tmp_path / "out" / "p.safetensors", judges=tmp_path)
    assert Profile.load(tmp_path / "out" / "p.safetensors").generation == annotated.generation == (
        geneval.generation_record(result, "p", data_set="toy", replies="engine",
                                  judge_sha256=file_sha256(judge)))  # fmt: skip
    tuned = {**report, "profile_decoding": {"repetition_penalty": 1.15}, "conditions": "honoured"}
    record = bench_generation.annotate(source, tuned, tmp_path / "tuned.safetensors", judges=tmp_path).generation
    assert record is not None and (record.decoding, record.conditions) == ({"repetition_penalty": 1.15}, "honoured")
    other = _profile(tiny, "p", 2).save(tmp_path / "other" / "p.safetensors")
    with pytest.raises(SystemExit, match="other tensors"):
        bench_generation.annotate(other, report, tmp_path / "x.safetensors", judges=tmp_path)
    with pytest.raises(SystemExit, match=r"measured \['p'\], not q"):
        bench_generation.annotate(_profile(tiny, "q", 1).save(tmp_path / "q.safetensors"), report,
                                  tmp_path / "x.safetensors", judges=tmp_path)  # fmt: skip

    # --adopt-strength: the strength half A chose becomes the default, with the one it replaced on record
    for chosen, default in ((1.0, 1.0), (0.0, 2.0)):
        row = {**report["rows"]["p"], "chosen_strength": chosen}
        picked = {**report, "rows": {"p": row}}
        adopted = bench_generation.annotate(source, picked, tmp_path / "adopt.safetensors", judges=tmp_path,
                                            source="run.json", adopt=True)  # fmt: skip
        loaded = Profile.load(tmp_path / "adopt.safetensors")
        assert adopted.default_strength == loaded.default_strength == default
        assert loaded.generation is not None and loaded.generation.chosen_strength == chosen
        choice = loaded.provenance.get("default_strength_choice")
        if chosen:
            assert choice["strength"] == 1.0 and choice["replaced"] == 2.0 and choice["source"] == "run.json"
            assert "dev half A (1 prompts" in choice["how"] and all(torch.equal(loaded.offsets[k], p.offsets[k])
                                                                  for k in p.offsets)  # fmt: skip
        else:
            assert choice is None  # half A kept no steered strength: the file's default stays


def test_the_engine_bench_leaves_the_penalty_to_the_profile_and_samples_with_seeds(tiny, tiny_model_dir) -> None:
    import dataclasses

    from server.backends.transformers import create
    from server.config import Settings

    backend = create(Settings(max_batch_size=4, max_queue=64), model=load_model(tiny_model_dir))
    bare = _profile(tiny, "p", 1)
    carrying = dataclasses.replace(bare, decoding={"repetition_penalty": 1.8}, offsets=dict(bare.offsets))
    prompts = [({"role": "user", "content": f"Question {i}?"},) for i in range(3)]
    settings = geneval.GenSettings(max_new_tokens=12, samples=1)
    backend.engine.start()
    try:
        def make(penalty: float | None):
            return bench_generation.engine_generate(backend, max_new_tokens=12, repetition_penalty=penalty,
                                                    settings=settings)  # fmt: skip

        left_open, set_to_one, by_hand = make(None), make(1.0), make(1.8)
        assert left_open(prompts, [(carrying, 1.0)], None, None) == by_hand(prompts, [(bare, 1.0)], None, None)
        assert set_to_one(prompts, [(carrying, 1.0)], None, None) == set_to_one(prompts, [(bare, 1.0)], None, None)
        assert left_open(prompts, [], None, None) == set_to_one(prompts, [], None, None)  # unsteered: off
        assert by_hand(prompts, [(bare, 1.0)], None, None) != set_to_one(prompts, [(bare, 1.0)], None, None)
        # sampled replies: the same seed, the same replies; another seed, others
        sampled = [set_to_one(prompts, [], None, seed) for seed in (0, 0, 1)]
        assert sampled[0] == sampled[1] and sampled[0] != sampled[2]
    finally:
        backend.engine.shutdown(10)


SHIPPED = ("helpful-pref", "harmless-pref")  # annotated from docs/bench-generation-<name>.json, the older layout


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_profiles_carry_the_numbers_of_their_bench_files(name: str) -> None:
    root = Path(__file__).parents[2]
    old = json.loads((root / "docs" / f"bench-generation-{name}.json").read_text())  # the layout before
    record = Profile.load(root / "profiles" / f"{name}.safetensors").generation
    assert record is not None and record.source == f"docs/bench-generation-{name}.json"
    assert (record.data_set, record.judge, record.replies, record.max_new_tokens) == (
        old["set"], old["judge"], "engine", old["max_tokens"])
    assert (record.prompts, record.half_a, record.half_b) == (old["prompts"], old["half_a"], old["half_b"])
    assert record.chosen_strength == old["chosen_strength"]
    assert record.judge_sha256 == file_sha256(root / "profiles" / "judges" / old["judge"])
    base = old["strengths"]["0.0"]["half_b"]
    assert record.unsteered.to_json() == {k: base[k] for k in ("loop_rate", "refusal_rate", "perplexity")}
    assert [row.strength for row in record.strengths] == [float(s) for s in old["strengths"] if float(s) != 0]
    for row in record.strengths:
        half_b = old["strengths"][str(row.strength)]["half_b"]
        assert (row.win_rate, row.low, row.high) == tuple(half_b["win"][k] for k in ("win_rate", "low", "high"))
        assert (row.loop_rate, row.refusal_rate, row.perplexity) == tuple(
            half_b[k] for k in ("loop_rate", "refusal_rate", "perplexity"))
    # --from-json reads that layout into the same record
    again = geneval.generation_record(bench_generation.library_layout(old), name, data_set=old["set"],
                                      replies="engine", judge_sha256=record.judge_sha256, source=record.source)
    assert again == record


@pytest.mark.parametrize("name", ["helpful", "harmless"])
def test_the_shipped_profiles_with_decoding_defaults_carry_the_run_made_with_them(name: str) -> None:
    """`helpful` and `harmless` carry repetition_penalty 1.15; their generation sections are runs whose steered
    requests took it (and, for `harmless`, honoured its condition), with the same tensors."""
    root = Path(__file__).parents[2]
    profile = Profile.load(root / "profiles" / f"{name}.safetensors")
    record = profile.generation
    assert record is not None and record.source == f"docs/bench-generation-{name}-decoding.json"
    report = json.loads((root / record.source).read_text())
    assert profile.decoding == report["profile_decoding"] == record.decoding == {"repetition_penalty": 1.15}
    assert report["repetition_penalty"] is None and report["tensors_sha256"] == profile.tensor_digest()
    assert record.conditions == report["conditions"] == ("honoured" if profile.condition is not None else "ignored")
    again = geneval.generation_record(report, name, data_set=report["set"], replies="engine",
                                      judge_sha256=report["judge_sha256"], source=record.source,
                                      decoding=report["profile_decoding"], conditions=report["conditions"])  # fmt: skip
    assert again == record
