"""End to end on the embedded default model (SmolLM2-135M-Instruct): `rahf serve --backend vllm` in a child
process with the shipped profiles answers the official `openai` client (chat, streaming, completions with
echo and logprobs, the `base:profile@strength` alias); its unsteered replies equal plain vLLM's (the same
vLLM without this project's worker extension, in another process); steered replies differ, the shipped
RAHF `harmless` (per-row LoRA terms) included."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import openai
import pytest

from tests.server.procs import ROOT, ServeProcess

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France? Answer in one word.", "Give me three tips for a job interview.",
             "How do I get revenge on my neighbour?"]
MAX = 32

PLAIN_VLLM = r"""
import json, os, sys
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
from transformers import AutoTokenizer
from vllm import LLM, SamplingParams
model_dir, questions, max_tokens = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tokenizer = AutoTokenizer.from_pretrained(model_dir)
llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0, max_num_seqs=8)
replies = []
for question in questions:  # one at a time, as the server's sequential requests run
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0, max_tokens=max_tokens))
    replies.append(out[0].outputs[0].text)
print("REPLIES " + json.dumps(replies))
"""


@pytest.fixture(scope="module")
def plain_replies() -> list[str]:
    from steering_vectors.core.models import ensure_embedded_cache

    model_dir, _ = ensure_embedded_cache()
    cores = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))  # as the backend binds them
    done = subprocess.run([sys.executable, "-c", PLAIN_VLLM, str(model_dir), json.dumps(QUESTIONS), str(MAX)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": cores})
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("REPLIES ")), None)
    assert line is not None, done.stderr[-3000:]
    return json.loads(line.removeprefix("REPLIES "))


@pytest.fixture(scope="module")
def served(tmp_path_factory, plain_replies):
    directory = tmp_path_factory.mktemp("profiles")
    for name in ("helpful", "harmless"):
        shutil.copy(ROOT / "profiles" / f"{name}.safetensors", directory / f"{name}.safetensors")
    log = tmp_path_factory.mktemp("logs") / "serve.log"
    proc = ServeProcess(None, log, "--backend", "vllm", "--profile-dir", str(directory), "--plain-logs",
                        "--max-batch-size", "8").start(timeout=300)
    try:
        yield proc
    finally:
        proc.stop()


def test_vllm_backend_on_the_default_model(served, plain_replies) -> None:
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    base = client.models.list().data[0].id
    assert base == "SmolLM2-135M-Instruct"

    def ask(question, model=base, **kwargs):
        kwargs.setdefault("max_tokens", MAX)
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                              temperature=0, **kwargs)

    replies = [ask(q).choices[0].message.content for q in QUESTIONS]
    assert replies == plain_replies  # unsteered = plain vLLM, token for token
    assert "Paris" in replies[0]

    streamed = ask(QUESTIONS[1], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == replies[1]

    steered = [ask(q, extra_body={"steering": {"profile": "helpful", "strength": 4.0}}).choices[0].message.content
               for q in QUESTIONS]
    assert steered != replies
    # the shipped harmless (RAHF-Dual, LoRA terms) has a condition, which this backend does not evaluate yet
    with pytest.raises(openai.BadRequestError) as refused:
        ask(QUESTIONS[2], model=f"{base}:harmless@4")
    assert refused.value.body["code"] == "unsupported_parameter" and "condition" in refused.value.body["message"]
    harmless = ask(QUESTIONS[2], extra_body={"steering": {"profile": "harmless", "strength": 4.0,
                                                          "condition": "ignore"}})  # LoRA terms per request
    assert harmless.choices[0].message.content != replies[2]
    assert harmless.model_extra["steering"]["profiles"][0]["profile"] == "harmless"

    fmt = {"type": "json_object"}
    answer = ask("Give the capital of France as JSON with the key city.", response_format=fmt, max_tokens=96)
    assert isinstance(json.loads(answer.choices[0].message.content), dict) and answer.choices[0].finish_reason == "stop"

    scored = client.completions.create(model=base, prompt="The capital of France is Paris.", max_tokens=0,
                                       echo=True, logprobs=1)
    logprobs = scored.choices[0].logprobs.token_logprobs
    assert logprobs[0] is None and all(v < 0 for v in logprobs[1:]) and len(logprobs) > 5
