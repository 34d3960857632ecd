"""Serving benchmark: this server (unsteered, one profile, a profile per request; packed weights,
float weights, and without the lean decode step) against `transformers serve` (continuous batching)
and llama-cpp-python's server, on loopback, in one run.

Knows how to start each server as a subprocess, stream OpenAI chat completions from it, and measure
tokens/s, time to first token and errors at several concurrency levels. Knows nothing about the
engine's internals. Every configuration gets the same prompts, max_tokens and greedy decoding; the
ratios between configurations are the point (absolute numbers on a shared machine are noisy).

    python bench/serving.py                       # everything, fp32, concurrency 1, 8 and 32
    python bench/serving.py --only this --concurrency 8 --max-tokens 32
    python bench/serving.py --one-at-a-time        # each server alone (needs less memory, drifts more)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
LLAMACPP_PYTHON = Path("/tmp/llamacpp-venv/bin/python")
PROFILE_LAYERS = (8, 12, 16)

QUESTIONS = [
    "Write a short poem about the sea.",
    "Explain what a CPU cache is.",
    "Give three tips for sleeping well.",
    "Why is the sky blue?",
    "Describe a cat to a child.",
    "How do I boil an egg?",
    "Summarise the plot of Hamlet.",
    "What is the capital of France and why is it famous?",
    "List four uses of a paperclip.",
    "What does a compiler do?",
    "Tell me a fun fact about octopuses.",
    "How do plants make food?",
    "Explain recursion with an example.",
    "What should I pack for a weekend hike?",
    "Why do we have seasons?",
    "Give me a recipe for pancakes.",
]


@dataclass
class Target:
    """One configuration: a running server plus what each request adds (model name, steering)."""

    name: str
    url: str
    model: str
    steering: str = "none"  # none | one | different


@dataclass
class RunResult:
    target: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50: float | None
    ttft_p99: float | None
    errors: int
    error_samples: list[str] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    rounds: int = 1


def summarise(
    target: str,
    concurrency: int,
    requests: int,
    tokens: int,
    seconds: float,
    ttfts: list[float],
    errors: int,
    error_samples: list[str],
    rounds: int = 1,
) -> RunResult:
    """Throughput and TTFT percentiles of `requests` requests (over `rounds` rounds) of one target."""
    return RunResult(
        target=target,
        concurrency=concurrency,
        requests=requests,
        tokens=tokens,
        seconds=round(seconds, 3),
        tokens_per_s=round(tokens / seconds, 2) if seconds > 0 else 0.0,
        ttft_p50=round(statistics.median(ttfts), 3) if ttfts else None,
        ttft_p99=round(percentile(ttfts, 0.99), 3) if ttfts else None,
        errors=errors,
        error_samples=error_samples[:3],
        ttfts=ttfts,
        rounds=rounds,
    )


def merge(parts: list[RunResult]) -> RunResult:
    """One result from rounds of the same target and level: totals over all of them."""
    return summarise(
        parts[0].target,
        parts[0].concurrency,
        sum(p.requests for p in parts),
        sum(p.tokens for p in parts),
        sum(p.seconds for p in parts),
        [t for p in parts for t in p.ttfts],
        sum(p.errors for p in parts),
        [e for p in parts for e in p.error_samples],
        rounds=len(parts),
    )


# -- one streamed request ---------------------------------------------------------------------------


def request_body(target: Target, index: int, max_tokens: int) -> dict:
    body: dict = {
        "model": target.model,
        "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }
    if target.steering == "one":
        body["steering"] = {"profile": "bench0", "strength": 1.0}
    elif target.steering == "different":
        body["steering"] = {"profile": f"bench{index % 8}", "strength": 0.5 + 0.125 * (index % 7)}
    return body


async def stream_one(client: httpx.AsyncClient, target: Target, index: int, max_tokens: int) -> tuple[int, float]:
    """Send one streaming chat completion; returns (completion tokens, seconds to first token)."""
    started = time.perf_counter()
    first: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    body = request_body(target, index, max_tokens)
    async with client.stream("POST", f"{target.url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")[:200]
            raise RuntimeError(f"HTTP {response.status_code}: {text}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            payload = json.loads(data)
            if "error" in payload:
                raise RuntimeError(f"stream error: {payload['error']}")
            if payload.get("usage"):
                usage_tokens = payload["usage"].get("completion_tokens")
            for choice in payload.get("choices", []):
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter() - started
    if first is None:
        raise RuntimeError("no content streamed")
    return (usage_tokens if usage_tokens else chunks), first


async def run_level(target: Target, concurrency: int, requests: int, max_tokens: int, timeout: float) -> RunResult:
    """`requests` requests, at most `concurrency` in flight."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    gate = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    errors: list[str] = []
    tokens = 0

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def worker(index: int) -> None:
            nonlocal tokens
            async with gate:
                try:
                    count, ttft = await stream_one(client, target, index, max_tokens)
                    tokens += count
                    ttfts.append(ttft)
                except Exception as error:  # noqa: BLE001 - every failure is a counted error
                    errors.append(f"{type(error).__name__}: {error}"[:200])

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(requests)))
        seconds = time.perf_counter() - started
    rounded = [round(t, 4) for t in ttfts]
    return summarise(target.name, concurrency, requests, tokens, seconds, rounded, len(errors), errors)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# -- servers -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server subprocess (own process group), its log file and its readiness URL."""

    def __init__(self, name: str, command: list[str], ready_url: str, log_dir: Path, env: dict | None = None):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.ready_url = ready_url
        self.log = self.log_path.open("w")
        environment = {**os.environ, **(env or {})}
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, env=environment, start_new_session=True
        )

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                response = httpx.get(self.ready_url, timeout=2)
                if response.status_code == 200:
                    body = response.json()
                    if isinstance(body, dict) and "quantize" in body:  # this server: say how it decodes
                        print(f"{self.name}: backend={body.get('backend')} device={body.get('device')} "
                              f"dtype={body.get('dtype')} quantize={body['quantize']} "
                              f"fast_decode={body.get('fast_decode')}")
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; see {self.log_path}")

    def rss_mb(self) -> float:
        """Resident memory of the server and its children, MB."""
        try:
            import psutil

            root = psutil.Process(self.process.pid)
            return round(sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 1e6, 1)
        except Exception:  # noqa: BLE001 - memory is informative only
            return float("nan")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def write_profiles(directory: Path, hidden: int, count: int = 8) -> None:
    """`count` random profiles (bench0..) of a modest norm on a few middle layers."""
    import torch

    from steering_vectors.core.profile import Profile

    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        offsets = {layer: torch.randn(hidden, generator=generator) * 0.05 for layer in PROFILE_LAYERS}
        Profile(name=f"bench{i}", offsets=offsets, description="benchmark profile").save(
            directory / f"bench{i}.safetensors"
        )


