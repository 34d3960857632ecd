"""`rahf train` / `rahf eval` / `rahf serve` refuse bad input with one line on stderr, not a traceback,
and before any model is loaded or any training step runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steering_vectors.cli import main
from steering_vectors.core.profile import Profile


@pytest.fixture
def good_data(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"  # 20 prompts: 4 of them fall into the default held-out 10 %
    rows = [{"prompt": f"Hi {i}", "chosen": "Hello.", "rejected": "Go away."} for i in range(20)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse rejects a flag with exit status 2
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip().splitlines()[-1] if err.strip() else ""


def train(data: Path, out: Path, *extra: str, model: Path | None = None) -> list[str]:
    argv = ["train", "--data", str(data), "--name", "tiny", "--out", str(out), *extra]
    return argv + (["--model", str(model)] if model else [])


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--max-pairs", "0"), "argument --max-pairs: expected an integer >= 1, got 0"),
        (("--pref-steps", "-3"), "argument --pref-steps: expected an integer >= 1, got -3"),
        (("--strengths", "1,nan"), "argument --strengths: expected comma-separated finite numbers, got '1,nan'"),
        (("--strengths", ","), "argument --strengths: expected comma-separated finite numbers, got ','"),
        (("--layers", "2,-1"), "argument --layers: expected comma-separated layer indices >= 0, got '2,-1'"),
        (("--layers", "a,b"), "argument --layers: expected comma-separated layer indices >= 0, got 'a,b'"),
        (("--strengths", "1,x"), "argument --strengths: expected comma-separated finite numbers, got '1,x'"),
        (("--name", "../up"), "argument --name: invalid profile name '../up'"),
        (("--gen-repetition-penalty", "0"),
         "argument --gen-repetition-penalty: expected a repetition penalty from 0.01 to 100 (1: off), got '0'"),
        (("--gen-tokens", "0"), "argument --gen-tokens: expected an integer >= 1, got 0"),
    ],
)
def test_bad_flags_are_refused_by_the_parser(good_data, tmp_path, capsys, extra, message) -> None:
    code, last = run(train(good_data, tmp_path / "out", *extra), capsys)
    assert code == 2
    assert last.startswith("rahf train: error: " + message)


def test_malformed_data_is_one_line_before_the_model_loads(tmp_path, capsys) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello."}) + "\n")
    # the model directory does not exist either: the data is read first, the model checked first of all
    code, last = run(train(data, tmp_path / "out", model=tmp_path / "no-model"), capsys)
    assert code == 2 and last.startswith("rahf train: error: ") and "no config.json" in last
    code, last = run(train(data, tmp_path / "out"), capsys)
    assert (code, last) == (2, f"rahf train: error: {data}:1: missing field 'rejected'")
    code, last = run(train(tmp_path / "missing.jsonl", tmp_path / "out"), capsys)
    assert code == 2 and "no such preference file" in last
    assert not (tmp_path / "out").exists()


def test_layers_beyond_the_model_are_refused_before_training(good_data, tiny_model_dir, tmp_path, capsys) -> None:
    work = tmp_path / "work"
    argv = train(good_data, tmp_path / "out", "--layers", "1,7,9", "--fit", "pref", "--work-dir", str(work),
                 model=tiny_model_dir)  # fmt: skip
    code, last = run(argv, capsys)
    assert code == 2
    assert last == "rahf train: error: --layers [7, 9]: the model has 4 decoder layers (0..3)"
    assert not list(work.glob("*/fit.ckpt")) and not (tmp_path / "out").exists()


def test_train_on_a_device_this_torch_lacks_is_one_line(good_data, tiny_model_dir, tmp_path, capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal cannot be shown here")
    code, last = run(train(good_data, tmp_path / "out", "--device", "cuda", model=tiny_model_dir), capsys)
    assert code == 2 and last.startswith("rahf train: error: ") and "cuda" in last.lower()
    assert not (tmp_path / "out").exists()


def test_bf16_auto_follows_the_hardware(monkeypatch) -> None:
    import steering_vectors.training.pipeline as pipeline

    monkeypatch.setattr(pipeline, "cpu_has_bf16_units", lambda: True)
    assert pipeline.resolve_bf16("auto") and not pipeline.resolve_bf16("off")
    monkeypatch.setattr(pipeline, "cpu_has_bf16_units", lambda: False)
    assert not pipeline.resolve_bf16("auto") and pipeline.resolve_bf16("on")
    with pytest.raises(ValueError, match="auto, on or off"):
        pipeline.resolve_bf16("maybe")


def test_too_few_prompts_to_hold_out_calibration_pairs_is_one_line(tmp_path, capsys) -> None:
    data = tmp_path / "one.jsonl"
    # "Hello": not one of the generation judge's prompts, which the pipeline sets aside before this split
    data.write_text(json.dumps({"prompt": "Hello", "chosen": "Hello.", "rejected": "Go away."}) + "\n")
    code, last = run(train(data, tmp_path / "out", model=tmp_path / "no-model"), capsys)
    assert code == 2 and "no config.json" in last  # the model directory is checked first of all
    code, last = run(train(data, tmp_path / "out"), capsys)
    assert code == 2 and last == (
        f"rahf train: error: {data}: 1 pairs split into 1 for training and 0 held out for calibration "
        "(--held-out 0.1); both need at least one: change --held-out or add pairs"
    )
    code, last = run(train(data, tmp_path / "out", "--held-out", "1.5"), capsys)
    assert code == 2 and last.startswith("rahf train: error: argument --held-out: expected a fraction")


def test_eval_refuses_unreadable_profiles_and_data(good_data, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    code, last = run(["eval", str(tmp_path / "none.safetensors"), "--data", str(good_data), "--out", str(out)], capsys)
    assert code == 2 and last.startswith("rahf eval: error: cannot read profile file")
    not_a_profile = tmp_path / "x.safetensors"
    not_a_profile.write_bytes(b"\x01\x02")
    code, last = run(["eval", str(not_a_profile), "--data", str(good_data), "--out", str(out)], capsys)
    assert code == 2 and last.startswith(f"rahf eval: error: {not_a_profile}")
    assert not out.exists()


def test_serve_refuses_a_missing_model_directory_or_device(tmp_path, capsys) -> None:
    code, last = run(["serve", "--model", str(tmp_path / "nothing"), "--plain-logs"], capsys)
    assert code == 2 and last.startswith("rahf serve: error: ") and "no config.json" in last
    code, last = run(["serve", "--device", "tpu", "--plain-logs"], capsys)
    assert (code, last) == (2, "rahf serve: error: unknown device 'tpu'; use cpu, cuda, cuda:N, mps or xpu")


def test_profiles_command_still_reads_good_files(capsys) -> None:
    # the error handling wraps every command; a good run is unchanged
    path = Path(__file__).resolve().parents[2] / "profiles" / "harmless.safetensors"
    assert main(["profiles", "show", str(path)]) == 0
    assert Profile.load(path).name in capsys.readouterr().out


def test_profiles_copy_changes_only_what_it_is_asked_and_says_so(tmp_path, capsys) -> None:
    import hashlib

    import torch

    path = Path(__file__).resolve().parents[2] / "profiles" / "helpful.safetensors"
    source = Profile.load(path)
    assert source.generation is not None  # the shipped file carries its generation result
    out = tmp_path / "helpful-prompt.safetensors"
    assert main(["profiles", "copy", str(path), str(out), "--position", "prompt", "--strength", "2"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"wrote {out} (name helpful -> helpful-prompt, position_mode all -> prompt, default_strength 0.5 -> 2.0)")
    copy = Profile.load(out)
    assert (copy.name, copy.position_mode, copy.default_strength) == ("helpful-prompt", "prompt", 2.0)
    assert copy.tensor_digest() == source.tensor_digest() and copy.method == source.method
    assert all(torch.equal(copy.offsets[k], source.offsets[k]) for k in source.offsets)
    assert copy.generation is None  # measured in the source's position mode: not carried over
    assert copy.provenance["copied_from"] == {
        "file": "helpful.safetensors", "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "changes": {"name": ["helpful", "helpful-prompt"], "position_mode": ["all", "prompt"],
                    "default_strength": [0.5, 2.0]}}  # fmt: skip
    # a plain copy keeps the generation result; a bad mode is refused by the parser
    same = tmp_path / "helpful.safetensors"
    assert main(["profiles", "copy", str(path), str(same)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {same}"
    assert Profile.load(same).generation == source.generation
    with pytest.raises(SystemExit):
        main(["profiles", "copy", str(path), str(same), "--position", "middle"])
    assert main(["profiles", "copy", str(tmp_path / "missing.safetensors"), str(same)]) == 1


def test_profiles_copy_sets_and_removes_decoding_defaults(tmp_path, capsys) -> None:
    path = Path(__file__).resolve().parents[2] / "profiles" / "helpful-pref.safetensors"
    source = Profile.load(path)
    assert source.decoding == {} and source.generation is not None
    out = tmp_path / "helpful-pref.safetensors"
    assert main(["profiles", "copy", str(path), str(out), "--decoding", "repetition_penalty=1.15"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out} (decoding {{}} -> {{'repetition_penalty': 1.15}})"
    copy = Profile.load(out)
    assert copy.decoding == {"repetition_penalty": 1.15} and copy.format_version == 5
    assert copy.generation is None  # measured with the source's decoding: not carried over
    assert copy.tensor_digest() == source.tensor_digest()
    back = tmp_path / "back" / "helpful-pref.safetensors"
    assert main(["profiles", "copy", str(out), str(back), "--decoding", "repetition_penalty=none"]) == 0
    assert Profile.load(back).decoding == {}
    capsys.readouterr()
    for bad, error in (("repetition_penalty", "expected FIELD=VALUE"), ("repetition_penalty=high", "not a number"),
                       ("temperature=0.7", "not one of"), ("repetition_penalty=0.5", r"in [1, 10]")):
        assert main(["profiles", "copy", str(path), str(tmp_path / "bad.safetensors"), "--decoding", bad]) == 1
        assert error in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


def test_a_reader_that_leaves_early_ends_the_command_quietly() -> None:
    """`rahf profiles show FILE | head`: when the pipe is closed, no traceback, and the status of a process
    killed by SIGPIPE (141). The reader here has left before the command writes, so the write always fails."""
    import os
    import subprocess
    import sys

    path = Path(__file__).resolve().parents[2] / "profiles" / "harmless.safetensors"
    script = (f"import sys; sys.argv = ['rahf', 'profiles', 'show', {str(path)!r}]; "
              "from steering_vectors.cli import main; sys.exit(main())")  # fmt: skip
    reader, writer = os.pipe()
    os.close(reader)
    process = subprocess.run([sys.executable, "-c", script], stdout=writer, stderr=subprocess.PIPE, timeout=120)
    os.close(writer)
    assert (process.returncode, process.stderr.decode()) == (141, "")
