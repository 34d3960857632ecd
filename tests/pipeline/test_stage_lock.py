"""Stage folders are computed by one process at a time: `pipeline.stage_lock` (an exclusive flock on
`<folder>/.lock`) makes a second computation of the same stage wait for the first, then resume from what it
left, instead of writing the same checkpoints at once."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

fcntl = pytest.importorskip("fcntl")  # POSIX only; elsewhere the lock is a no-op

from steering_vectors.training.pipeline import fit_stage, read_json, stage_lock  # noqa: E402


def test_a_second_holder_waits_until_the_first_lets_go(tmp_path: Path) -> None:
    entered = threading.Event()

    def second() -> None:
        with stage_lock(tmp_path):
            entered.set()

    with stage_lock(tmp_path):
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.5)  # held here: the other one waits
    assert entered.wait(10)  # let go: it gets in
    thread.join(10)


def test_a_fit_stage_started_while_another_computes_it_waits_then_resumes(tmp_path: Path) -> None:
    calls: list[float] = []

    def fit(checkpoint: Path):
        calls.append(time.monotonic())
        done = checkpoint.is_file()  # the first computation's result, if it left one
        checkpoint.write_text("done")
        return {0: torch.zeros(2)}, {}, [2.0, 1.0] if not done else [1.0]

    holder_released: list[float] = []
    with stage_lock(tmp_path):
        thread = threading.Thread(target=lambda: fit_stage(tmp_path, fit))
        thread.start()
        time.sleep(0.5)
        assert calls == []  # not run while the stage is held
        (tmp_path / "fit.ckpt").write_text("done")  # what the holder leaves behind
        holder_released.append(time.monotonic())
    thread.join(10)
    assert len(calls) == 1 and calls[0] >= holder_released[0]
    assert read_json(tmp_path / "fit.json")["loss_first_last"] == [1.0, 1.0]  # it resumed from the result


def test_a_killed_holder_frees_the_stage(tmp_path: Path) -> None:
    script = (
        "import sys, time; from pathlib import Path; from steering_vectors.training.pipeline import stage_lock\n"
        f"with stage_lock(Path({str(tmp_path)!r})):\n    print('held', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert holder.stdout.readline().strip() == b"held"
    with open(tmp_path / ".lock", "a+") as handle, pytest.raises(BlockingIOError):
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by the other process
    holder.kill()
    holder.wait(10)
    started = time.monotonic()
    with stage_lock(tmp_path):
        assert time.monotonic() - started < 5


def test_a_resumed_stage_records_the_time_of_every_run_that_worked_on_it(tmp_path: Path) -> None:
    """A stage killed part-way and resumed records the time of both runs, not only the last one's: the
    clock's running total is kept in `elapsed.json` while the stage is held, so it survives a kill."""
    script = (
        "import time; from pathlib import Path; from steering_vectors.training.pipeline import stage_clock\n"
        f"with stage_clock(Path({str(tmp_path)!r}), every=0.05):\n    print('held', flush=True); time.sleep(60)\n"
    )
    first = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert first.stdout.readline().strip() == b"held"
    time.sleep(1.0)
    first.kill()  # no chance to write on the way out
    first.wait(10)
    kept = read_json(tmp_path / "elapsed.json")["seconds"]
    assert 0.8 <= kept < 30

    def fit(checkpoint: Path):
        time.sleep(0.3)
        return {0: torch.zeros(2)}, {}, [1.0]

    fit_stage(tmp_path, fit)
    record = read_json(tmp_path / "fit.json")
    assert kept + 0.3 <= record["seconds"] < kept + 30
    assert read_json(tmp_path / "elapsed.json")["seconds"] >= record["seconds"]
    fit_stage(tmp_path, fit)  # a finished stage keeps the time it recorded
    assert read_json(tmp_path / "fit.json")["seconds"] == record["seconds"]
