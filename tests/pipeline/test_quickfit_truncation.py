"""Truncation of over-long sides in `steering_vectors.training.quickfit.encode_examples`, shape by shape.

On the tiny model's character tokenizer (one token per ASCII character; its chat template renders a user
prompt U as 19 + len(U) tokens, with a system instruction I as 29 + len(I) + len(U)) every rule is checked
to the token: which tokens a side keeps, which it reads, what is reported, and that a fit on an over-long
example is exactly the fit on the example shortened by hand. On the default model's byte-level tokenizer
(slow): the cuts on multi-byte characters, whose tokens share character offsets. And which texts encode to
no tokens (a pair text or reply that does is refused): none on the tiny tokenizer, on the default one
exactly those made of six control characters (`silent_characters`, which the API description states)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steering_vectors.core.models import load_model, load_tokenizer, model_directory
from steering_vectors.training.quickfit import (
    DEFAULT_LIMITS,
    Examples,
    FitInputError,
    FitLimits,
    Side,
    encode_examples,
    fit_profile,
    read_batch,
    silent_characters,
    truncations,
)

BUDGET = 64
LIMITS = FitLimits(max_side_tokens=BUDGET)
U = "".join(chr(97 + i % 26) for i in range(100))  # 100 distinct-looking tokens: "abc...xyzabc..."


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


def ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def chat(tok, prompt: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": prompt}]
    return ids(tok, tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))


def test_the_tiny_template_lengths_these_tests_count_on(tiny) -> None:
    tok = tiny.tokenizer
    assert len(chat(tok, U)) == 19 + 100 and len(chat(tok, U, "be glad")) == 29 + 7 + 100
    assert ids(tok, U) == [ids(tok, c)[0] for c in U]


# -- pairs: the first tokens ----------------------------------------------------------------------------

def test_pairs_keep_their_first_tokens_and_short_sides_are_untouched(tiny) -> None:
    tok = tiny.tokenizer
    long, short = U * 2, "a short one"
    sides = encode_examples(tok, Examples.from_pairs([(long, short), (short, long)]), LIMITS)
    assert [(s.pair, s.label) for s in sides] == [(0, 1), (0, 0), (1, 1), (1, 0)]
    assert sides[0] == Side(0, 1, tuple(ids(tok, long)[:BUDGET]), 0, 200)
    assert sides[1] == Side(0, 0, tuple(ids(tok, short)), 0, None)
    assert sides[3] == Side(1, 0, tuple(ids(tok, long)[:BUDGET]), 0, 200)
    assert truncations(sides) == [
        {"example": 0, "side": "positive", "tokens_before": 200, "tokens_after": 64},
        {"example": 1, "side": "negative", "tokens_before": 200, "tokens_after": 64},
    ]


def test_a_side_of_exactly_the_budget_is_untouched(tiny) -> None:
    sides = encode_examples(tiny.tokenizer, Examples.from_pairs([(U[:BUDGET], "b")]), LIMITS)
    assert len(sides[0].input_ids) == BUDGET and truncations(sides) == []


# -- replies: the reply's first tokens, the prompt's last ones, the template whole ------------------------

def test_a_long_reply_keeps_what_a_short_prompt_leaves(tiny) -> None:
    tok = tiny.tokenizer
    sides = encode_examples(tok, Examples.from_replies([("q", U, "no")]), LIMITS)
    head = chat(tok, "q")  # 20 tokens: the reply keeps 44
    assert sides[0] == Side(0, 1, tuple(head + ids(tok, U)[:44]), 20, 120)
    assert sides[1] == Side(0, 0, tuple(head + ids(tok, "no")), 20, None)  # the prompt is the same: untouched
    assert sides[0].input_ids[sides[0].read_from:] == tuple(ids(tok, U[:44]))  # what is read: the kept reply


def test_long_prompt_and_reply_split_the_budget_and_share_the_prompt(tiny) -> None:
    tok = tiny.tokenizer
    prompt = U.upper()
    sides = encode_examples(tok, Examples.from_replies([(prompt, U, "a short no")]), LIMITS)
    # the reply gets half (32 tokens), the prompt the rest: 19 template tokens and its last 13 characters
    head = chat(tok, prompt[-13:])
    assert len(head) == 32 and tok.decode(head).endswith(prompt[-13:] + "<|im_end|>\n<|im_start|>assistant\n")
    assert tok.decode(head).startswith("<|im_start|>user\n")
    assert sides[0] == Side(0, 1, tuple(head + ids(tok, U[:32])), 32, 119 + 100)
    assert sides[1] == Side(0, 0, tuple(head + ids(tok, "a short no")), 32, 119 + 10)  # same prompt, both cut
    assert [e["tokens_after"] for e in truncations(sides)] == [64, 42]


def test_a_long_prompt_with_short_replies_keeps_its_end(tiny) -> None:
    tok = tiny.tokenizer
    sides = encode_examples(tok, Examples.from_replies([(U, "yes", "no")]), LIMITS)
    head = chat(tok, U[-42:])  # 64 - 3 (the longer reply) - 19
    assert sides[0] == Side(0, 1, tuple(head + ids(tok, "yes")), 61, 122)
    assert sides[1] == Side(0, 0, tuple(head + ids(tok, "no")), 61, 121)


# -- instructions: the prompt's start, then the instruction's start ----------------------------------------

def test_instructions_cut_the_prompt_the_same_on_both_sides(tiny) -> None:
    tok = tiny.tokenizer
    examples = Examples.from_instructions("be glad", "be very sad", [U, "hi"])
    sides = encode_examples(tok, examples, LIMITS)
    kept = U[:24]  # 64 - 29 - len("be very sad")
    assert sides[0] == Side(0, 1, tuple(chat(tok, kept, "be glad")), 59, 136)
    assert sides[1] == Side(0, 0, tuple(chat(tok, kept, "be very sad")), 63, 140)
    assert len(sides[1].input_ids) == BUDGET
    assert sides[2:] == [Side(1, 1, tuple(chat(tok, "hi", "be glad")), 37),
                         Side(1, 0, tuple(chat(tok, "hi", "be very sad")), 41)]
    assert [(e["example"], e["side"]) for e in truncations(sides)] == [(0, "positive"), (0, "negative")]


def test_an_instruction_too_long_alone_is_cut_and_the_prompt_emptied(tiny) -> None:
    tok = tiny.tokenizer
    sides = encode_examples(tok, Examples.from_instructions(U, "be sad", ["hello"]), LIMITS)
    assert sides[0] == Side(0, 1, tuple(chat(tok, "", U[:35])), 63, 29 + 100 + 5)  # 29 + 35 = 64
    assert sides[1] == Side(0, 0, tuple(chat(tok, "", "be sad")), 34, 29 + 6 + 5)


def test_a_template_longer_than_the_budget_is_an_input_error(tiny) -> None:
    with pytest.raises(FitInputError, match="chat template alone takes 29 tokens"):
        encode_examples(tiny.tokenizer, Examples.from_instructions("a", "b", ["c"]), FitLimits(max_side_tokens=20))


class NoOffsets:
    """The tiny tokenizer as a tokenizer without offset mappings (as Python tokenizers are)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def __call__(self, text, **kwargs):
        if kwargs.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_without_offsets_the_cut_takes_a_share_of_the_characters(tiny) -> None:
    tok = NoOffsets(tiny.tokenizer)
    sides = encode_examples(tok, Examples.from_instructions("be glad", "be very sad", [U]), LIMITS)
    assert sides[1].input_ids == tuple(chat(tiny.tokenizer, U[:24], "be very sad"))


