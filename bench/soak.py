"""Soak: N minutes of mixed load on `rahf serve` over loopback, then the accounts.

Starts the server (the tiny random test model by default, or the embedded default model with `--model
default`) with a profile directory and API/admin keys, and runs `--concurrency` clients that loop over a
weighted mix until the time is up:

- chat and completions, streaming and not, unsteered, steered with one profile, with several at once, by
  model alias; n > 1, logprobs and top_logprobs, stop strings, echo scoring (max_tokens 0);
- clients that disconnect in the middle of a stream, and in the middle of a non-streaming request;
- profile uploads, replacements and deletes (admin key) of a few churned names, and requests steered by
  those names (404 when a delete won the race);
- now and then an oversized body (413), a malformed one (400: invalid JSON, unknown field, bad type), an
  unknown profile (404), a missing key (401).

Every scenario has the statuses it may get; anything else is unexpected. At the end it prints requests
by scenario and outcome, p50/p99 latency per minute, the server's resident memory at start, after
warm-up and at the end with the slope after warm-up (least squares over samples every 5 s), and the
engine slots in use once the load has stopped, and the CPU time the server got under load (on a machine
shared with other work the latencies stretch; a client that waits `--timeout` seconds, 300 by default,
for the next bytes of an answer counts a client error). Exit status 1 on an unexpected status, a client
error, a slot still in use, a memory slope of `--max-slope` MB/min or more, a server error in its log, or a
server that died. Loopback only; the server is started here and stopped (SIGTERM) at the end.

    python bench/soak.py --minutes 10                     # tiny model, concurrency 32
    python bench/soak.py --minutes 10 --model default     # the embedded SmolLM2-135M
    python bench/soak.py --minutes 1 --report soak.json   # a short run, figures as JSON too
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.server.procs import ServeProcess, tiny_model  # noqa: E402

USER, ADMIN = "soak-user", "soak-admin"
CHURN = ("churn-a", "churn-b", "churn-c")
PROMPTS = ["Write a short poem about the sea.", "Explain what a CPU cache is.", "Give three tips for sleep.",
           "Why is the sky blue?", "Describe a cat to a child.", "How do I boil an egg?",
           "What does a compiler do?", "Tell me about octopuses.", "How do plants make food?"]
DISCONNECTED = "disconnected"


@dataclass
class Outcome:
    scenario: str
    status: int | str  # an HTTP status, "disconnected" (on purpose) or "client-error: ..."
    latency: float
    at: float  # seconds since the load started
    ok: bool


@dataclass
class Soak:
    url: str
    base: str
    upload: Callable[[int], bytes]
    max_body: int
    rng: random.Random
    started: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def record(self, scenario: str, status: int | str, began: float, expected: set[int | str],
               detail: str = "") -> None:
        now = time.monotonic()
        ok = status in expected
        self.outcomes.append(Outcome(scenario, status, now - began, began - self.started, ok))
        if not ok and len(self.unexpected) < 50:
            self.unexpected.append(f"{scenario}: {status} {detail[:300]}")


# -- scenarios: each sends one request (or a short exchange) and records what came back ---------------


def _headers(key: str | None = USER) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def _chat(s: Soak, **extra) -> dict:
    return {"model": s.base, "messages": [{"role": "user", "content": s.rng.choice(PROMPTS)}],
            "max_tokens": s.rng.randint(4, 48), **extra}


async def _post(s: Soak, client: httpx.AsyncClient, scenario: str, path: str, body: dict,
                expected: set[int | str]) -> None:
    began = time.monotonic()
    try:
        response = await client.post(s.url + path, json=body, headers=_headers())
        status: int | str = response.status_code
        detail = response.text if status not in expected else ""
        if status == 200:  # a 200 must carry a well-formed answer
            data = response.json()
            if not data.get("choices") or "usage" not in data:
                status, detail = "malformed-200", response.text
    except httpx.HTTPError as exc:
        status, detail = f"client-error: {type(exc).__name__}", str(exc)
    s.record(scenario, status, began, expected, detail)


async def _stream(s: Soak, client: httpx.AsyncClient, scenario: str, path: str, body: dict,
                  expected: set[int | str], leave_after: int | None = None) -> None:
    began = time.monotonic()
    status: int | str
    detail = ""
    try:
        async with client.stream("POST", s.url + path, json={**body, "stream": True}, headers=_headers()) as r:
            status = r.status_code
            if status != 200:
                detail = (await r.aread()).decode(errors="replace")
            else:
                events = 0
                last = ""
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    events += 1
                    last = line[6:]
                    if '"error"' in last[:12]:
                        status, detail = "error-event", last
                        break
                    if leave_after is not None and events >= leave_after:
                        status = DISCONNECTED  # close the stream in the middle: the server must cancel
                        break
                else:
                    if last != "[DONE]":
                        status, detail = "truncated-stream", last
    except httpx.HTTPError as exc:
        status, detail = f"client-error: {type(exc).__name__}", str(exc)
    s.record(scenario, status, began, expected, detail)


async def chat_plain(s, c):
    await _post(s, c, "chat", "/v1/chat/completions", _chat(s, temperature=0), {200})


async def chat_steered(s, c):
    steering = {"profile": s.rng.choice(["p1", "p2"]), "strength": round(s.rng.uniform(-3, 3), 2)}
    await _post(s, c, "chat steered", "/v1/chat/completions", _chat(s, steering=steering), {200})


async def chat_several(s, c):
    steering = [{"profile": "p1", "strength": 1.0}, {"profile": "p2", "strength": -0.5},
                {"profile": "p3", "position": "all"}]
    await _post(s, c, "chat several profiles", "/v1/chat/completions", _chat(s, steering=steering), {200})


async def chat_alias(s, c):
    body = _chat(s, model=f"{s.base}:p1@1.5", n=s.rng.randint(2, 3), seed=s.rng.randint(0, 1000),
                 temperature=0.9)
    await _post(s, c, "chat alias n>1", "/v1/chat/completions", body, {200})


async def chat_logprobs(s, c):
    body = _chat(s, logprobs=True, top_logprobs=s.rng.randint(0, 5), stop=["\n", "."],
                 steering={"profile": "p3"})
    await _post(s, c, "chat logprobs+stop", "/v1/chat/completions", body, {200})


async def chat_stream(s, c):
    steering = s.rng.choice([None, {"profile": "p1"}, [{"profile": "p1"}, {"profile": "p2", "strength": 2}]])
    body = _chat(s, steering=steering, stream_options={"include_usage": True}, stop=["!"])
    await _stream(s, c, "chat stream", "/v1/chat/completions", body, {200})


async def chat_stream_leave(s, c):
    body = _chat(s, max_tokens=64, steering={"profile": "p2"})
    await _stream(s, c, "chat stream, client leaves", "/v1/chat/completions", body, {DISCONNECTED, 200},
                  leave_after=s.rng.randint(1, 4))


async def chat_request_leave(s, c):
    body = _chat(s, max_tokens=64, n=2)
    began = time.monotonic()
    try:
        await asyncio.wait_for(c.post(s.url + "/v1/chat/completions", json=body, headers=_headers()),
                               timeout=s.rng.uniform(0.01, 0.3))
        status: int | str = 200
    except asyncio.TimeoutError:  # the client gives up mid-request and closes its connection
        status = DISCONNECTED
    except httpx.HTTPError as exc:
        status = f"client-error: {type(exc).__name__}"
    s.record("chat, client leaves mid-request", status, began, {DISCONNECTED, 200})


async def completion_score(s, c):
    body = {"model": s.base, "prompt": [s.rng.choice(PROMPTS), s.rng.choice(PROMPTS)], "max_tokens": 0,
            "echo": True, "logprobs": 2, "steering": {"profile": "p1"}}
    await _post(s, c, "completions echo scoring", "/v1/completions", body, {200})


async def completion_stream(s, c):
    body = {"model": s.base, "prompt": s.rng.choice(PROMPTS), "max_tokens": s.rng.randint(4, 32), "n": 2,
            "logprobs": 1, "stream_options": {"include_usage": True}}
    await _stream(s, c, "completions stream", "/v1/completions", body, {200})


async def churned_steering(s, c):
    body = _chat(s, steering={"profile": s.rng.choice(CHURN)})
    await _post(s, c, "chat steered by a churned profile", "/v1/chat/completions", body, {200, 404})


async def _status(s: Soak, scenario: str, send: Callable[[], Awaitable[httpx.Response]],
                  expected: set[int | str]) -> None:
    """Time `send()` (building the request included) and record its status."""
    began = time.monotonic()
    try:
        status: int | str = (await send()).status_code
    except httpx.HTTPError as exc:
        status = f"client-error: {type(exc).__name__}"
    s.record(scenario, status, began, expected)


async def profile_put(s, c):
    name = s.rng.choice(CHURN)

    def send() -> Awaitable[httpx.Response]:
        if s.rng.random() < 0.5:
            return c.put(f"{s.url}/v1/profiles/{name}", content=s.upload(s.rng.randint(0, 10**6)),
                         headers=_headers(ADMIN))
        files = {"file": (f"{name}.safetensors", s.upload(s.rng.randint(0, 10**6)), "application/octet-stream")}
        return c.put(f"{s.url}/v1/profiles/{name}", files=files, headers=_headers(ADMIN))

    await _status(s, "profile upload/replace", send, {200, 201})


async def profile_delete(s, c):
    await _status(s, "profile delete", lambda: c.delete(f"{s.url}/v1/profiles/{s.rng.choice(CHURN)}",
                                                        headers=_headers(ADMIN)), {200, 404})


async def profile_list(s, c):
    await _status(s, "profile list", lambda: c.get(s.url + "/v1/profiles", headers=_headers()), {200})


async def bad_request(s, c):
    kind = s.rng.choice(["oversized", "invalid json", "unknown field", "bad type", "unknown profile", "no key"])
    began = time.monotonic()
    headers = {**_headers(None if kind == "no key" else USER), "content-type": "application/json"}
    body = json.dumps(_chat(s)).encode()
    expected = {400}
    if kind == "oversized":
        body = json.dumps(_chat(s, user="x" * (s.max_body + 10))).encode()
        expected = {413}
    elif kind == "invalid json":
        body = body[: len(body) // 2]
    elif kind == "unknown field":
        body = json.dumps(_chat(s, tools=[{"type": "function"}], surprise=1)).encode()
    elif kind == "bad type":
        body = json.dumps(_chat(s, n="2")).encode()
    elif kind == "unknown profile":
        body = json.dumps(_chat(s, steering={"profile": "nobody-here"})).encode()
        expected = {404}
    elif kind == "no key":
        expected = {401}
    try:
        response = await c.post(s.url + "/v1/chat/completions", content=body, headers=headers)
        status: int | str = response.status_code
        detail = response.text
        if isinstance(status, int) and status >= 400 and set(response.json().get("error", {})) != {
                "message", "type", "param", "code"}:
            status = "not-an-envelope"
    except httpx.HTTPError as exc:
        status, detail = f"client-error: {type(exc).__name__}", str(exc)
    s.record(f"bad request: {kind}", status, began, expected, detail)


MIX: list[tuple[Callable[[Soak, httpx.AsyncClient], Awaitable[None]], int]] = [
    (chat_plain, 10), (chat_steered, 12), (chat_several, 6), (chat_alias, 5), (chat_logprobs, 5),
    (chat_stream, 12), (chat_stream_leave, 6), (chat_request_leave, 4), (completion_score, 4),
    (completion_stream, 5), (churned_steering, 4), (profile_put, 3), (profile_delete, 2), (profile_list, 2),
    (bad_request, 4),
]


async def client_loop(s: Soak, deadline: float, seed: int, timeout_s: float) -> None:
    s_local = Soak(s.url, s.base, s.upload, s.max_body, random.Random(seed), s.started, s.outcomes, s.unexpected)
    scenarios, weights = zip(*MIX, strict=True)
    timeout = httpx.Timeout(timeout_s, connect=10)
    async with httpx.AsyncClient(timeout=timeout) as client:
        while time.monotonic() < deadline:
            scenario = s_local.rng.choices(scenarios, weights)[0]
            await scenario(s_local, client)


# -- memory and slots -----------------------------------------------------------------------------------


async def sample_memory(pid: int, samples: list[tuple[float, float]], loads: list[float], started: float,
                        stop: asyncio.Event, every: float = 5.0) -> None:
    process = psutil.Process(pid)
    while not stop.is_set():
        samples.append((time.monotonic() - started, process.memory_info().rss / 2**20))
        loads.append(os.getloadavg()[0])
        try:
            await asyncio.wait_for(stop.wait(), timeout=every)
        except asyncio.TimeoutError:
            pass


def slope_mb_per_min(samples: list[tuple[float, float]]) -> float:
    if len(samples) < 3:
        return float("nan")
    xs = [t / 60 for t, _ in samples]
    ys = [m for _, m in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


def server_latency(url: str) -> dict[str, dict[str, float]]:
    """p50/p99 (bucket upper bounds) of the server's own request latency histogram, per route: the time
    the server took, without the client's side."""
    buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("rahf_request_latency_seconds_bucket{"):
            labels, value = line.rsplit(" ", 1)
            route = labels.split('route="', 1)[1].split('"', 1)[0]
            bound = labels.split('le="', 1)[1].split('"', 1)[0]
            buckets[route].append((float(bound), float(value)))
    result = {}
    for route, rows in buckets.items():
        rows.sort()
        total = rows[-1][1]
        if not total or not route.startswith("/v1/"):
            continue
        result[route] = {f"p{int(q * 100)}_s_at_most": next(b for b, c in rows if c >= q * total) for q in (0.5, 0.99)}
        result[route]["requests"] = int(total)
    return result


