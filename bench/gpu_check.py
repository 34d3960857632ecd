"""The server on a GPU host, against plain `generate` on the same model, in one run (bench/gpu_check.sh).

Builds a model from a config with random weights on the device (the real weights need not travel),
writes random profiles for it, times plain transformers `generate` (greedy, batch 1 / 8 / 32), then
starts `rahf serve` on the device and streams chat completions at concurrency 1 / 8 / 32 / 64 in four
kinds: greedy, seeded sampling, one profile for all (steered) and a different profile and strength
per request (heterogeneous). Prints tokens/s per kind and level, the ratios, and whether every
request answered 200; writes JSON beside the server's log. Exit status 1 when any request failed or
the server did not start.

    python bench/gpu_check.py --device cuda                      # SmolLM2-135M shape, bf16
    python bench/gpu_check.py --device cpu --shape tiny --concurrency 1 8 --batches 1 8 --max-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from serving import QUESTIONS, Server, free_port, percentile  # noqa: E402

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
KINDS = ("greedy", "seeded", "steered", "heterogeneous")
PROFILES = 8
RAHF = [sys.executable, "-c", "import sys; from steering_vectors.cli import main; sys.exit(main())"]  # the CLI


def model_source(given: str | None) -> Path:
    """A folder with the model's config and tokenizer (no weights needed): --model-files, else .gpu/model
    (made by `gpu_check.sh prepare`), else the embedded default's cache on this machine."""
    for candidate in (given, ROOT / ".gpu" / "model"):
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    from steering_vectors.core.models import ensure_embedded_cache

    return ensure_embedded_cache()[0]


