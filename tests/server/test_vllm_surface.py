"""The parts of vLLM's serving surface this server offers: `/health`, `/tokenize` and `/detokenize` in vLLM's
shapes, `--max-model-len` with vLLM's `context_length_exceeded` error, and the sampling parameters `top_k`,
`min_p` and `repetition_penalty`, applied per row (exact tests on the tiny model).

(A non-streaming request whose client disconnects is cancelled and frees its engine row:
tests/server/test_faults.py::test_a_client_that_leaves_a_non_streaming_request_frees_its_rows.)
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from server.backends.base import SamplingParams
from server.backends.sampling import make_generator, sampling_probs, select_token, select_tokens
from server.config import Settings
from steering_vectors.core.models import load_model

from .conftest import live_server
from .reference import chat_ids, greedy, text_of

CONTEXT = 64
PROMPT = "Tell me about the sea"


@pytest.fixture(scope="module")
def short(tiny_loaded):
    """A server of the tiny model with a context window of CONTEXT tokens (`--max-model-len`)."""
    with live_server(tiny_loaded, Settings(max_model_len=CONTEXT, max_batch_size=4)) as live:
        live.base = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        yield live


def post(live, path: str, body: dict) -> httpx.Response:
    return httpx.post(live.url + path, json=body, timeout=60)


# -- /health, /tokenize, /detokenize ------------------------------------------------------------------


def test_health_is_the_liveness_probe(short) -> None:
    response = httpx.get(short.url + "/health")
    assert response.status_code == 200 and response.json() == httpx.get(short.url + "/healthz").json()


def test_tokenize_a_prompt_in_vllms_shape(short, tiny_loaded) -> None:
    tokenizer = tiny_loaded.tokenizer
    body = post(short, "/tokenize", {"model": short.base, "prompt": PROMPT}).json()
    ids = tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    assert body == {"count": len(ids), "max_model_len": CONTEXT, "tokens": ids, "token_strs": None}
    plain = post(short, "/tokenize", {"prompt": PROMPT, "add_special_tokens": False, "return_token_strs": True})
    bare = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert plain.json()["tokens"] == bare and len(bare) == len(PROMPT)  # one token per character
    assert plain.json()["token_strs"] == list(PROMPT) == tokenizer.convert_ids_to_tokens(bare)


def test_tokenize_messages_as_a_chat_completion_sees_them(short, tiny_loaded) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    body = post(short, "/tokenize", {"messages": messages}).json()
    assert body["tokens"] == chat_ids(tiny_loaded, PROMPT) and body["count"] == len(body["tokens"])
    reply = post(short, "/v1/chat/completions", {"model": short.base, "messages": messages, "max_tokens": 1})
    assert reply.json()["usage"]["prompt_tokens"] == body["count"]
    bare = post(short, "/tokenize", {"messages": messages, "add_generation_prompt": False}).json()
    assert bare["tokens"] == body["tokens"][: bare["count"]] and bare["count"] < body["count"]


def test_tokenize_then_detokenize_round_trips(short) -> None:
    for text in (PROMPT, "naïve café, 1 + 2 = 3\nsecond line"):
        ids = post(short, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]
        assert post(short, "/detokenize", {"model": short.base, "tokens": ids}).json() == {"prompt": text}
    assert post(short, "/detokenize", {"tokens": []}).json() == {"prompt": ""}


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, None),
        ("/tokenize", {}, 400, None),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"prompt": "a", "model": "other-model"}, 404, "model"),
        ("/detokenize", {"tokens": [1, 512]}, 400, "tokens"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": "1 2"}, 400, "tokens"),
    ],
)
def test_tokenizer_errors_are_clear_4xx(short, path, body, status, param) -> None:
    response = post(short, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["param"] == param


# -- --max-model-len ----------------------------------------------------------------------------------


def test_max_model_len_bounds_prompt_plus_max_tokens(short) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    prompt = post(short, "/tokenize", {"messages": messages}).json()["count"]
    room = CONTEXT - prompt
    assert httpx.get(short.v1 + "/models").json()["data"][0]["max_model_len"] == CONTEXT
    fits = post(short, "/v1/chat/completions", {"model": short.base, "messages": messages, "max_tokens": room})
    assert fits.status_code == 200, fits.text
    over = post(short, "/v1/chat/completions", {"model": short.base, "messages": messages, "max_tokens": room + 1})
    assert over.status_code == 400
    error = over.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert error["message"].startswith(f"This model's maximum context length is {CONTEXT} tokens")
    assert f"requested {CONTEXT + 1} tokens ({prompt} in the messages, {room + 1} in max_tokens)" in error["message"]
    long = post(short, "/v1/completions", {"model": short.base, "prompt": "x" * CONTEXT})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    assert f"maximum context length is {CONTEXT} tokens" in long.json()["error"]["message"]
    # without max_tokens, a completion is cut to what the window leaves
    cut = post(short, "/v1/chat/completions", {"model": short.base, "messages": messages, "temperature": 0})
    assert cut.status_code == 200 and cut.json()["usage"]["total_tokens"] <= CONTEXT


def test_max_model_len_beyond_the_model_is_refused_at_start(tiny_model_dir) -> None:
    from server.backends.transformers import create

    with pytest.raises(ValueError, match="max_model_len 1000 is longer than the model's 512 positions"):
        create(Settings(max_model_len=1000), model=load_model(tiny_model_dir))


# -- top_k, min_p, repetition_penalty ------------------------------------------------------------------

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"top_k": 2}, [0.5, 0.3, 0.0, 0.0]),
        ({"top_k": 0}, [0.5, 0.3, 0.15, 0.05]),
        ({"top_k": 9}, [0.5, 0.3, 0.15, 0.05]),
        ({"min_p": 0.2}, [0.5, 0.3, 0.15, 0.0]),  # below 0.2 x 0.5 = 0.1
        ({"min_p": 0.7}, [0.5, 0.0, 0.0, 0.0]),
        ({"top_k": 3, "top_p": 0.8}, [0.5, 0.3, 0.0, 0.0]),  # top-p of what top-k left (0.95): 0.8 x 0.95
        ({"top_k": 3, "min_p": 0.5}, [0.5, 0.3, 0.0, 0.0]),
    ],
)
def test_top_k_and_min_p_cut_the_distribution(params, expected) -> None:
    got = sampling_probs(PROBS.log(), SamplingParams(max_new_tokens=1, **params))
    assert got.tolist() == pytest.approx(expected, abs=1e-6)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens() -> None:
    logits = torch.tensor([2.0, -1.0, 3.0, 0.5])
    params = SamplingParams(max_new_tokens=1, temperature=0.0, repetition_penalty=4.0)
    # token 2 (the prompt) -> 0.75, token 1 (generated) -> -4.0: token 0 wins
    assert select_token(logits, params, None, output_ids=[1], prompt_ids=[2, 2])[0] == 0
    assert select_token(logits, params, None, output_ids=[], prompt_ids=[])[0] == 2
    from server.backends.sampling import apply_penalties

    penalised = apply_penalties(logits, params, [1], [2])
    assert penalised.tolist() == [2.0, -4.0, 0.75, 0.5]


def test_each_row_keeps_its_own_parameters_in_a_batch() -> None:
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]] * 3)
    rows = [
        SamplingParams(max_new_tokens=1, temperature=0.0),
        SamplingParams(max_new_tokens=1, temperature=0.0, repetition_penalty=4.0),
        SamplingParams(max_new_tokens=1, temperature=5.0, top_k=1),  # hot, but only the best token is left
    ]
    generators = [None, None, make_generator(7)]
    picked = select_tokens(logits, rows, generators, [[], [], []], [[2], [2], [2]])
    assert [token for token, _ in picked] == [2, 0, 2]


def _penalised_greedy(loaded, prompt_ids: list[int], max_new: int, penalty: float) -> list[int]:
    """Greedy decoding by full recomputation with the repetition penalty over prompt and output tokens."""
    eos = loaded.tokenizer.eos_token_id
    ids, out = list(prompt_ids), []
    with torch.inference_mode():
        for _ in range(max_new):
            logits = loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            seen = torch.tensor(sorted(set(ids)))
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
            token = int(torch.argmax(logits))
            out.append(token)
            ids.append(token)
            if token == eos:
                break
    return out


def test_sampling_parameters_are_applied_per_row_in_one_batch(short, tiny_loaded) -> None:
    """Three requests at once: plain greedy, greedy with a repetition penalty, and a hot sampled request
    that top_k 1 (or min_p 1) turns into greedy. Each matches its own reference."""
    prompt_ids = chat_ids(tiny_loaded, PROMPT)
    plain = text_of(tiny_loaded, greedy(tiny_loaded, prompt_ids, 16))
    penalised = text_of(tiny_loaded, _penalised_greedy(tiny_loaded, prompt_ids, 16, 1.8))
    assert penalised != plain  # the penalty changes this output: the test can tell
    base = {"model": short.base, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16}
    bodies = [
        {**base, "temperature": 0},
        {**base, "temperature": 0, "repetition_penalty": 1.8},
        {**base, "temperature": 1.8, "seed": 3, "top_k": 1},
        {**base, "temperature": 1.8, "seed": 3, "min_p": 1.0},
        {**base, "temperature": 0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0},
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda b: post(short, "/v1/chat/completions", b), bodies))
    texts = [r.json()["choices"][0]["message"]["content"] for r in replies]
    assert texts == [plain, penalised, plain, plain, plain]
    hot = post(short, "/v1/chat/completions", {**base, "temperature": 1.8, "seed": 3})
    assert hot.json()["choices"][0]["message"]["content"] != plain  # without top_k the hot request wanders


@pytest.mark.parametrize(
    "field, value",
    [("top_k", -2), ("top_k", 1.5), ("min_p", 1.5), ("min_p", -0.1), ("repetition_penalty", 0),
     ("repetition_penalty", 101), ("top_k", "5")],
)
def test_sampling_parameters_out_of_range_are_400(short, field, value) -> None:
    body = {"model": short.base, "prompt": "hi", "max_tokens": 1, field: value}
    response = post(short, "/v1/completions", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


# -- the server's default repetition penalty ----------------------------------------------------------


def test_the_servers_default_repetition_penalty_applies_where_a_request_sets_none(tiny_loaded) -> None:
    """`--default-repetition-penalty`: requests without `repetition_penalty` decode with it (chat and
    completions), a request's own value wins (1 turns it off), and prompt scoring (echo) is untouched."""
    prompt_ids = chat_ids(tiny_loaded, PROMPT)
    plain = text_of(tiny_loaded, greedy(tiny_loaded, prompt_ids, 16))
    penalised = text_of(tiny_loaded, _penalised_greedy(tiny_loaded, prompt_ids, 16, 1.8))
    assert penalised != plain  # the penalty changes this output: the test can tell
    completion_ids = tiny_loaded.tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    completion_penalised = text_of(tiny_loaded, _penalised_greedy(tiny_loaded, completion_ids, 8, 1.8))
    assert completion_penalised != text_of(tiny_loaded, greedy(tiny_loaded, completion_ids, 8))
    echo = {"prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1}
    with live_server(tiny_loaded, Settings(default_repetition_penalty=1.8)) as live:
        model = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        chat = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16, "temperature": 0}
        texts = [
            post(live, "/v1/chat/completions", {**chat, **extra}).json()["choices"][0]["message"]["content"]
            for extra in ({}, {"repetition_penalty": None}, {"repetition_penalty": 1.0}, {"repetition_penalty": 1.8})
        ]
        plain_completion = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        completion = post(live, "/v1/completions", plain_completion)
        scored = post(live, "/v1/completions", {"model": model, **echo}).json()["choices"][0]["logprobs"]
        described = json.dumps(httpx.get(live.url + "/openapi.json").json())
    assert "else the server's default (1.8)" in described
    assert texts == [penalised, penalised, plain, penalised]
    assert completion.json()["choices"][0]["text"] == completion_penalised
    with live_server(tiny_loaded, Settings()) as live:
        model = httpx.get(live.v1 + "/models").json()["data"][0]["id"]
        assert post(live, "/v1/completions", {"model": model, **echo}).json()["choices"][0]["logprobs"] == scored


@pytest.mark.parametrize("value", [0, -1, 101])
def test_a_default_repetition_penalty_out_of_range_is_refused_at_start(value) -> None:
    import pydantic

    with pytest.raises(pydantic.ValidationError, match="default_repetition_penalty"):
        Settings(default_repetition_penalty=value)


def test_the_default_repetition_penalty_flag_reaches_the_settings() -> None:
    import argparse

    from server.cli import register, settings_from_args

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--default-repetition-penalty", "1.15"])
    assert settings_from_args(args).default_repetition_penalty == 1.15
    assert settings_from_args(parser.parse_args(["serve"])).default_repetition_penalty == 1.0