def engine_stats(url: str) -> dict[str, int]:
    return httpx.get(url + "/readyz", timeout=30).json()["engine"]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -- the run ------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path | None, Path, Callable[[int], bytes]]:
    import torch

    from steering_vectors.core.models import load_model
    from steering_vectors.core.profile import Profile

    if args.model == "tiny":
        model_dir: Path | None = tiny_model(work / "model")
        fingerprint = load_model(model_dir).fingerprint
    else:
        model_dir = None
        fingerprint = load_model().fingerprint
    layers = [1, 2] if args.model == "tiny" else [8, 12, 16]
    profiles = work / "profiles"
    profiles.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    hidden = fingerprint.hidden_size
    for name, mode in (("p1", "all"), ("p2", "all"), ("p3", "generated")):
        offsets = {layer: torch.randn(hidden, generator=generator) for layer in layers}
        Profile(name=name, offsets=offsets, fingerprint=fingerprint, position_mode=mode).save(
            profiles / f"{name}.safetensors")
    uploads = []
    for i in range(4):
        offsets = {layer: torch.randn(hidden, generator=generator) for layer in layers[: 1 + i % len(layers)]}
        uploads.append(Profile(name=f"upload{i}", offsets=offsets, fingerprint=fingerprint,
                               default_strength=0.5 + i / 4).to_bytes())
    return model_dir, profiles, lambda k: uploads[k % len(uploads)]


