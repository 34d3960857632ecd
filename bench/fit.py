"""How long `POST /v1/profiles/{name}/fit` takes, and what it does to a request streaming meanwhile.

Starts `rahf serve` (the embedded default model unless --model) with an empty profile directory, then for
each example shape: fits 16 contrastive pairs whose sides are at most 64 tokens, once alone and once while
a greedy chat stream runs. Prints per fit the wall time seen by the client, the tokens and forward passes,
the server process's CPU time meanwhile (user + system, all threads: what the fit costs whatever else the
machine runs, when no stream runs beside it), and for the stream its tokens per second before and during the
fit and its longest gap between two chunks during the fit.

    python bench/fit.py                      # the figures in docs/server.md
    python bench/fit.py --pairs 32 --shapes pairs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.server.procs import ServeProcess  # noqa: E402

GOOD = ["wonderful", "bright", "cheerful", "kind", "hopeful", "sunny", "warm", "glad", "lovely", "joyful"]
BAD = ["terrible", "dark", "gloomy", "cruel", "hopeless", "grey", "cold", "sad", "awful", "miserable"]
TOPICS = ["the weather", "my new job", "the city", "this book", "our trip", "the garden", "the weekend",
          "the neighbours", "the concert", "the old house", "my morning", "the lake", "the team", "the winter",
          "the school", "the market"]


def sentence(words: list[str], topic: str, i: int, length: int) -> str:
    """A text of roughly `length` words about `topic` in the mood of `words`."""
    out = [f"Honestly, {topic} is"]
    k = i
    while len(" ".join(out).split()) < length:
        out.append(f"{words[k % len(words)]} and {words[(k + 3) % len(words)]}, and it feels")
        k += 1
    return " ".join(out) + " today."


def body(shape: str, pairs: int, words: int) -> dict:
    topics = [TOPICS[i % len(TOPICS)] for i in range(pairs)]
    if shape == "pairs":
        return {"examples": [{"positive": sentence(GOOD, t, i, words), "negative": sentence(BAD, t, i, words)}
                             for i, t in enumerate(topics)]}
    if shape == "replies":
        return {"examples": [{"prompt": f"How is {t}?", "positive": sentence(GOOD, t, i, words // 2),
                              "negative": sentence(BAD, t, i, words // 2)} for i, t in enumerate(topics)]}
    return {"instructions": {"positive": "Answer cheerfully.", "negative": "Answer gloomily."},
            "prompts": [f"Tell me about {t}." for t in topics]}


class Stream(threading.Thread):
    """A greedy chat stream; records when each content chunk arrived."""

    def __init__(self, url: str, model: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.model, self.max_tokens = url, model, max_tokens
        self.arrivals: list[float] = []
        self.first = threading.Event()

    def run(self) -> None:
        request = {"model": self.model, "messages": [{"role": "user", "content": "Write a long story about a fox."}],
                   "max_tokens": self.max_tokens, "temperature": 0, "stream": True}
        with httpx.stream("POST", self.url + "/v1/chat/completions", json=request, timeout=600) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    self.arrivals.append(time.monotonic())
                    if len(self.arrivals) == 10:
                        self.first.set()


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process `pid` so far (all its threads), from /proc; nan when unknown."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rate(times: list[float], begin: float, end: float) -> float:
    inside = [t for t in times if begin <= t <= end]
    return len(inside) / (end - begin) if end > begin else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local model directory (default: the embedded model)")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--words", type=int, default=40, help="words per side (64 tokens at most for 40)")
    parser.add_argument("--shapes", default="pairs,replies,instructions")
    parser.add_argument("--method", default="caa")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the server (default: all)")
    parser.add_argument("--url", default=None, help="use the server running there (no admin key) instead of one")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server's process id (CPU time)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="rahf-fit-bench-"))
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    server = ServeProcess(Path(args.model) if args.model else None, work / "server.log", "--profile-dir",
                          str(work / "profiles"), env=env)
    if args.url:
        server.url = args.url.rstrip("/")
        pid = args.pid
    else:
        server.start(timeout=900)
        pid = server.pid
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    load = os.getloadavg()[0]
    print(f"cpu: {name}, {os.cpu_count()} cores; load average {load:.2f}; python {platform.python_version()}")
    try:
        model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
        print(f"model: {model}; {args.pairs} pairs of at most ~{args.words} words per side, method {args.method}")
        for shape in args.shapes.split(","):
            request = {**body(shape, args.pairs, args.words), "method": args.method}
            for streaming in (False, True):
                stream = None
                if streaming:
                    stream = Stream(server.url, model, 400)
                    stream.start()
                    stream.first.wait(120)
                    time.sleep(1.0)
                cpu_before, begin = cpu_seconds(pid), time.monotonic()
                response = httpx.post(f"{server.url}/v1/profiles/bench-{shape}/fit", json=request, timeout=600)
                end, cpu = time.monotonic(), cpu_seconds(pid) - cpu_before
                if response.status_code >= 300:
                    print(f"{shape}: {response.status_code} {response.text}")
                    return 1
                summary = response.json()
                tokens = summary["provenance"]["examples"]["tokens"]
                line = (f"{shape:12s} {'with a stream' if streaming else 'alone':13s} fit {end - begin:6.2f} s "
                        f"(server {summary['provenance']['fit_seconds']:.2f} s), {tokens} tokens "
                        f"({tokens / (2 * args.pairs):.0f} per side), "
                        f"layers {summary['layers']}, server CPU {cpu:.2f} s, load {os.getloadavg()[0]:.1f}")
                if stream is not None:
                    before = rate(stream.arrivals, begin - 1.0, begin)
                    during = rate(stream.arrivals, begin, end)
                    inside = [t for t in stream.arrivals if begin <= t <= end]
                    gap = max((b - a for a, b in zip(inside, inside[1:], strict=False)), default=float("nan"))
                    line += (f"; stream {before:.1f} tok/s before, {during:.1f} tok/s during, "
                             f"{len(inside)} chunks during, longest gap {gap * 1000:.0f} ms")
                    stream.join(600)
                print(line, flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
