"""End to end through the official `openai` client against a live server on loopback (tiny model)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json

import httpx
import openai
import pytest

from .reference import chat_ids, greedy, text_of

PROMPT = "Tell me a story"
MAX = 12


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0)


def applied(steering: dict) -> list[dict]:
    """The profiles and strengths a response reports (each entry also names its file's digest)."""
    assert all(entry.pop("digest").startswith("sha256:") for entry in steering["profiles"]), steering
    return steering["profiles"]


def chat(client: openai.OpenAI, model: str = "tiny", **kwargs):
    kwargs.setdefault("max_tokens", MAX)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], temperature=0, **kwargs
    )


@pytest.fixture(scope="module")
def model_name(server) -> str:
    return httpx.get(server.v1 + "/models").json()["data"][0]["id"]


def test_models_lists_base_and_one_alias_per_profile(server, model_name) -> None:
    ids = [m["id"] for m in httpx.get(server.v1 + "/models").json()["data"]]
    assert ids == [model_name, f"{model_name}:alpha", f"{model_name}:beta", f"{model_name}:late"]
    assert httpx.get(server.v1 + f"/models/{model_name}:alpha").json()["profile"] == "alpha"


def test_chat_matches_reference_greedy(client, server, model_name, tiny_loaded) -> None:
    reply = chat(client, model_name)
    expected = greedy(tiny_loaded, chat_ids(tiny_loaded, PROMPT), MAX)
    assert reply.choices[0].message.content == text_of(tiny_loaded, expected)
    assert reply.choices[0].message.role == "assistant"
    eos = tiny_loaded.tokenizer.eos_token_id
    assert reply.choices[0].finish_reason == ("stop" if expected[-1] == eos else "length")
    assert reply.usage.prompt_tokens == len(chat_ids(tiny_loaded, PROMPT))
    assert reply.usage.completion_tokens == len(expected)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == model_name and reply.id.startswith("chatcmpl-")
    assert reply.model_extra["steering"] is None


def test_steering_via_extra_body_matches_reference(client, server, model_name, tiny_loaded, tiny_profiles) -> None:
    plain = chat(client, model_name).choices[0].message.content
    reply = chat(client, model_name, extra_body={"steering": {"profile": "alpha", "strength": 1.5}})
    expected = greedy(tiny_loaded, chat_ids(tiny_loaded, PROMPT), MAX, [(tiny_profiles["alpha"], 1.5)])
    assert reply.choices[0].message.content == text_of(tiny_loaded, expected)
    assert reply.choices[0].message.content != plain
    digest = "sha256:" + hashlib.sha256((server.profile_dir / "alpha.safetensors").read_bytes()).hexdigest()
    assert reply.model_extra["steering"] == {"profiles": [{"profile": "alpha", "strength": 1.5, "digest": digest}],
                                             "position": "all"}


def test_steering_list_combines_profiles(client, model_name, tiny_loaded, tiny_profiles) -> None:
    entries = [{"profile": "alpha", "strength": 1.0}, {"profile": "beta"}]  # beta: default strength 0.5
    reply = chat(client, model_name, extra_body={"steering": entries})
    expected = greedy(
        tiny_loaded, chat_ids(tiny_loaded, PROMPT), MAX, [(tiny_profiles["alpha"], 1.0), (tiny_profiles["beta"], 0.5)]
    )
    assert reply.choices[0].message.content == text_of(tiny_loaded, expected)
    assert applied(reply.model_extra["steering"]) == [
        {"profile": "alpha", "strength": 1.0},
        {"profile": "beta", "strength": 0.5},
    ]


def test_model_alias_selects_profile_and_strength(client, model_name) -> None:
    by_body = chat(client, model_name, extra_body={"steering": {"profile": "alpha", "strength": 2.0}})
    by_alias = chat(client, f"{model_name}:alpha@2")
    assert by_alias.choices[0].message.content == by_body.choices[0].message.content
    assert by_alias.model == f"{model_name}:alpha@2"
    assert applied(by_alias.model_extra["steering"]) == [{"profile": "alpha", "strength": 2.0}]
    default = chat(client, f"{model_name}:alpha")  # alpha's default strength is 1.0
    assert applied(default.model_extra["steering"]) == [{"profile": "alpha", "strength": 1.0}]


def test_strength_zero_equals_unsteered(client, model_name) -> None:
    plain = chat(client, model_name, max_tokens=20).choices[0].message.content
    zero = chat(client, model_name, max_tokens=20, extra_body={"steering": {"profile": "alpha", "strength": 0}})
    assert zero.choices[0].message.content == plain


def test_position_generated_leaves_prompt_unsteered(client, model_name) -> None:
    everywhere = chat(client, model_name, extra_body={"steering": {"profile": "alpha", "strength": 3}})
    generated = chat(client, model_name, extra_body={"steering": {"profile": "alpha", "strength": 3,
                                                                   "position": "generated"}})
    assert generated.model_extra["steering"]["position"] == "generated"
    assert everywhere.model_extra["steering"]["position"] == "all"
    assert generated.choices[0].message.content != everywhere.choices[0].message.content