def threads(args: argparse.Namespace) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(args.torch_threads)} if args.torch_threads else {}


def start_this(
    args: argparse.Namespace, work: Path, quantize: str, name: str = "this", extra: tuple[str, ...] = ()
) -> Server:
    profiles = work / f"profiles-{name}"
    profiles.mkdir()
    write_profiles(profiles, hidden=576)
    port = free_port()
    rahf = shutil.which("rahf") or str(Path(sys.executable).with_name("rahf"))
    command = [
        rahf, "serve", "--backend", args.backend, "--dtype", args.dtype, "--port", str(port),
        "--profile-dir", str(profiles), "--max-batch-size", str(max(args.concurrency)),
        "--max-queue", "256", "--max-tokens-limit", str(max(args.max_tokens, 256)), "--log-level", "warning",
        "--quantize", quantize, "--packed-max-rows", str(args.packed_max_rows), *extra,
    ]  # fmt: skip
    server = Server(
        name, command, f"http://127.0.0.1:{port}/readyz", work, {"RAHF_LOG_JSON": "false", **threads(args)}
    )
    server.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return server


def start_transformers(args: argparse.Namespace, work: Path, model_dir: Path) -> Server:
    port = free_port()
    command = [
        shutil.which("transformers") or str(Path(sys.executable).with_name("transformers")),
        "serve", str(model_dir), "--continuous-batching",
        "--device", "cpu", "--dtype", args.dtype, "--host", "127.0.0.1", "--port", str(port),
        "--log-level", "warning",
    ]  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1", **threads(args)}
    server = Server("transformers-serve", command, f"http://127.0.0.1:{port}/v1/models", work, env)
    server.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return server