async def run_load(args, server: ServeProcess, upload: Callable[[int], bytes], report: dict) -> None:
    base = httpx.get(server.url + "/v1/models", headers=_headers(), timeout=30).json()["data"][0]["id"]
    soak = Soak(server.url, base, upload, args.max_body, random.Random(args.seed))
    samples: list[tuple[float, float]] = []
    loads: list[float] = []
    stop = asyncio.Event()
    process = psutil.Process(server.pid)
    cpu_before = sum(process.cpu_times()[:2])
    soak.started = time.monotonic()
    sampler = asyncio.create_task(sample_memory(server.pid, samples, loads, soak.started, stop))
    deadline = soak.started + args.minutes * 60
    clients = [asyncio.create_task(client_loop(soak, deadline, args.seed * 1000 + i, args.timeout))
               for i in range(args.concurrency)]
    progress = asyncio.create_task(_progress(soak, deadline))
    await asyncio.gather(*clients)
    progress.cancel()
    load_s = time.monotonic() - soak.started
    server_cpu_s = sum(process.cpu_times()[:2]) - cpu_before
    settle_until = time.monotonic() + 30
    stats = engine_stats(server.url)
    while (stats["running"] or stats["waiting"]) and time.monotonic() < settle_until:
        await asyncio.sleep(0.5)
        stats = engine_stats(server.url)
    stop.set()
    await sampler
    report.update(summarise(args, soak, samples, stats, load_s))
    # how much of the machine the server had: a shared machine stretches the latencies, not the criteria
    report["load_s"] = round(load_s, 1)
    report["server_cpu_s"] = round(server_cpu_s, 1)
    report["server_cpu_share_of_one_core"] = round(server_cpu_s / load_s, 3)
    report["machine"] = {"cores": os.cpu_count(), "mean_load_average_1min": round(statistics.fmean(loads), 2)}
    if args.outcomes:
        args.outcomes.write_text("\n".join(json.dumps(o.__dict__) for o in soak.outcomes) + "\n")
    report["server_latency"] = server_latency(server.url)


