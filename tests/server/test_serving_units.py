"""The serving layer without HTTP: UTF-8-safe incremental text, stop strings, steering resolution."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from server.errors import APIError
from server.protocol import SteeringEntry, steering_wishes
from server.serving import TextStream, parse_model_alias, resolve_steering
from steering_vectors.core.profile import ModelFingerprint, Profile

# a byte-level "tokenizer": token id = one byte
TEXT = "naïve café → 你好!"
BYTES = list(TEXT.encode("utf-8"))


def byte_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def test_deltas_never_split_a_utf8_character() -> None:
    stream = TextStream(byte_decode, [], frozenset())
    deltas = [stream.add([b]) for b in BYTES]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.finish() == TEXT
    # the three bytes of "→" come out in one piece, on its last byte
    arrow = TEXT.encode().index("→".encode())
    assert deltas[arrow : arrow + 3] == ["", "", "→"]


def test_trailing_partial_character_is_flushed_at_the_end() -> None:
    stream = TextStream(byte_decode, [], frozenset())
    assert stream.add(list(b"ok") + ["é".encode()[0]]) == "ok"
    assert stream.finish() == "\ufffd"


def test_stop_string_across_tokens_is_cut_and_held_back() -> None:
    stream = TextStream(byte_decode, ["END"], frozenset())
    out = [stream.add([b]) for b in b"abcENxyEN"]
    assert out == ["a", "b", "c", "", "", "ENx", "y", "", ""]  # "EN" waits while it could start "END"
    assert stream.finish() == "EN"
    stream = TextStream(byte_decode, ["END", "xy"], frozenset())
    out = "".join(stream.add([b]) for b in b"abENDxy")
    assert out == "ab" and stream.stopped and stream.finish() == ""


def test_hidden_stop_tokens_do_not_reach_the_text() -> None:
    stream = TextStream(byte_decode, [], frozenset({0}))
    assert stream.add([104, 105, 0]) == "hi"


def _profile(name: str, value: float, mode: str = "all", strength: float = 1.0) -> Profile:
    return Profile(name=name, offsets={0: torch.full((4,), value)}, position_mode=mode, default_strength=strength)


PROFILES = {"a": _profile("a", 1.0), "b": _profile("b", 10.0, strength=0.5), "g": _profile("g", 2.0, "generated")}


SHAPE = ModelFingerprint("llama", hidden_size=4, num_layers=2)


def _resolve(model: str = "base", spec=None, bounds=(-5.0, 5.0), shape=SHAPE):
    alias = parse_model_alias(model, "base")
    wanted = ([alias] if alias is not None else []) + list(steering_wishes(spec))
    return resolve_steering(wanted, profiles=PROFILES, strength_bounds=bounds, fingerprint=shape)


def test_resolve_combines_entries_and_alias() -> None:
    assert _resolve() is None
    steering = _resolve("base:a@2", [SteeringEntry(profile="b")])
    assert steering.applied == (("a", 2.0), ("b", 0.5))
    assert torch.equal(steering.offsets[0], torch.full((4,), 2.0 * 1.0 + 0.5 * 10.0))
    assert steering.position_mode == "all"
    assert _resolve(spec=SteeringEntry(profile="g")).position_mode == "generated"
    assert _resolve(spec=SteeringEntry(profile="a", position="generated")).position_mode == "generated"
    assert _resolve(spec=SteeringEntry(profile="a", position="prompt")).position_mode == "prompt"
    assert _resolve(spec=[SteeringEntry(profile="a", position="prompt"), SteeringEntry(profile="g", position="prompt")]
                    ).position_mode == "prompt"


@pytest.mark.parametrize(
    "model, spec, status, param",
    [
        ("other", None, 404, "model"),
        ("base:zzz", None, 404, "model"),
        ("base:a@x", None, 400, "model"),
        ("base:a@6", None, 400, "model"),
        ("base", SteeringEntry(profile="a", strength=float("inf")), 400, "steering.strength"),
        ("base", [SteeringEntry(profile="a"), SteeringEntry(profile="zzz")], 404, "steering[1].profile"),
        ("base", [SteeringEntry(profile="a"), SteeringEntry(profile="g")], 400, "steering"),
    ],
)
def test_resolve_errors_name_the_parameter(model, spec, status, param) -> None:
    with pytest.raises(APIError) as caught:
        _resolve(model, spec)
    assert (caught.value.status, caught.value.param) == (status, param)


def test_resolved_steering_is_validated_against_the_model() -> None:
    steering = _resolve("base:a@2")
    assert steering.fits(SHAPE) and (steering.num_layers, steering.hidden_size) == (2, 4)
    assert not steering.fits(ModelFingerprint("llama", hidden_size=4, num_layers=3))
    # a profile that does not fit the model (never loaded by the registry, but reaching here) is a 400
    with pytest.raises(APIError) as caught:
        _resolve("base:a", shape=ModelFingerprint("llama", hidden_size=8, num_layers=2))
    assert (caught.value.status, caught.value.code) == (400, "invalid_steering")
    assert "hidden size is 8" in str(caught.value)


def test_alias_parsing() -> None:
    assert parse_model_alias("base", "base") is None
    wanted = parse_model_alias("base:x.y-z@-1.5", "base")
    assert (wanted.profile, wanted.strength) == ("x.y-z", -1.5)


@pytest.mark.parametrize("temperature", [2.225073858507203e-309, 1e-45, 1e-39])
def test_a_vanishing_temperature_samples_greedily(temperature) -> None:
    """Found by the fuzzer: logits / temperature overflowed to inf, softmax gave NaN, sampling failed (500)."""
    from server.backends.base import SamplingParams
    from server.backends.sampling import make_generator, select_token

    logits = torch.tensor([1.0, 3.0, -2.0, 2.5])
    params = SamplingParams(max_new_tokens=1, temperature=temperature, top_p=1.0, seed=1,
                            stop_token_ids=frozenset(), presence_penalty=0.0, frequency_penalty=0.0,
                            logprobs=True, top_logprobs=2, prompt_logprobs=False)
    token, logprob = select_token(logits, params, make_generator(1))
    assert token == 1 and logprob is not None and logprob.token_id == 1
    warm = dataclasses.replace(params, temperature=1e-30)  # tiny, but logits / temperature stay finite
    assert select_token(logits, warm, make_generator(1))[0] == 1


def test_ignore_eos_drops_the_stop_token_ids_of_every_choice() -> None:
    from server.protocol import ChatCompletionRequest, CompletionRequest

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    stops = frozenset({2, 5})
    assert ChatCompletionRequest(**chat).generation().sampling(0, 8, stops).stop_token_ids == stops
    ignoring = ChatCompletionRequest(**chat, ignore_eos=True).generation()
    assert ignoring.sampling(1, 8, stops).stop_token_ids == frozenset()
    completion = CompletionRequest(model="m", prompt="x", ignore_eos=True).generation()
    assert completion.sampling(0, 8, stops).stop_token_ids == frozenset()