def start_llamacpp(args: argparse.Namespace, work: Path, gguf: Path) -> Server | None:
    python = Path(args.llamacpp_python)
    if not python.exists() or subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True).returncode:
        print(
            f"SKIP llama.cpp: no llama-cpp-python[server] at {python}; build it with\n"
            "  python -m venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install 'llama-cpp-python[server]'"
        )
        return None
    port = free_port()
    command = [
        str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(args.threads),
        "--n_ctx", "4096", "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    server = Server("llama.cpp", command, f"http://127.0.0.1:{port}/v1/models", work)
    server.url = f"http://127.0.0.1:{port}"  # type: ignore[attr-defined]
    return server


# -- the run ------------------------------------------------------------------------------------------


def measure(targets: list[Target], args: argparse.Namespace) -> list[RunResult]:
    """Each concurrency level in turn; at each level `--rounds` rounds of every target one after another
    (side by side), totals over the rounds."""
    results = []
    for concurrency in args.concurrency:
        requests = max(concurrency * args.waves, args.min_requests)
        level = [
            t for t in targets
            if t.steering == "none" or concurrency in (args.steered_concurrency or args.concurrency)
        ]  # fmt: skip
        rounds: dict[str, list[RunResult]] = {t.name: [] for t in level}
        for _ in range(args.rounds):
            for target in level:
                part = asyncio.run(run_level(target, concurrency, requests, args.max_tokens, args.request_timeout))
                rounds[target.name].append(part)
        for target in level:
            result = merge(rounds[target.name])
            print(
                f"{target.name:>22} c={concurrency:<3} {result.tokens_per_s:8.1f} tok/s  "
                f"TTFT p50 {fmt(result.ttft_p50)} p99 {fmt(result.ttft_p99)}  errors {result.errors}"
                f"  ({result.tokens} tokens / {result.seconds:.1f} s"
                + (f", per round {[p.tokens_per_s for p in rounds[target.name]]})" if args.rounds > 1 else ")"),
                flush=True,
            )
            results.append(result)
    return results


def fmt(value: float | None) -> str:
    return "   n/a" if value is None else f"{value:6.2f}s"


def prepare(server: Server, targets: list[Target], args: argparse.Namespace, memory: dict) -> bool:
    """Wait until `server` is ready, name its targets' model, warm it up, note its RSS; False if it failed."""
    try:
        server.wait_ready(args.start_timeout)
        for target in targets:
            target.model = target.model or served_name(target.url) or "default"
        asyncio.run(run_level(targets[0], 1, 1, 8, args.request_timeout))  # warm-up
    except Exception as error:  # noqa: BLE001 - one server failing must not lose the others' numbers
        print(f"FAILED {server.name}: {error}", flush=True)
        server.stop()
        return False
    memory[server.name] = {"rss_mb_before": server.rss_mb()}
    return True


def finish(server: Server, memory: dict) -> None:
    if server.name in memory:
        memory[server.name]["rss_mb_after"] = after = server.rss_mb()
        print(f"{server.name}: RSS {memory[server.name]['rss_mb_before']} MB before, {after} MB after", flush=True)
    server.stop()


Launch = Callable[[], "tuple[Server, list[Target]] | None"]


def run_servers(launches: list[Launch], args: argparse.Namespace, memory: dict) -> list[RunResult]:
    """Side by side (all servers up at once, every level's targets interleaved, so machine drift hits
    all of them alike) or, with --one-at-a-time, each server alone in turn."""
    results: list[RunResult] = []
    started: list[Server] = []
    try:
        if args.one_at_a_time:
            for launch in launches:
                launched = launch()
                if launched is None:
                    continue
                server, targets = launched
                started.append(server)
                if prepare(server, targets, args, memory):
                    results += measure(targets, args)
                finish(server, memory)
                started.remove(server)
            return results
        launched_all = [launched for launch in launches if (launched := launch()) is not None]
        started = [server for server, _ in launched_all]
        ready = [targets for server, targets in launched_all if prepare(server, targets, args, memory)]
        return measure([target for targets in ready for target in targets], args)
    finally:
        for server in started:
            finish(server, memory)


def ratios(results: list[RunResult]) -> dict[str, float | None]:
    def tps(name: str, c: int) -> float | None:
        found = [r.tokens_per_s for r in results if r.target == name and r.concurrency == c]
        return found[0] if found else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a is not None and b else None

    this8, this1 = tps("this", 8), tps("this", 1)
    float8, float1 = tps("this-float", 8), tps("this-float", 1)
    ttft8 = [r.ttft_p50 for r in results if r.target == "this" and r.concurrency == 8]
    errors32 = {r.target: r.errors for r in results if r.concurrency == 32}
    return {
        "steered_different/unsteered@8": ratio(tps("this-steered-different", 8), this8),
        "steered_one/unsteered@8": ratio(tps("this-steered-one", 8), this8),
        "this/transformers_serve@8": ratio(this8, tps("transformers-serve", 8)),
        "this/transformers_serve@1": ratio(this1, tps("transformers-serve", 1)),
        "this/llama_cpp@8": ratio(this8, tps("llama.cpp", 8)),
        "this/llama_cpp@1": ratio(this1, tps("llama.cpp", 1)),
        "this/this_float@8": ratio(this8, float8),
        "this/this_float@1": ratio(this1, float1),
        "this/this_no_lean@8": ratio(this8, tps("this-no-lean", 8)),
        "this/this_no_lean@1": ratio(this1, tps("this-no-lean", 1)),
        "this_float/transformers_serve@8": ratio(float8, tps("transformers-serve", 8)),
        "this_float/transformers_serve@1": ratio(float1, tps("transformers-serve", 1)),
        "this_ttft_p50@8_s": ttft8[0] if ttft8 else None,
        **{f"errors@32[{name}]": count for name, count in errors32.items()},
    }


def plot(results: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r.target for r in results))
    levels = sorted({r.concurrency for r in results})
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        rows = {r.concurrency: r for r in results if r.target == name}
        xs = [j + i * width for j in range(len(levels))]
        left.bar(xs, [rows[c].tokens_per_s if c in rows else 0 for c in levels], width, label=name)
        right.bar(xs, [(rows[c].ttft_p50 or 0) if c in rows else 0 for c in levels], width, label=name)
    for axis, title in ((left, "throughput (tokens/s)"), (right, "TTFT p50 (s)")):
        axis.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(levels))])
        axis.set_xticklabels([f"c={c}" for c in levels])
        axis.set_title(title)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--min-requests", type=int, default=4, help="requests per level at least (c=1: sequential)")
    parser.add_argument(
        "--waves", type=int, default=2, help="requests per level = concurrency x waves (steadier when replies differ)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backend", default="transformers", help="this server's backend (server/backends/)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama.cpp threads")
    parser.add_argument(
        "--steered-concurrency", type=int, nargs="+", help="levels for the steered runs (default: --concurrency)"
    )
    parser.add_argument("--torch-threads", type=int, help="OMP_NUM_THREADS for this server and transformers serve")
    parser.add_argument("--quantize", default="auto", choices=["auto", "none", "int4", "int8"],
                        help="this server's weights (the default: int4 on the embedded model)")
    parser.add_argument("--packed-max-rows", type=int, default=16)
    parser.add_argument(
        "--only", nargs="+", default=["this", "this-float", "this-no-lean", "transformers", "llamacpp"],
        help="this: this server (--quantize, with the steered runs); this-float: this server, float weights; "
        "this-no-lean: this server decoding through the transformers forward (--no-fast-decode)",
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="rounds per level, targets interleaved in each (totals reported)"
    )
    parser.add_argument(
        "--one-at-a-time", action="store_true",
        help="run each server alone in turn (default: all up at once, levels interleaved across them)",
    )
    parser.add_argument("--llamacpp-python", default=str(LLAMACPP_PYTHON))
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--request-timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from steering_vectors.core.models import embedded_gguf_path, ensure_embedded_cache

    model_dir, _ = ensure_embedded_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rahf-bench-"))
    print(f"model {model_dir}, dtype {args.dtype}, max_tokens {args.max_tokens}, concurrency {args.concurrency}; "
          f"logs under {work}", flush=True)  # fmt: skip
    memory: dict = {}
    starters: dict[str, Callable[[], Server | None]] = {
        "this": lambda: start_this(args, work, args.quantize),
        "this-float": lambda: start_this(args, work, "none", "this-float"),
        "this-no-lean": lambda: start_this(args, work, args.quantize, "this-no-lean", ("--no-fast-decode",)),
        "transformers": lambda: start_transformers(args, work, model_dir),
        "llamacpp": lambda: start_llamacpp(args, work, embedded_gguf_path()),
    }

    def launcher(key: str) -> Launch:
        def launch() -> tuple[Server, list[Target]] | None:
            server = starters[key]()
            if server is None:
                return None
            url = server.url  # type: ignore[attr-defined]
            if key == "this":
                return server, [
                    Target("this", url, ""),
                    Target("this-steered-one", url, "", "one"),
                    Target("this-steered-different", url, "", "different"),
                ]
            return server, [Target(server.name, url, str(model_dir) if key == "transformers" else "")]

        return launch

    results = run_servers([launcher(key) for key in starters if key in args.only], args, memory)

    summary = ratios(results)
    print("\nratios:")
    for key, value in summary.items():
        print(f"  {key:>36}: {value}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
        "results": [asdict(r) for r in results],
        "ratios": summary,
        "memory": memory,
    }
    json_path = args.out / f"serving-{stamp}.json"
    json_path.write_text(json.dumps(report, indent=2))
    if results:
        plot(results, args.out / f"serving-{stamp}.png")
    print(f"wrote {json_path}")
    return 0


def served_name(url: str) -> str | None:
    try:
        return httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]["id"]
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    sys.exit(main())