def test_position_prompt_steers_only_the_prompt(client, model_name, tiny_loaded, tiny_profiles) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=model_name, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=MAX,
        extra_body={"steering": {"profile": "alpha", "strength": 3, "position": "prompt"}})
    reply = raw.parse()
    assert reply.model_extra["steering"]["position"] == "prompt"
    assert raw.headers["x-steering"].startswith("alpha=3;position=prompt;digest=sha256:")
    ids = chat_ids(tiny_loaded, PROMPT)
    expected = greedy(tiny_loaded, ids, MAX, [(tiny_profiles["alpha"], 3.0)], position="prompt")
    assert reply.choices[0].message.content == text_of(tiny_loaded, expected)
    assert expected != greedy(tiny_loaded, ids, MAX, [(tiny_profiles["alpha"], 3.0)])  # not "all" mode
    assert expected != greedy(tiny_loaded, ids, MAX)  # nor unsteered


def test_streaming_chat_equals_non_streaming(client, model_name) -> None:
    whole = chat(client, model_name, extra_body={"steering": {"profile": "beta", "strength": 2}})
    chunks = list(chat(client, model_name, stream=True, stream_options={"include_usage": True},
                       extra_body={"steering": {"profile": "beta", "strength": 2}}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert applied(chunks[0].model_extra["steering"]) == [{"profile": "beta", "strength": 2.0}]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_wire_format_ends_with_done(server, model_name) -> None:
    body = {"model": model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-steering"] == "none"
        lines = [line for line in response.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[-1]["choices"][0]["delta"] == {} and payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)


def test_logprobs_and_top_logprobs(client, model_name) -> None:
    reply = chat(client, model_name, max_tokens=4, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(item.token for item in content) == reply.choices[0].message.content
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy picks the best
        assert item.logprob <= 0


def test_stop_string_truncates(client, model_name) -> None:
    full = chat(client, model_name).choices[0].message.content
    stop = full[3:6]
    cut = chat(client, model_name, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, model_name, stop=stop, stream=True)
                       if c.choices)
    assert streamed == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible_and_n_choices(client, model_name) -> None:
    def sample(seed: int, n: int = 1):
        return client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": PROMPT}],
                                              temperature=1.0, seed=seed, max_tokens=8, n=n)

    first, again = sample(7), sample(7)
    assert first.choices[0].message.content == again.choices[0].message.content
    both = sample(7, n=2)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[0].message.content == first.choices[0].message.content  # choice i uses seed + i
    assert both.choices[1].message.content == sample(8).choices[0].message.content


def test_completions_echo_scores_prompt(client, model_name, tiny_loaded, tiny_profiles) -> None:
    import torch

    text = "the cat sat"
    plain = client.completions.create(model=model_name, prompt=text, max_tokens=0, echo=True, logprobs=0)
    choice = plain.choices[0]
    assert choice.text == text
    assert choice.logprobs.tokens == list(text)  # the tiny tokenizer is character-level
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.text_offset == list(range(len(text)))
    ids = tiny_loaded.tokenizer(text)["input_ids"]
    with torch.inference_mode():
        logits = tiny_loaded.model(input_ids=torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected.tolist(), abs=1e-4)
    assert plain.usage.completion_tokens == 0 and plain.usage.prompt_tokens == len(ids)

    steered = client.completions.create(model=f"{model_name}:alpha@2", prompt=text, max_tokens=0, echo=True,
                                        logprobs=0)
    assert steered.choices[0].logprobs.token_logprobs[1:] != pytest.approx(expected.tolist(), abs=1e-4)
    assert applied(steered.model_extra["steering"]) == [{"profile": "alpha", "strength": 2.0}]


def test_completions_generation_and_stream(client, model_name, tiny_loaded) -> None:
    text = "once upon"
    whole = client.completions.create(model=model_name, prompt=text, max_tokens=6, temperature=0)
    expected = greedy(tiny_loaded, tiny_loaded.tokenizer(text)["input_ids"], 6)
    assert whole.choices[0].text == text_of(tiny_loaded, expected)
    streamed = client.completions.create(model=model_name, prompt=text, max_tokens=6, temperature=0, stream=True,
                                         echo=True)
    assert "".join(c.choices[0].text for c in streamed) == text + whole.choices[0].text
    batch = client.completions.create(model=model_name, prompt=[text, "abc"], max_tokens=3, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.choices[0].text == whole.choices[0].text[: len(batch.choices[0].text)]


def test_concurrent_requests_with_different_profiles_match_alone(client, model_name) -> None:
    variants = [None, {"profile": "alpha", "strength": 1.5}, {"profile": "beta", "strength": -2},
                {"profile": "late", "strength": 3}]

    def run(steering):
        extra = {"steering": steering} if steering else {}
        return chat(client, model_name, max_tokens=16, extra_body=extra).choices[0].message.content

    alone = [run(v) for v in variants]
    assert len(set(alone)) == len(alone)  # the profiles really change the output
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(variants) * 2) as pool:
        together = list(pool.map(run, variants * 2))
    assert together == alone * 2