async def _progress(soak: Soak, deadline: float) -> None:
    while time.monotonic() < deadline:
        await asyncio.sleep(60)
        done = len(soak.outcomes)
        print(f"soak: {(time.monotonic() - soak.started) / 60:.0f} min, {done} requests, "
              f"{len(soak.unexpected)} unexpected", flush=True)


def summarise(args, soak: Soak, samples, stats, load_s: float) -> dict:
    by_scenario: dict[str, Counter] = defaultdict(Counter)
    for o in soak.outcomes:
        by_scenario[o.scenario][str(o.status)] += 1
    minutes = max(1, math.ceil(args.minutes))
    latency = []
    for m in range(minutes):  # by the minute each request started in
        window = [o.latency for o in soak.outcomes if o.status == 200 and m * 60 <= o.at < (m + 1) * 60]
        latency.append({"minute": m + 1, "requests": len(window), "p50_s": round(percentile(window, 0.5), 3),
                        "p99_s": round(percentile(window, 0.99), 3)})
    per_scenario = {}
    for scenario in sorted(by_scenario):
        done = [o.latency for o in soak.outcomes if o.scenario == scenario and o.status in (200, 201)]
        if done:
            per_scenario[scenario] = {"p50_s": round(percentile(done, 0.5), 3),
                                      "p99_s": round(percentile(done, 0.99), 3)}
    warm = args.warmup * 60
    after = [(t, m) for t, m in samples if t >= warm]
    at_warm = min(samples, key=lambda s: abs(s[0] - warm))[1] if samples else float("nan")
    return {
        "model": args.model,
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "requests": len(soak.outcomes),
        "unexpected": len([o for o in soak.outcomes if not o.ok]),
        "unexpected_examples": soak.unexpected[:10],
        "outcomes": {k: dict(v) for k, v in sorted(by_scenario.items())},
        "latency_per_minute": latency,
        "latency_per_scenario": per_scenario,
        "rss_mb": {"start": round(samples[0][1], 1) if samples else None, "after_warmup": round(at_warm, 1),
                   "end": round(samples[-1][1], 1) if samples else None,
                   "peak": round(max(m for _, m in samples), 1) if samples else None},
        "rss_slope_mb_per_min_after_warmup": round(slope_mb_per_min(after), 3),
        "engine_at_end": stats,
        "slots_in_use_at_end": stats["running"] + stats["waiting"],
    }