# -- a fit on an over-long example is the fit on the shortened one -----------------------------------------

CASES = {
    "pairs": (Examples.from_pairs([(U * 2, "short"), ("tiny", U.upper())]),
              Examples.from_pairs([(U[:64], "short"), ("tiny", U.upper()[:64])])),
    "replies": (Examples.from_replies([(U.upper(), U, "a short no"), ("q", U, "no")]),
                Examples.from_replies([(U.upper()[-13:], U[:32], "a short no"), ("q", U[:44], "no")])),
    "instructions": (Examples.from_instructions("be glad", "be very sad", [U, "hi"]),
                     Examples.from_instructions("be glad", "be very sad", [U[:24], "hi"])),
}


@pytest.mark.parametrize("shape", list(CASES))
def test_a_fit_on_long_examples_equals_the_fit_on_the_shortened_ones(tiny, shape) -> None:
    long, short = CASES[shape]
    assert truncations(encode_examples(tiny.tokenizer, short, LIMITS)) == []
    assert [s.input_ids for s in encode_examples(tiny.tokenizer, long, LIMITS)] == [
        s.input_ids for s in encode_examples(tiny.tokenizer, short, LIMITS)]
    fitted = {}
    for key, examples in (("long", long), ("short", short)):
        fitted[key] = fit_profile(tiny.model, tiny.tokenizer, examples, name=f"{shape}-{key}", method="mean",
                                  layers=[1, 3], limits=LIMITS)
    assert all(torch.equal(fitted["long"].offsets[k], fitted["short"].offsets[k]) for k in (1, 3))
    recorded = fitted["long"].provenance["examples"]
    assert recorded["truncated"] == truncations(encode_examples(tiny.tokenizer, long, LIMITS)) != []
    assert recorded["tokens"] == fitted["short"].provenance["examples"]["tokens"]
    assert fitted["short"].provenance["examples"]["truncated"] == []


