"""The shipped nginx gateway config in front of two local servers, all on loopback.

Runs Debian's nginx with deploy/nginx/rahf.conf (only the replica addresses, the listen address and
the log path are changed) in front of two `rahf serve` processes that serve the tiny test model under
the path prefix /rahf. Checks the prefix, the request ids, both replicas, a steered completion, and
that a stream passes through event by event. nginx comes from scripts/ci-system-deps.sh; the tests
skip only when it cannot be installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
GATEWAY_CONF = ROOT / "deploy" / "nginx" / "rahf.conf"
PREFIX = "/rahf"
PROFILE = "gateway-test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _find_nginx() -> str | None:
    found = shutil.which("nginx")
    if found is None and os.access("/usr/sbin/nginx", os.X_OK):
        found = "/usr/sbin/nginx"
    return found


@pytest.fixture(scope="module")
def nginx_bin() -> str:
    found = _find_nginx()
    if found is None:
        subprocess.run(["bash", str(ROOT / "scripts" / "ci-system-deps.sh")], timeout=900, check=False)
        found = _find_nginx()
    if found is None:
        pytest.skip("nginx is not installed and scripts/ci-system-deps.sh could not install it (needs root and apt)")
    return found


def _wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def profile_dir(tmp_path_factory) -> Path:
    from steering_vectors import Profile
    from tests.conftest import TINY_HIDDEN

    folder = tmp_path_factory.mktemp("gateway-profiles")
    gen = torch.Generator().manual_seed(7)
    offsets = {layer: torch.randn(TINY_HIDDEN, generator=gen) * 4 for layer in (1, 2)}
    Profile(name=PROFILE, offsets=offsets, description="gateway test").save(folder / f"{PROFILE}.safetensors")
    return folder


@pytest.fixture(scope="module")
def replicas(nginx_bin, tiny_model_dir, profile_dir, tmp_path_factory):
    """Two servers of the tiny model, as `rahf serve` runs them behind the gateway."""
    logs = tmp_path_factory.mktemp("replica-logs")
    env = {**os.environ, "RAHF_ROOT_PATH": PREFIX, "RAHF_SHUTDOWN_TIMEOUT_S": "5", "HF_HUB_OFFLINE": "1"}
    procs, ports = [], []
    try:
        for i in range(2):
            port = _free_port()
            log = logs / f"replica-{i}.log"
            cmd = [
                sys.executable,
                "-m",
                "steering_vectors.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--model",
                str(tiny_model_dir),
                "--profile-dir",
                str(profile_dir),
            ]
            with log.open("wb") as out:
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
            ports.append((port, log))
        for proc, (port, log) in zip(procs, ports, strict=True):
            _wait_http(f"http://127.0.0.1:{port}/readyz", proc, 300, log)  # a busy machine starts slowly
        yield procs, [port for port, _ in ports]
    finally:
        for proc in procs:
            _stop(proc)


def gateway_config(listen: int, upstreams: list[int], folder: Path, *, tweak=None) -> Path:
    """The shipped config with loopback addresses, wrapped in a minimal main config for a private nginx."""
    text = GATEWAY_CONF.read_text()
    for i, port in enumerate(upstreams, start=1):
        text, count = re.subn(rf"\bserver rahf-{i}:8000\b", f"server 127.0.0.1:{port}", text)
        assert count == 1, f"replica rahf-{i} not found in {GATEWAY_CONF}"
    text, count = re.subn(r"^(\s*)listen 8080;", rf"\1listen 127.0.0.1:{listen};", text, flags=re.M)
    assert count == 1
    text = text.replace("/var/log/nginx/rahf-access.log", str(folder / "access.log"))
    if tweak is not None:
        text = tweak(text)
    (folder / "rahf.conf").write_text(text)
    user = "user root;\n" if os.geteuid() == 0 else ""
    main = folder / "nginx.conf"
    main.write_text(
        f"{user}daemon off;\nworker_processes 1;\npid {folder}/nginx.pid;\nerror_log {folder}/error.log info;\n"
        "events { worker_connections 128; }\n"
        "http {\n"
        + "".join(
            f"    {kind}_temp_path {folder}/{kind}_temp;\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        + f"    include {folder}/rahf.conf;\n}}\n"
    )
    return main


def start_nginx(nginx_bin: str, conf: Path) -> subprocess.Popen:
    folder = conf.parent
    check = subprocess.run(
        [nginx_bin, "-t", "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(
        [nginx_bin, "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    port = int(re.search(r"listen 127\.0\.0\.1:(\d+);", (folder / "rahf.conf").read_text()).group(1))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.1)
    raise AssertionError("nginx did not start listening")


@pytest.fixture(scope="module")
def gateway(nginx_bin, replicas, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nginx")
    port = _free_port()
    proc = start_nginx(nginx_bin, gateway_config(port, replicas[1], folder))
    yield {"url": f"http://127.0.0.1:{port}{PREFIX}", "log": folder / "access.log", "folder": folder}
    _stop(proc, signal.SIGQUIT, 10)


def _chat_body(**extra) -> dict:
    return {
        "model": "tiny-model",
        "messages": [{"role": "user", "content": "hello there"}],
        "temperature": 0,
        "max_tokens": 24,
        **extra,
    }


def _model_name(url: str) -> str:
    return httpx.get(f"{url}/readyz", timeout=10).json()["model"]


def _stream_events(
    url: str, body: dict, headers: dict | None = None
) -> tuple[httpx.Response, list[tuple[float, str]], int]:
    """(response, [(arrival time, data)], number of network reads that carried events)."""
    events: list[tuple[float, str]] = []
    reads = 0
    buffer = ""
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60) as response:
        for raw in response.iter_raw():
            now = time.perf_counter()
            text = raw.decode()
            if "data:" in text:
                reads += 1
            buffer = (buffer + text).replace("\r\n", "\n")  # sse-starlette ends lines with CRLF
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                for line in block.splitlines():
                    if line.startswith("data: "):
                        events.append((now, line[6:]))
    return response, events, reads


def _content(events: list[tuple[float, str]]) -> str:
    chunks = [json.loads(data) for _, data in events if data != "[DONE]"]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


# -- tests --------------------------------------------------------------------------------------------


def test_gateway_config_keeps_streams_unbuffered():
    """The directives streaming depends on. (Through nginx 1.22 a stream also arrives event by event with
    buffering on, because the server sends X-Accel-Buffering: no; the config must not rely on that.)"""
    text = re.sub(r"#.*", "", GATEWAY_CONF.read_text())
    location = text[text.index(f"location {PREFIX}/ {{") :]
    for directive in (
        "proxy_pass http://rahf_replicas/;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_set_header X-Request-ID $rahf_request_id;",
        "proxy_buffering off;",
        "proxy_cache off;",
        "gzip off;",
    ):
        assert directive in location, directive
    read_timeout = int(re.search(r"proxy_read_timeout (\d+)s;", location).group(1))
    assert read_timeout >= 60  # longer than the server's 15 s keep-alive comments, with room to spare
    assert "keepalive " in text and text.count("server rahf-") == 2


def test_prefix_reaches_the_replicas(gateway):
    url = gateway["url"]
    assert httpx.get(f"{url}/healthz", timeout=10).json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz", timeout=10).json()
    assert ready["status"] == "ready" and PREFIX.strip("/") not in ready["model"]
    assert PROFILE in ready["profiles"]
    bare = httpx.get(url, timeout=10)
    assert bare.status_code == 308 and bare.headers["location"].endswith(f"{PREFIX}/")
    outside = httpx.get(url.replace(PREFIX, "") + "/healthz", timeout=10)
    assert outside.status_code == 404  # only the prefix is routed
    assert "# HELP" in httpx.get(f"{url}/metrics", timeout=10).text


def test_root_path_puts_the_prefix_back(gateway):
    """The server knows it lives under /rahf: its docs page points at the prefixed OpenAPI document."""
    url = gateway["url"]
    assert httpx.get(f"{url}/openapi.json", timeout=10).status_code == 200
    docs = httpx.get(f"{url}/docs", timeout=10)
    assert docs.status_code == 200 and f"{PREFIX}/openapi.json" in docs.text


def test_request_ids_pass_through(gateway):
    url = gateway["url"]
    given = httpx.get(f"{url}/healthz", headers={"X-Request-ID": "client-id-42"}, timeout=10)
    assert given.headers["x-request-id"] == "client-id-42"
    made = httpx.get(f"{url}/healthz", timeout=10).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made), made  # made up by nginx, echoed by the replica
    time.sleep(0.2)
    log = gateway["log"].read_text()
    assert "rid=client-id-42" in log and f"rid={made}" in log


def test_both_replicas_serve(gateway, replicas):
    url = gateway["url"]
    before = gateway["log"].read_text().count("\n")
    for _ in range(6):
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    time.sleep(0.2)
    lines = gateway["log"].read_text().splitlines()[before:]
    used = {int(m.group(1)) for line in lines if (m := re.search(r"upstream=127\.0\.0\.1:(\d+)", line))}
    assert used == set(replicas[1]), lines


def test_steered_completion_through_the_gateway(gateway, replicas):
    url = gateway["url"]
    direct = f"http://127.0.0.1:{replicas[1][0]}"
    model = _model_name(direct)
    steered_body = _chat_body(model=model, steering={"profile": PROFILE, "strength": 2.0})
    through = httpx.post(f"{url}/v1/chat/completions", json=steered_body, timeout=60)
    assert through.status_code == 200, through.text
    expected = httpx.post(f"{direct}/v1/chat/completions", json=steered_body, timeout=60).json()
    plain = httpx.post(f"{url}/v1/chat/completions", json=_chat_body(model=model), timeout=60).json()
    text = through.json()["choices"][0]["message"]["content"]
    assert text == expected["choices"][0]["message"]["content"]
    assert text != plain["choices"][0]["message"]["content"]


def test_stream_passes_through_event_by_event(gateway, replicas):
    url = gateway["url"]
    direct = f"http://127.0.0.1:{replicas[1][0]}"
    body = _chat_body(model=_model_name(direct), stream=True, max_tokens=48, steering={"profile": PROFILE})
    response, events, reads = _stream_events(url, body, {"X-Request-ID": "stream-1"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-request-id"] == "stream-1"
    assert "content-length" not in response.headers
    assert events and events[-1][1] == "[DONE]"
    _, direct_events, _ = _stream_events(direct, body)
    assert _content(events) == _content(direct_events) != ""
    # Unbuffered: the events come in many separate reads, not in one burst at the end.
    assert reads >= max(3, len(events) // 4), f"{len(events)} events in {reads} reads: the gateway buffers"


def test_openai_client_streams_through_the_gateway(gateway, replicas):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{gateway['url']}/v1", api_key="unused", max_retries=0, timeout=60)
    model = _model_name(gateway["url"])
    stream = client.chat.completions.create(
        model=f"{model}:{PROFILE}",
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=16,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks and chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _steered(url: str, model: str, name: str, rid: str) -> tuple[int, str | None]:
    """(status, the digest the answer reports) of a short steered completion through `url`."""
    response = httpx.post(f"{url}/v1/chat/completions", timeout=60, headers={"X-Request-ID": rid},
                          json=_chat_body(model=f"{model}:{name}", max_tokens=1))
    if response.status_code != 200:
        return response.status_code, None
    header = response.headers["x-steering"]
    assert header.startswith(f"{name}=") and ";digest=" in header, header
    digest = header.rsplit(";digest=", 1)[1]
    assert response.json()["steering"]["profiles"][0]["digest"] == digest
    return 200, digest


def _upstreams(log: Path, prefix: str) -> set[int]:
    time.sleep(0.2)
    return {int(m.group(1)) for line in log.read_text().splitlines()
            if f"rid={prefix}" in line and (m := re.search(r"upstream=127\.0\.0\.1:(\d+)", line))}


def test_replicas_agree_on_an_uploaded_replaced_and_deleted_profile(gateway, replicas, profile_dir):
    """A profile uploaded through the gateway is served by every replica at once with one digest; after a
    replacement no request reports the old digest; after a delete every replica answers 404."""
    from concurrent.futures import ThreadPoolExecutor

    from steering_vectors import Profile
    from tests.conftest import TINY_HIDDEN

    url, name, many = gateway["url"], "rollout", 24
    model = _model_name(url)
    versions = []
    for seed in (11, 12):
        gen = torch.Generator().manual_seed(seed)
        offsets = {layer: torch.randn(TINY_HIDDEN, generator=gen) * 4 for layer in (1, 2)}
        versions.append(Profile(name=name, offsets=offsets).to_bytes())

    # upload: within 2 s, >= 20 requests through the gateway all succeed, all with the uploaded file's digest
    created = httpx.put(f"{url}/v1/profiles/{name}", content=versions[0], timeout=60)
    assert created.status_code == 201, created.text
    first = created.json()["digest"]
    assert first == _sha((profile_dir / f"{name}.safetensors").read_bytes())  # the file the replica wrote
    uploaded = time.monotonic()
    sent: list[float] = []

    def one(i: int, prefix: str) -> tuple[int, str | None]:
        sent.append(time.monotonic())
        return _steered(url, model, name, f"{prefix}-{i}")

    with ThreadPoolExecutor(many) as pool:  # all at once: every request is sent within the bound
        results = list(pool.map(lambda i: one(i, "up"), range(many)))
    # at least 20 of them left within 2 s of the upload (a starved client may start a thread late), and all
    # of them succeeded with the uploaded file's digest
    within = sum(t - uploaded < 2.0 for t in sent)
    assert within >= 20, f"only {within} requests sent within 2 s of the upload"
    assert results == [(200, first)] * many
    assert _upstreams(gateway["log"], "up-") == set(replicas[1])  # both replicas answered

    # replace, under load: every request that started after the PUT answered reports the new digest
    log: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        i = 0
        while not stop.is_set():
            started = time.monotonic()
            log.append((started, *_steered(url, model, name, f"swap-{worker}-{i}")))
            i += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    replaced = httpx.put(f"{url}/v1/profiles/{name}", content=versions[1], timeout=60)
    switched = time.monotonic()
    assert replaced.status_code == 200, replaced.text
    second = replaced.json()["digest"]
    assert second == _sha((profile_dir / f"{name}.safetensors").read_bytes()) != first
    while len([t for t, _, _ in log if t > switched]) < many:
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join()
    assert {status for _, status, _ in log} == {200}
    assert {digest for t, _, digest in log if t < switched} <= {first, second}
    after = [digest for t, _, digest in log if t > switched]
    assert len(after) >= many and set(after) == {second}, "a request after the switch reported the old digest"
    assert _upstreams(gateway["log"], "swap-") == set(replicas[1])

    # delete: every replica answers 404 within 2 s (at once for requests; the listings within the bound)
    deleted = httpx.delete(f"{url}/v1/profiles/{name}", timeout=60)
    assert deleted.status_code == 200, deleted.text
    gone = time.monotonic()
    for port in replicas[1]:
        direct = f"http://127.0.0.1:{port}"
        assert _steered(direct, model, name, "gone-direct") == (404, None)
        assert httpx.get(f"{direct}/v1/profiles/{name}", timeout=10).status_code == 404
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda i: _steered(url, model, name, f"gone-{i}"), range(many))) == [(404, None)] * many
    while any(name in httpx.get(f"http://127.0.0.1:{p}/readyz", timeout=10).json()["profiles"] for p in replicas[1]):
        assert time.monotonic() - gone < 2.0, "a replica still lists the deleted profile"
        time.sleep(0.05)
    assert _upstreams(gateway["log"], "gone-") == set(replicas[1])


def test_a_stopped_replica_is_skipped(gateway, replicas):
    """Runs last: stops one replica; the gateway sends everything to the other."""
    procs, ports = replicas
    _stop(procs[1])
    url = gateway["url"]
    for _ in range(4):
        response = httpx.get(f"{url}/readyz", timeout=10)
        assert response.status_code == 200, response.text
    model = _model_name(url)
    response = httpx.post(f"{url}/v1/chat/completions", json=_chat_body(model=model, max_tokens=4), timeout=60)
    assert response.status_code == 200, response.text
