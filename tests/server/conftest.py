"""Fixtures for the server tests: the tiny model loaded once, its profiles, and live servers on loopback."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from server.app import create_app
from server.config import Settings
from steering_vectors.core.models import LoadedModel, load_model
from steering_vectors.core.profile import Profile


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir: Path) -> LoadedModel:
    return load_model(tiny_model_dir)


def make_profile(loaded: LoadedModel, name: str, seed: int, scale: float = 4.0, **kwargs: object) -> Profile:
    generator = torch.Generator().manual_seed(seed)
    hidden = loaded.fingerprint.hidden_size
    offsets = {layer: torch.randn(hidden, generator=generator) * scale for layer in (1, 2)}
    return Profile(name=name, offsets=offsets, fingerprint=loaded.fingerprint, **kwargs)


@dataclass
class Live:
    url: str  # base URL, e.g. http://127.0.0.1:PORT
    app: object
    server: uvicorn.Server
    profile_dir: Path | None

    @property
    def v1(self) -> str:
        return self.url + "/v1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(loaded: LoadedModel, settings: Settings, *, backend_factory=None) -> Iterator[Live]:
    """Run the app under uvicorn in a thread on a free loopback port until the block ends."""
    port = _free_port()
    app = create_app(settings, model=loaded, backend_factory=backend_factory)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}{settings.root_path}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("the server did not become ready")
        time.sleep(0.05)
    try:
        yield Live(url=url, app=app, server=server, profile_dir=settings.profile_dir)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def tiny_profiles(tiny_loaded: LoadedModel) -> dict[str, Profile]:
    return {
        "alpha": make_profile(tiny_loaded, "alpha", seed=1),
        "beta": make_profile(tiny_loaded, "beta", seed=2, default_strength=0.5),
        "late": make_profile(tiny_loaded, "late", seed=3, position_mode="generated"),
    }


@pytest.fixture(scope="module")
def server(tiny_loaded: LoadedModel, tiny_profiles: dict[str, Profile], tmp_path_factory) -> Iterator[Live]:
    """A live server over the tiny model with profiles alpha, beta and late in its directory."""
    directory = tmp_path_factory.mktemp("profiles")
    for profile in tiny_profiles.values():
        profile.save(directory / f"{profile.name}.safetensors")
    (directory / "broken.safetensors").write_bytes(b"not a profile")
    settings = Settings(profile_dir=directory, max_batch_size=4, strength_min=-10, strength_max=10,
                        default_max_tokens=16)
    with live_server(tiny_loaded, settings) as live:
        yield live