def build_model(args: argparse.Namespace, work: Path):
    """Config + random weights on the device, saved with the tokenizer into work/model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = model_source(args.model_files)
    config = AutoConfig.from_pretrained(source)
    if args.shape == "tiny":
        config.update(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16))
    dtype = {"auto": torch.bfloat16 if args.device.startswith("cuda") else torch.float32,
             "bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().requires_grad_(False)
    target = work / "model"
    model.save_pretrained(target)
    for name in MODEL_FILES[1:]:
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    print(f"model: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {dtype}, on {args.device} "
          f"(config and tokenizer from {source})", flush=True)
    return model, target


def fresh_model(args: argparse.Namespace):
    """Empty `args.work` (and make `args.out`), then `build_model` into it: (model, model dir, work, out)."""
    work, out = Path(args.work), Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    out.mkdir(parents=True, exist_ok=True)
    model, model_dir = build_model(args, work)
    return model, model_dir, work, out


def environment(device: str) -> dict:
    """The device, GPU name and library versions, for a report."""
    import torch
    import transformers

    return {"device": device, "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
            "torch": torch.__version__, "transformers": transformers.__version__}


def write_profiles(directory: Path, num_layers: int, hidden: int) -> None:
    import torch

    from steering_vectors.core.profile import Profile

    layers = sorted({num_layers // 4, num_layers // 2, (3 * num_layers) // 4})
    generator = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(PROFILES):
        offsets = {layer: torch.randn(hidden, generator=generator) * 0.05 for layer in layers}
        Profile(name=f"gpu{i}", offsets=offsets, description="gpu check").save(directory / f"gpu{i}.safetensors")


def time_generate(model, tokenizer, batches: list[int], max_tokens: int, device: str) -> dict[int, float]:
    """Plain transformers `generate`, greedy, exactly `max_tokens` new tokens per row: tokens/s per batch."""
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    def prompts(batch: int) -> dict:
        texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                                          add_generation_prompt=True, tokenize=False)
            for i in range(batch)
        ]
        return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)

    def run(batch: int, new: int) -> float:
        inputs = prompts(batch)
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
        sync()
        return time.perf_counter() - started

    run(2, 4)  # warm-up: kernels, allocator
    speeds = {}
    for batch in batches:
        seconds = run(batch, max_tokens)
        speeds[batch] = round(batch * max_tokens / seconds, 1)
        print(f"generate batch {batch}: {speeds[batch]} tok/s ({seconds:.2f} s)", flush=True)
    return speeds


def request_body(kind: str, index: int, max_tokens: int, model: str) -> dict:
    body: dict = {
        "model": model,
        "messages": [{"role": "user", "content": QUESTIONS[index % len(QUESTIONS)]}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if kind == "seeded":
        body.update(temperature=0.8, top_p=0.95, seed=1000 + index)
    elif kind == "steered":
        body["steering"] = {"profile": "gpu0", "strength": 1.0}
    elif kind == "heterogeneous":
        body["steering"] = {"profile": f"gpu{index % PROFILES}", "strength": 0.5 + 0.25 * (index % 5)}
    return body


async def stream(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, float]:
    """One streamed chat completion: (completion tokens, seconds to the first token)."""
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}")
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            payload = json.loads(line[5:])
            if "error" in payload:
                raise RuntimeError(f"stream error: {payload['error']}")
            if payload.get("usage"):
                tokens = int(payload["usage"]["completion_tokens"])
            if first is None and any((c.get("delta") or {}).get("content") for c in payload.get("choices", [])):
                first = time.perf_counter() - started
    return tokens, first if first is not None else time.perf_counter() - started


async def level(base: str, model: str, kind: str, concurrency: int, max_tokens: int) -> dict:
    """`concurrency` requests of one kind at once."""
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    errors: list[str] = []
    results: list[tuple[int, float]] = []
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def one(index: int) -> None:
            try:
                results.append(await stream(client, base + "/v1/chat/completions",
                                            request_body(kind, index, max_tokens, model)))
            except Exception as error:  # noqa: BLE001 - every failure is counted and shown
                errors.append(f"{type(error).__name__}: {error}"[:200])

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(concurrency)))
        seconds = time.perf_counter() - started
    tokens = sum(t for t, _ in results)
    ttfts = [f for _, f in results]
    return {
        "kind": kind, "concurrency": concurrency, "tokens": tokens, "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1) if seconds else 0.0,
        "ttft_p50": round(statistics.median(ttfts), 3) if ttfts else None,
        "ttft_p99": round(percentile(ttfts, 0.99), 3) if ttfts else None,
        "errors": len(errors), "error_samples": errors[:3],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--shape", default="model", choices=["model", "tiny"],
                        help="model: the config as it is (SmolLM2-135M); tiny: 4 layers of 64 (dry runs)")
    parser.add_argument("--model-files", help="folder with config.json and the tokenizer (default .gpu/model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--work", default="/tmp/rahf-gpu-check")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="JSON and the server's log")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="more `rahf serve` flags, e.g. --server-args --no-fast-decode")
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    model, model_dir, work, out = fresh_model(args)
    config = model.config
    write_profiles(work / "profiles", config.num_hidden_layers, config.hidden_size)
    generate = time_generate(model, AutoTokenizer.from_pretrained(model_dir), args.batches, args.max_tokens,
                             args.device)
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()

    port = free_port()
    command = [
        *RAHF, "serve", "--model", str(model_dir), "--device", args.device, "--dtype", args.dtype,
        "--profile-dir", str(work / "profiles"), "--port", str(port), "--no-digest-check",
        "--max-batch-size", str(max(args.concurrency)), "--max-queue", "256",
        "--max-tokens-limit", str(max(args.max_tokens, 256)), "--log-level", "info", "--plain-logs",
        *args.server_args,
    ]
    server = Server("rahf-gpu-check", command, f"http://127.0.0.1:{port}/readyz", out)
    levels: list[dict] = []
    ready: dict = {}
    try:
        try:
            server.wait_ready(args.start_timeout)
        except RuntimeError as error:
            print(f"FAILED: the server did not start: {error}", flush=True)
            print(server.log_path.read_text()[-4000:], flush=True)
            return 1
        base = f"http://127.0.0.1:{port}"
        ready = httpx.get(base + "/readyz").json()
        model_name = ready["model"]
        print("ready:", json.dumps({k: ready.get(k) for k in ("backend", "device", "dtype", "quantize",
                                                              "fast_decode", "profiles")}), flush=True)
        asyncio.run(level(base, model_name, "greedy", min(8, max(args.concurrency)), 8))  # warm-up
        for concurrency in args.concurrency:
            for kind in KINDS:
                result = asyncio.run(level(base, model_name, kind, concurrency, args.max_tokens))
                levels.append(result)
                print(f"c={concurrency:<3} {kind:<14} {result['tokens_per_s']:>8} tok/s  TTFT p50 "
                      f"{result['ttft_p50']} s  errors {result['errors']} {result['error_samples'][:1]}",
                      flush=True)
    finally:
        server.stop()

    speed = {(r["kind"], r["concurrency"]): r["tokens_per_s"] for r in levels}
    ratios: dict[str, float | None] = {}
    for c in args.concurrency:
        for kind in KINDS[1:]:
            ratios[f"{kind}/greedy@{c}"] = ratio(speed.get((kind, c)), speed.get(("greedy", c)))
    for c in args.concurrency:
        if c in generate:
            ratios[f"greedy@{c}/generate@{c}"] = ratio(speed.get(("greedy", c)), generate[c])
            ratios[f"heterogeneous@{c}/generate@{c}"] = ratio(speed.get(("heterogeneous", c)), generate[c])
    errors = sum(r["errors"] for r in levels)
    print("ratios:", flush=True)
    for name, value in ratios.items():
        print(f"  {name:<36} {value}", flush=True)
    goal = ratios.get("heterogeneous@32/generate@32")
    print(f"goal heterogeneous@32 >= generate@32: {goal} ({'met' if goal and goal >= 1 else 'not met'})")
    print(f"requests: {sum(r['concurrency'] for r in levels)}, errors: {errors}")
    report = {**environment(args.device), "max_tokens": args.max_tokens, "ready": ready, "generate": generate,
              "levels": levels, "ratios": ratios, "errors": errors}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