def print_report(report: dict) -> None:
    print(f"\nsoak: {report['minutes']} min, {report['model']} model, concurrency {report['concurrency']}: "
          f"{report['requests']} requests, {report['unexpected']} unexpected")
    width = max(len(k) for k in report["outcomes"])
    for scenario, counts in report["outcomes"].items():
        print(f"  {scenario:<{width}}  " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    print("  latency of 200s per minute (p50 / p99 s):")
    for row in report["latency_per_minute"]:
        print(f"    min {row['minute']:>2}: {row['requests']:>5} requests  {row['p50_s']:.3f} / {row['p99_s']:.3f}")
    print("  latency of 200/201s per scenario (p50 / p99 s):")
    for scenario, row in report["latency_per_scenario"].items():
        print(f"    {scenario:<{width}}  {row['p50_s']:.3f} / {row['p99_s']:.3f}")
    print("  the server's own latency per route (p50 / p99 histogram bucket, s):")
    for route, row in report["server_latency"].items():
        print(f"    {route:<28} {row['p50_s_at_most']:g} / {row['p99_s_at_most']:g} ({row['requests']} requests)")
    rss = report["rss_mb"]
    print(f"  resident memory MB: start {rss['start']}, after warm-up {rss['after_warmup']}, end {rss['end']}, "
          f"peak {rss['peak']}; slope after warm-up {report['rss_slope_mb_per_min_after_warmup']} MB/min")
    print(f"  engine at the end: {report['engine_at_end']} -> slots in use {report['slots_in_use_at_end']}")
    print(f"  the server's CPU time under load: {report['server_cpu_s']} s in {report['load_s']} s "
          f"({report['server_cpu_share_of_one_core']:.1%} of one core); mean 1-minute load average "
          f"{report['machine']['mean_load_average_1min']} on {report['machine']['cores']} cores")
    for line in report["unexpected_examples"]:
        print("  unexpected:", line)
    print(f"  server errors logged: {report['server_errors']}, server exit: {report['server_exit']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2, help="minutes before the memory slope is measured")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--model", choices=["tiny", "default"], default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-slope", type=float, default=1.0, help="MB/min of resident memory that fails")
    parser.add_argument("--max-body", type=int, default=65536, help="the server's --max-body-bytes")
    parser.add_argument("--nice", type=int, default=0, help="run the server under nice -n N")
    parser.add_argument("--report", type=Path, help="write the figures as JSON here too")
    parser.add_argument("--outcomes", type=Path, help="write every request's outcome as JSON lines here")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds a client waits for the next bytes of an answer before it counts a "
                             "client error (raise it on a machine shared with other work)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rahf-soak-"))
    model_dir, profiles, upload = prepare(args, work)
    keys = work / "keys.txt"
    keys.write_text(f"{USER}\nadmin:{ADMIN}\n")
    flags = ["--profile-dir", str(profiles), "--keys-file", str(keys), "--max-queue", "256",
             "--max-tokens-limit", "64", "--max-body-bytes", str(args.max_body), "--shutdown-timeout", "30"]
    server = ServeProcess(model_dir, work / "serve.log", *flags, nice=args.nice)
    server.start(timeout=600)
    report: dict = {}
    try:
        asyncio.run(run_load(args, server, upload, report))
    finally:
        code = server.stop(signal.SIGTERM, timeout=60)
    errors = [r for r in server.log_records() if r.get("level") in ("error", "critical")]
    report["server_errors"] = len(errors)
    report["server_error_examples"] = [r.get("msg", "") for r in errors[:5]]
    report["server_exit"] = code
    print_report(report)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    failed = []
    if report["unexpected"]:
        failed.append(f"{report['unexpected']} unexpected outcomes")
    if report["slots_in_use_at_end"]:
        failed.append(f"{report['slots_in_use_at_end']} engine slots still in use")
    slope = report["rss_slope_mb_per_min_after_warmup"]
    if not (slope < args.max_slope):  # NaN (too short a run) fails too
        failed.append(f"memory slope {slope} MB/min")
    if errors:
        failed.append(f"{len(errors)} server errors logged")
    if code not in (0, -signal.SIGTERM):
        failed.append(f"server exit {code}")
    print("soak:", "FAILED: " + "; ".join(failed) if failed else "passed")
    if not os.environ.get("RAHF_SOAK_KEEP"):
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
