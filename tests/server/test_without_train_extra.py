"""The server serves without the `train` extra (pyproject.toml): in a process where peft and matplotlib
cannot be imported, the app starts over a local model, answers a chat completion, fits a profile
through `POST /v1/profiles/{name}/fit` and steers with it. The serving image installs no more than this."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
BLOCKED = ("peft", "matplotlib")
for name in BLOCKED:  # None in sys.modules: `import name` fails and find_spec says absent, as when not installed
    sys.modules[name] = None
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import httpx
from server.config import Settings
from steering_vectors.core.models import load_model
from tests.conftest import save_tiny_model_dir
from tests.server.conftest import live_server

work = Path(sys.argv[2])
model = load_model(save_tiny_model_dir(work / "model"))
(work / "profiles").mkdir()
out = {}
with live_server(model, Settings(profile_dir=work / "profiles", default_max_tokens=4)) as live:
    served = httpx.get(live.v1 + "/models", timeout=10).json()["data"][0]["id"]
    ask = {"model": served, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    out["chat"] = httpx.post(live.v1 + "/chat/completions", json=ask, timeout=60).status_code
    pairs = {"examples": [{"positive": "a good day", "negative": "a bad day"}, {"positive": "yes", "negative": "no"}],
             "method": "caa", "layers": [1, 2]}
    fitted = httpx.post(live.v1 + "/profiles/glad/fit", json=pairs, timeout=60)
    out["fit"] = [fitted.status_code, fitted.json().get("method")]
    steered = httpx.post(live.v1 + "/chat/completions", json={**ask, "steering": {"profile": "glad"}}, timeout=60)
    out["steered"] = [steered.status_code, steered.headers.get("x-steering", "")]
out["imported"] = sorted(name for name in BLOCKED if sys.modules.get(name) is not None)
print(json.dumps(out))
"""


def test_the_server_serves_and_fits_without_the_train_extra(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(ROOT), str(tmp_path)], capture_output=True, text=True, timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["chat"] == 200
    assert out["fit"] == [201, "quickfit/caa"]
    assert out["steered"][0] == 200 and out["steered"][1].startswith("glad=1;position=all;digest=sha256:")
    assert out["imported"] == []
