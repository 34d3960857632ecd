"""The library's two halves stay apart: the project has no import circle (scripts/check_imports.py), and a
fresh interpreter that imports the runtime core, every module of it and the vLLM worker extension holds no
training module and none of the training dependencies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import check_imports  # noqa: E402

# peft, matplotlib: the `train` extra; datasets: a data loader the core must never need; transformers is
# imported by the functions that load a model, not by importing the core
NOT_IN_CORE = ("steering_vectors.training", "peft", "matplotlib", "datasets", "transformers")

SCRIPT = r"""
import importlib, json, pkgutil, sys
sys.path.insert(0, sys.argv[1])
import steering_vectors.core as core
for module in pkgutil.iter_modules(core.__path__):
    importlib.import_module(f"steering_vectors.core.{module.name}")
import steering_vectors
import server.backends.vllm.worker
print(json.dumps(sorted(sys.modules)))
"""


def test_the_project_has_no_import_circle() -> None:
    graph = check_imports.import_graph(ROOT)
    assert "steering_vectors.core.hooks" in graph and "server.serving" in graph
    assert check_imports.circles(graph) == []


def test_the_circle_check_finds_a_circle(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from .a import x\n")  # a re-export: no circle
    (package / "a.py").write_text("x = 1\n\ndef f():\n    from .b import y\n")  # lazy, still counts
    (package / "b.py").write_text("from pkg import a\ny = 2\n")
    graph = check_imports.import_graph(tmp_path, ["pkg"])
    assert check_imports.circles(graph) == [["pkg.a", "pkg.b"]]


def test_importing_the_core_loads_nothing_of_training() -> None:
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "steering_vectors.core.hooks" in loaded and "server.backends.vllm.worker" in loaded
    unwanted = [name for name in loaded if any(name == bad or name.startswith(bad + ".") for bad in NOT_IN_CORE)]
    assert unwanted == []
