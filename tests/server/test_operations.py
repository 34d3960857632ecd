"""Operations: health, readiness, metrics, request ids, root path, CORS, settings from env and flags, SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from pydantic import ValidationError

from server.cli import settings_from_args
from server.config import Settings
from steering_vectors.cli import build_parser

from .conftest import _free_port, live_server, make_profile

ROOT = Path(__file__).resolve().parents[2]


def test_request_id_is_accepted_and_echoed(server) -> None:
    assert httpx.get(server.url + "/healthz", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    generated = httpx.get(server.url + "/healthz").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    unsafe = httpx.get(server.url + "/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe.headers["x-request-id"])
    error = httpx.get(server.v1 + "/profiles/nope", headers={"X-Request-ID": "err-1"})
    assert error.status_code == 404 and error.headers["x-request-id"] == "err-1"


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.split()[-1])
    raise AssertionError(f"{name} {labels} not in metrics")


def test_metrics_count_requests_tokens_latency_and_profiles(server) -> None:
    base = httpx.get(server.v1 + "/models").json()["data"][0]["id"]
    before = httpx.get(server.url + "/metrics").text
    body = {"model": f"{base}:beta@1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "temperature": 0}
    reply = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60).json()
    httpx.post(server.v1 + "/chat/completions", json={"model": base})  # 400
    text = httpx.get(server.url + "/metrics").text
    route = "/v1/chat/completions"

    def delta(name: str, **labels: str) -> float:
        try:
            old = _metric(before, name, **labels)
        except AssertionError:
            old = 0.0
        return _metric(text, name, **labels) - old

    assert delta("rahf_requests_total", route=route, method="POST", status="200") == 1
    assert delta("rahf_requests_total", route=route, method="POST", status="400") == 1
    assert delta("rahf_tokens_total", kind="completion") == reply["usage"]["completion_tokens"]
    assert delta("rahf_tokens_total", kind="prompt") == reply["usage"]["prompt_tokens"]
    assert delta("rahf_profile_requests_total", profile="beta") == 1
    assert delta("rahf_request_latency_seconds_count", route=route) == 2
    assert delta("rahf_time_to_first_token_seconds_count") == 1
    assert _metric(text, "rahf_engine_requests", state="waiting") == 0
    assert _metric(text, "rahf_engine_requests", state="running") == 0
    assert _metric(text, "rahf_profiles_loaded") == 3


def test_readyz_reports_model_profiles_and_engine(server) -> None:
    body = httpx.get(server.url + "/readyz").json()
    assert body["status"] == "ready" and body["profiles"] == ["alpha", "beta", "late"]
    assert (body["engine"]["running"], body["engine"]["waiting"]) == (0, 0)
    assert body["quantize"] == "none"  # random float weights: `auto` packs nothing
    assert body["fast_decode"] is True  # a Llama: the lean decode step passed its start-up check
    assert (body["backend"], body["device"], body["dtype"]) == ("transformers", "cpu", "float32")
    assert [Path(p).name for p in body["skipped_profiles"]] == ["broken.safetensors"]


def test_root_path_and_cors(tiny_loaded) -> None:
    settings = Settings(root_path="rahf/", cors_origins="https://ui.example")
    assert settings.root_path == "/rahf"
    with live_server(tiny_loaded, settings) as live:
        assert live.url.endswith("/rahf")
        client = openai.OpenAI(base_url=live.v1, api_key="x", max_retries=0)
        base = client.models.list().data[0].id
        reply = client.chat.completions.create(model=base, messages=[{"role": "user", "content": "a"}], max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")
        preflight = httpx.options(live.v1 + "/chat/completions", headers={
            "Origin": "https://ui.example", "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "https://ui.example"
        other = httpx.options(live.v1 + "/chat/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers


def test_cors_is_off_by_default(server) -> None:
    response = httpx.get(server.v1 + "/models", headers={"Origin": "https://ui.example"})
    assert "access-control-allow-origin" not in response.headers


def test_settings_from_environment_and_flags(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("RAHF_PORT", "9123")
    monkeypatch.setenv("RAHF_PROFILE_DIR", str(tmp_path))
    monkeypatch.setenv("RAHF_API_KEYS", "a, b")
    monkeypatch.setenv("RAHF_CORS_ORIGINS", '["https://x.example"]')
    monkeypatch.setenv("RAHF_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("RAHF_BACKEND", "transformers")
    settings = Settings()
    assert (settings.port, settings.profile_dir, settings.max_batch_size, settings.backend) == (
        9123, tmp_path, 3, "transformers")
    assert settings.dtype == "auto"  # bfloat16 on CUDA, float32 elsewhere (the backend decides)
    assert settings.keys() == (["a", "b"], [])
    assert settings.cors_origins == ["https://x.example"]
    args = build_parser().parse_args(["serve", "--port", "9000", "--max-queue", "5", "--dtype", "bfloat16",
                                      "--strength-max", "3", "--no-digest-check", "--no-fast-decode"])
    from_flags = settings_from_args(args)
    assert (from_flags.port, from_flags.max_queue, from_flags.dtype, from_flags.strength_max) == (
        9000, 5, "bfloat16", 3.0)
    assert from_flags.check_digest is False and from_flags.max_batch_size == 3  # env still applies
    assert from_flags.fast_decode is False and settings.fast_decode is True
    with pytest.raises(ValidationError):
        Settings(strength_min=2, strength_max=1)
    monkeypatch.setenv("RAHF_BACKEND", "turbo")
    with pytest.raises(ValidationError, match="unknown backend 'turbo'; available: transformers"):
        Settings()


def test_rahf_serve_runs_and_shuts_down_gracefully_on_sigterm(tiny_loaded, tiny_model_dir, tmp_path) -> None:
    make_profile(tiny_loaded, "alpha", seed=1).save(tmp_path / "alpha.safetensors")
    port = _free_port()
    env = {**os.environ, "RAHF_ADMIN_KEYS": "top-secret-admin", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "steering_vectors.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port),
         "--profile-dir", str(tmp_path), "--max-batch-size", "1", "--shutdown-timeout", "60"],
        env=env, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        else:
            pytest.fail("rahf serve did not become ready")
        base = httpx.get(url + "/v1/models").json()["data"][1]["id"]
        assert base.endswith(":alpha")
        result: dict = {}

        def long_request() -> None:
            body = {"model": base, "messages": [{"role": "user", "content": "go"}], "max_tokens": 60,
                    "temperature": 0}
            result["response"] = httpx.post(url + "/v1/chat/completions", json=body, timeout=120,
                                            headers={"X-Request-ID": "graceful-1"})

        worker = threading.Thread(target=long_request)
        worker.start()
        deadline = time.monotonic() + 30
        while httpx.get(url + "/readyz", timeout=30).json()["engine"]["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        worker.join(timeout=120)
        # uvicorn re-raises the signal once shutdown is complete, so the exit status says "SIGTERM"
        assert process.wait(timeout=120) in (0, -signal.SIGTERM)
    finally:
        if process.poll() is None:
            process.kill()
    response = result["response"]
    assert response.status_code == 200  # the in-flight request finished
    assert response.json()["usage"]["completion_tokens"] >= 1
    logs = process.stderr.read()
    assert "top-secret-admin" not in logs
    records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    access = [r for r in records if r.get("request_id") == "graceful-1"]
    assert access and access[-1]["status"] == 200 and access[-1]["path"] == "/v1/chat/completions"
    assert any(r["msg"] == "stopped" for r in records)
