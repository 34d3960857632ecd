"""Steering on the vLLM backend, side by side in one run: decode throughput of the same vLLM engine unsteered,
with one profile for every request, a different profile and strength per request, and two profiles per request,
at several concurrency levels; the same scenarios on the transformers backend; and plain vLLM's own OpenAI
server against `rahf serve --backend vllm` over HTTP on the same model.

The engine runs are in-process (`Engine.generate` of each backend, fixed-length greedy replies: no stop token,
so every scenario decodes the same number of tokens); each backend runs in a child process of its own, one
after the other, and rounds alternate the scenarios so drift hits them alike. The HTTP runs send non-streaming
chat completions with `ignore_eos` to each server in turn. Ratios are the point; the CPU is named in the
report, since absolute figures differ between machines of one kind.

    python bench/vllm_steering.py                              # everything: ~15 min on 2 cores
    python bench/vllm_steering.py --concurrency 1,8 --tokens 32 --rounds 1 --no-http
    python bench/vllm_steering.py --out docs/bench-vllm.json   # also write the results

Needs the vLLM environment (scripts/setup-vllm.sh): run it with .cache/venv-vllm/bin/python.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "Write a short poem about the sea.", "Explain what a CPU cache is.", "Give three tips for sleeping well.",
    "Why is the sky blue?", "Describe a cat to a child.", "How do I boil an egg?", "Summarise the plot of Hamlet.",
    "What is the capital of France and why is it famous?", "List four uses of a paperclip.",
    "What does a compiler do?", "Tell me a fun fact about octopuses.", "How do plants make food?",
    "Explain recursion with an example.", "What should I pack for a weekend hike?", "Why do we have seasons?",
    "Give me a recipe for pancakes.",
]
SCENARIOS = ("unsteered", "one profile", "per-request profile+strength", "two profiles per request")
STRENGTHS = (0.5, 1.0, 1.5, 2.0, 0.75, 1.25)


def cpu_name() -> str:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("unknown CPU", platform.processor()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = "avx512_bf16+vnni" if {"avx512_bf16", "avx512_vnni"} <= flags else ("avx2" if "avx2" in flags else "?")
    return f"{model} ({isa}, {len(os.sched_getaffinity(0))} cores)"


def gpu_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except Exception:  # noqa: BLE001 - no torch CUDA
        pass
    return "none"


# -- in-process engine runs (child) -----------------------------------------------------------------------


def load_profiles(fingerprint, check_digest: bool = True):
    """The shipped profiles (and baselines) that fit the model; for a model none fits (a random-weight model of
    another shape on a GPU host), 12 seeded random profiles of its shape, named random-N."""
    import torch

    from steering_vectors.core.profile import Profile

    files = [*sorted((ROOT / "profiles").glob("*.safetensors")),
             *sorted((ROOT / "profiles" / "baselines").glob("*.safetensors"))]
    profiles = []
    for path in files:
        profile = Profile.load(path)
        try:
            profiles.append(profile.validate_for(fingerprint, check_digest=check_digest))
        except Exception:  # noqa: BLE001 - made for another model: not used
            continue
    if not profiles:
        g = torch.Generator().manual_seed(0)
        hidden, layers = fingerprint.hidden_size, fingerprint.num_layers
        for i in range(12):
            chosen = sorted(torch.randperm(layers, generator=g)[: max(1, layers // 5)].tolist())
            profiles.append(Profile(name=f"random-{i}", fingerprint=fingerprint, offsets={
                layer: torch.randn(hidden, generator=g) for layer in chosen}))
    return profiles


def steering_for(scenario: str, index: int, profiles, fingerprint):
    from steering_vectors.core.hooks import RowSteering

    first = next((p for p in profiles if p.name == "helpful"), profiles[0])
    if scenario == "unsteered":
        return None
    if scenario == "one profile":
        return RowSteering.from_profiles([(first, 1.0)], model=fingerprint)
    a = profiles[index % len(profiles)]
    strength = STRENGTHS[index % len(STRENGTHS)]
    if scenario == "per-request profile+strength":
        return RowSteering.from_profiles([(a, strength)], model=fingerprint, position_mode="all")
    b = profiles[(index + 1) % len(profiles)]
    return RowSteering.from_profiles([(a, strength), (b, 0.5)], model=fingerprint, position_mode="all")


async def _one(engine, request) -> int:
    count = 0
    async for event in engine.generate(request):
        count += len(event.token_ids)
    return count


def measure(engine, prompts, steerings, tokens: int) -> float:
    """Decode tokens/s of len(prompts) requests submitted together, each `tokens` long."""
    from server.backends.base import GenerationRequest, SamplingParams

    params = SamplingParams(max_new_tokens=tokens, temperature=0.0)
    requests = [GenerationRequest(f"r{time.monotonic_ns()}-{i}", p, params, steering=s)
                for i, (p, s) in enumerate(zip(prompts, steerings, strict=True))]

    async def main():
        started = time.perf_counter()
        counts = await asyncio.gather(*(_one(engine, r) for r in requests))
        return sum(counts) / (time.perf_counter() - started)

    return asyncio.run(main())


def child(args: argparse.Namespace) -> None:
    from server.backends import create_backend
    from server.config import Settings

    concurrency = [int(c) for c in args.concurrency.split(",")]
    settings = Settings(backend=args.child, model=args.model, max_batch_size=max(concurrency), max_queue=256,
                        max_model_len=1024, vllm_max_profiles=16, dtype=args.dtype, device=args.device)
    started = time.perf_counter()
    backend = create_backend(settings)
    backend.engine.start()
    start_s = time.perf_counter() - started
    tokenizer, fingerprint = backend.tokenizer, backend.fingerprint
    profiles = load_profiles(fingerprint, check_digest=not args.no_digest_check)
    prompts = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                       tokenize=False), add_special_tokens=False)["input_ids"]
               for q in QUESTIONS]
    results: dict[str, dict[str, list[float]]] = {s: {str(c): [] for c in concurrency} for s in SCENARIOS}
    for c in concurrency:  # warm-up: every shape once, steered (loads the profile slots)
        batch = [prompts[i % len(prompts)] for i in range(c)]
        measure(backend.engine, batch, [steering_for(SCENARIOS[3], i, profiles, fingerprint) for i in range(c)], 4)
    for round_index in range(args.rounds):
        for c in concurrency:
            batch = [prompts[i % len(prompts)] for i in range(c)]
            order = SCENARIOS if round_index % 2 == 0 else tuple(reversed(SCENARIOS))
            for scenario in order:
                steerings = [steering_for(scenario, i, profiles, fingerprint) for i in range(c)]
                rate = measure(backend.engine, batch, steerings, args.tokens)
                results[scenario][str(c)].append(rate)
                print(f"[{args.child}] round {round_index} c={c} {scenario}: {rate:.1f} tok/s", file=sys.stderr)
    backend.engine.shutdown(10)
    Path(args.json_out).write_text(json.dumps({"backend": args.child, "start_s": start_s, "info": {
        k: v for k, v in backend.info.items() if isinstance(v, (str, int, float, bool))},
        "profiles": [p.name for p in profiles], "results": results}))


# -- HTTP runs (orchestrator) ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f} s")


def http_rate(base: str, model: str, c: int, tokens: int, steering=None) -> float:
    import httpx

    async def main():
        async with httpx.AsyncClient(timeout=600) as client:
            async def one(i):
                body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                        "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
                if steering is not None:
                    body["steering"] = steering(i)
                reply = await client.post(base + "/v1/chat/completions", json=body)
                reply.raise_for_status()
                return reply.json()["usage"]["completion_tokens"]

            started = time.perf_counter()
            counts = await asyncio.gather(*(one(i) for i in range(c)))
            return sum(counts) / (time.perf_counter() - started)

    return asyncio.run(main())


def http_runs(args: argparse.Namespace, model_dir: str, concurrency: list[int]) -> dict[str, dict[str, float]]:
    names = [p.stem for p in sorted((ROOT / "profiles").glob("*.safetensors"))]

    def hetero(i):
        # "condition": "ignore": the vllm backend does not evaluate conditions (the shipped harmless has one)
        return {"profile": names[i % len(names)], "strength": STRENGTHS[i % len(STRENGTHS)], "position": "all",
                "condition": "ignore"}

    cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_OMP_THREADS_BIND": cores, "VLLM_CPU_KVCACHE_SPACE": "2",
           "PYTHONPATH": str(ROOT)}
    servers = {
        # `vllm serve` reads the version of a distribution named vllm, which vllm-cpu is not: the module entry
        "plain vLLM (vllm serve)": ([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
                                     model_dir, "--dtype", args.dtype, "--enforce-eager", "--max-model-len", "1024",
                                     "--max-num-seqs",
                                     str(max(concurrency)), "--served-model-name", "m", "--seed", "0"], "/health"),
        "rahf serve --backend vllm": ([sys.executable, "-m", "steering_vectors.cli", "serve", "--backend", "vllm",
                                       "--model", model_dir, "--served-model-name", "m", "--max-model-len", "1024",
                                       "--max-batch-size", str(max(concurrency)), "--max-queue", "256",
                                       "--profile-dir", str(ROOT / "profiles"), "--read-only-profiles"], "/readyz"),
        "rahf serve (transformers)": ([sys.executable, "-m", "steering_vectors.cli", "serve", "--model", model_dir,
                                       "--served-model-name", "m", "--max-model-len", "1024", "--max-batch-size",
                                       str(max(concurrency)), "--max-queue", "256", "--profile-dir",
                                       str(ROOT / "profiles"), "--read-only-profiles"], "/readyz"),
    }
    ours = ["--dtype", args.dtype, *(["--no-digest-check"] if args.no_digest_check else [])]
    servers["rahf serve --backend vllm"][0].extend(ours)
    servers["rahf serve (transformers)"][0].extend([*ours, "--device", args.device])
    results: dict[str, dict[str, float]] = {}
    for name, (command, ready) in servers.items():
        port = free_port()
        log = tempfile.NamedTemporaryFile(prefix="bench-vllm-", suffix=".log", delete=False)
        proc = subprocess.Popen([*command, "--port", str(port), *([] if "vllm serve" in name else ["--host",
                                 "127.0.0.1"])], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(f"http://127.0.0.1:{port}{ready}", proc)
            base = f"http://127.0.0.1:{port}"
            http_rate(base, "m", 2, 4)  # warm-up
            for c in concurrency:
                results.setdefault(f"{name}, unsteered", {})[str(c)] = http_rate(base, "m", c, args.tokens)
                if "rahf" in name:
                    results.setdefault(f"{name}, per-request profile+strength", {})[str(c)] = http_rate(
                        base, "m", c, args.tokens, hetero)
                print(f"[http] {name} c={c} done", file=sys.stderr)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local model directory (default: the embedded SmolLM2)")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-http", action="store_true", help="skip the HTTP runs (plain vLLM's server)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers backend")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--reuse-engines", type=Path, default=None,
                        help="take the engine runs from this earlier report and run only the HTTP part")
    parser.add_argument("--device", default="cpu", help="the transformers backend's device (vLLM picks its own)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    parser.add_argument("--no-digest-check", action="store_true",
                        help="use the shipped profiles on other weights of their shape (a random-weight model)")
    parser.add_argument("--child", choices=["vllm", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from steering_vectors.core.models import ensure_embedded_cache

    model_dir = args.model or str(ensure_embedded_cache()[0])
    concurrency = [int(c) for c in args.concurrency.split(",")]
    report = {"cpu": cpu_name(), "gpu": gpu_name(), "dtype": args.dtype, "model": model_dir, "tokens": args.tokens,
              "rounds": args.rounds, "engines": {}}
    if args.reuse_engines is not None:  # the engine runs of an earlier report (its HTTP runs are redone)
        report["engines"] = json.loads(args.reuse_engines.read_text())["engines"]
    for kind in [] if args.reuse_engines else ["vllm"] + ([] if args.no_transformers else ["transformers"]):
        out = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
        subprocess.run([sys.executable, __file__, "--child", kind, "--json-out", out, "--model", model_dir,
                        "--concurrency", args.concurrency, "--tokens", str(args.tokens), "--rounds",
                        str(args.rounds), "--device", args.device, "--dtype", args.dtype,
                        *(["--no-digest-check"] if args.no_digest_check else [])],
                       check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        report["engines"][kind] = json.loads(Path(out).read_text())
        if args.out:  # kept as it goes: a later failure loses nothing measured
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    if not args.no_http:
        report["http"] = http_runs(args, model_dir, concurrency)
    print_report(report, concurrency)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


def print_report(report: dict, concurrency: list[int]) -> None:
    print(f"\nCPU: {report['cpu']}; GPU: {report['gpu']}; model {Path(report['model']).name}; "
          f"{report['tokens']} new tokens per request, greedy, {report.get('dtype', 'float32')}; "
          f"median of {report['rounds']} round(s)\n")
    head = "| engine, scenario | " + " | ".join(f"c={c}" for c in concurrency) + " |"
    print(head + "\n|" + "---|" * (len(concurrency) + 1))
    base = report["engines"]["vllm"]["results"]["unsteered"]
    for kind, engine in report["engines"].items():
        for scenario, rates in engine["results"].items():
            cells = []
            for c in concurrency:
                rate = statistics.median(rates[str(c)])
                ratio = rate / statistics.median(base[str(c)])
                cells.append(f"{rate:.1f} ({ratio:.2f}x)")
            print(f"| {kind}: {scenario} | " + " | ".join(cells) + " |")
    for name, rates in report.get("http", {}).items():
        plain = report["http"].get("plain vLLM (vllm serve), unsteered", {})
        cells = [f"{rates[str(c)]:.1f} ({rates[str(c)] / plain[str(c)]:.2f}x)" if plain else f"{rates[str(c)]:.1f}"
                 for c in concurrency]
        print(f"| HTTP {name} | " + " | ".join(cells) + " |")
    print("\nengine rows: ratio to the vLLM engine unsteered; HTTP rows: ratio to plain vLLM's server unsteered")


if __name__ == "__main__":
    main()