def test_the_states_read_are_those_of_the_kept_reply_tokens(tiny) -> None:
    sides = encode_examples(tiny.tokenizer, Examples.from_replies([(U.upper(), U, "a short no")]), LIMITS)
    states = read_batch(tiny.model, sides, [2], pad_id=0)
    assert [s.count for s in states] == [32, 10]
    with torch.no_grad():
        hidden = tiny.model(input_ids=torch.tensor([list(sides[0].input_ids)]), output_hidden_states=True)
    expected = hidden.hidden_states[3][0, 32:].double().sum(0)
    torch.testing.assert_close(states[0].sums[0], expected, atol=1e-4, rtol=1e-4)


# -- texts that encode to no tokens ------------------------------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=1, max_size=8))
def test_every_non_empty_text_has_a_token_on_the_tiny_tokenizer(tiny, text) -> None:
    assert len(ids(tiny.tokenizer, text)) >= 1


def test_the_tiny_tokenizer_has_no_silent_characters(tiny) -> None:
    assert silent_characters(tiny.tokenizer) == ""


@pytest.fixture(scope="module")
def real_tokenizer():
    return load_tokenizer(model_directory()[0])


TRICKY = ["😀" * 300, "é" * 700, "漢字" * 300, "a\u0301" * 400, "<|im_end|> hi " * 200,
          " \t\r\n" * 400, "\u200b" * 600, "word " * 600]


@pytest.mark.slow
@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_cuts_on_the_byte_level_tokenizer_are_exact_sides_of_prefixes_and_suffixes(real_tokenizer, text) -> None:
    tok, budget = real_tokenizer, DEFAULT_LIMITS.max_side_tokens
    assert len(chat(tok, text)) > budget
    pair, reply, instructed = (
        encode_examples(tok, examples)
        for examples in (Examples.from_pairs([(text, "x")]), Examples.from_replies([(text, text, "x")]),
                         Examples.from_instructions("be glad", "be sad", [text])))
    assert pair[0].input_ids == tuple(ids(tok, text)[:budget]) and pair[0].untruncated == len(ids(tok, text))
    # replies: the kept prompt is a suffix of the text, rendered whole; the reply its first tokens
    head = reply[0].input_ids[:reply[0].read_from]
    suffix = kept(text, head, lambda t: chat(tok, t), from_end=True)
    assert suffix is not None and reply[1].input_ids[:reply[1].read_from] == head
    assert reply[0].input_ids[reply[0].read_from:] == tuple(ids(tok, text)[:budget // 2])
    assert budget - 8 < len(reply[0].input_ids) <= budget
    # instructions: the kept prompt is a prefix, the same on both sides, each side within the budget
    prefix = kept(text, instructed[0].input_ids, lambda t: chat(tok, t, "be glad"), from_end=False)
    assert prefix is not None and instructed[1].input_ids == tuple(chat(tok, prefix, "be sad"))
    assert budget - 8 < max(len(s.input_ids) for s in instructed) <= budget


def kept(text: str, side: tuple[int, ...], render, *, from_end: bool) -> str | None:
    """The prefix (suffix, `from_end`) of `text` whose rendering is `side`, if there is one."""
    for n in range(len(text) + 1):
        candidate = text[len(text) - n:] if from_end else text[:n]
        got = tuple(render(candidate))
        if got == side:
            return candidate
        if len(got) > len(side) + 32:  # lengths are not monotone (a cut special token), but nearly
            return None
    return None


SILENT = "\x04\x06\x13\x14\x16\x1d"  # control characters missing from the default model's byte vocabulary


@pytest.mark.slow
def test_the_default_tokenizer_drops_six_control_characters(real_tokenizer) -> None:
    assert silent_characters(real_tokenizer) == SILENT
    for char in SILENT:
        assert ids(real_tokenizer, char) == [] and ids(real_tokenizer, char + "a") == ids(real_tokenizer, "a")
    with pytest.raises(FitInputError, match="encodes to no tokens") as refused:
        encode_examples(real_tokenizer, Examples.from_replies([("q", "a", SILENT)]))
    assert refused.value.param == "examples[0].negative"
    with pytest.raises(FitInputError, match="encodes to no tokens") as refused:
        encode_examples(real_tokenizer, Examples.from_pairs([("\x16\x04", "b")]))
    assert refused.value.param == "examples[0].positive"
    assert len(encode_examples(real_tokenizer, Examples.from_instructions(SILENT, "\x16", [SILENT]))) == 2


@pytest.mark.slow
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.one_of(st.sampled_from(SILENT), st.characters(codec="utf-8")), min_size=1, max_size=8))
def test_a_text_has_no_tokens_on_the_default_tokenizer_exactly_when_it_is_all_silent(real_tokenizer, text) -> None:
    assert (ids(real_tokenizer, text) == []) is all(char in SILENT for char in text)
