"""`rahf serve` as a child process on loopback, over the tiny test model: for fault tests, the fuzzer and
the soak (bench/fuzz.py, bench/soak.py), which need a real process to signal, kill or measure."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_model(path: Path, *, context: int | None = None) -> Path:
    """The tiny random Llama of the test suite saved at `path`; `context` raises its position limit (the
    engine holds min(context, 2048) tokens per row), so that a fuzzer's longer texts fit."""
    from tests.conftest import save_tiny_model_dir

    save_tiny_model_dir(path)
    if context is not None:
        config = json.loads((path / "config.json").read_text())
        config["max_position_embeddings"] = context
        (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def write_profiles(model_dir: Path, directory: Path, names: dict[str, dict]) -> Path:
    """Profiles with random offsets at layers 1 and 2 for the model in `model_dir`: name -> Profile kwargs."""
    import torch

    from steering_vectors.core.models import load_model
    from steering_vectors.core.profile import Profile

    fingerprint = load_model(model_dir).fingerprint
    directory.mkdir(parents=True, exist_ok=True)
    for seed, (name, kwargs) in enumerate(sorted(names.items()), start=1):
        generator = torch.Generator().manual_seed(seed)
        offsets = {layer: torch.randn(fingerprint.hidden_size, generator=generator) * 4 for layer in (1, 2)}
        Profile(name=name, offsets=offsets, fingerprint=fingerprint, **kwargs).save(directory / f"{name}.safetensors")
    return directory


class ServeProcess:
    """`rahf serve --model MODEL_DIR ...` (None: the embedded default model) in a child process; `start()`
    waits until /readyz answers 200."""

    def __init__(self, model_dir: Path | None, log: Path, *args: str, env: dict[str, str] | None = None,
                 nice: int = 0, port: int | None = None, preexec_fn=None) -> None:
        self.preexec_fn = preexec_fn  # run in the child before exec (e.g. resource limits)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "steering_vectors.cli", "serve", "--host", "127.0.0.1",
                   "--port", str(self.port), *(["--model", str(model_dir)] if model_dir else []), *args]
        if nice:
            command = ["nice", "-n", str(nice), *command]
        self.command = command
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> ServeProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         preexec_fn=self.preexec_fn)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rahf serve exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop(signal.SIGKILL)
        raise RuntimeError(f"rahf serve was not ready after {timeout:.0f}s:\n{self.log_text()[-3000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def send(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        """Signal the process (if it still runs) and wait for it; SIGKILL after `timeout`."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_records(self) -> list[dict]:
        """The JSON log lines written so far."""
        records = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return records

    def __enter__(self) -> ServeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
