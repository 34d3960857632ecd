"""The training commands without the `train` extra (peft, matplotlib): one line that names what is missing and
the command that installs it, exit status 2, before the data is read or a model loads."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from steering_vectors.cli import TRAIN_MODULES, main, missing_train_modules


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err.strip()


def without(monkeypatch, *names: str) -> None:
    """Make `import name` fail here as it does where the package is not installed (None in sys.modules)."""
    for name in names:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)


# the data path does not exist: a command that got past the check would fail on it with another message
COMMANDS = {
    "train": ["train", "--data", "no-such-data.jsonl", "--name", "tiny", "--out", "out"],
    "compare": ["compare", "--data", "no-such-data", "--out", "out"],
    "eval": ["eval", "no-such.safetensors", "--data", "no-such-data.jsonl", "--out", "out"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("missing", [("peft",), ("matplotlib",), ("peft", "matplotlib")])
def test_a_training_command_without_the_extra_says_how_to_install_it(monkeypatch, capsys, command, missing) -> None:
    without(monkeypatch, *missing)
    code, err = run(COMMANDS[command], capsys)
    assert code == 2
    assert err == (
        f"rahf {command}: error: the training dependencies are not installed (missing: {', '.join(missing)}); "
        "install them with: pip install 'rahf-steering[train]'  (in a checkout: pip install -e '.[train]')"
    )


def test_with_the_extra_the_command_goes_on_to_its_own_work(capsys, tmp_path: Path) -> None:
    """Guards the test above: here (the test environment has the extra) the check passes and the missing
    data file is what stops `rahf train`."""
    assert missing_train_modules() == []
    data = tmp_path / "none.jsonl"
    code, err = run(["train", "--data", str(data), "--name", "tiny", "--out", str(tmp_path)], capsys)
    assert (code, err.splitlines()[-1]) == (2, f"rahf train: error: {data}: no such preference file")


def test_serving_and_profile_commands_do_not_ask_for_the_extra(monkeypatch, capsys, tmp_path: Path) -> None:
    without(monkeypatch, *TRAIN_MODULES)
    code = main(["profiles", "list", str(tmp_path)])
    captured = capsys.readouterr()
    assert (code, captured.err) == (0, "")
