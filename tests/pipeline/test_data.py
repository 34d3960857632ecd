"""Preference data loading: the three row formats, errors with line and field, budgets and splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steering_vectors.training.data import (
    DataFormatError,
    TokenBudget,
    collate,
    encode,
    load_pairs,
    parse_hh_transcript,
    sample_pairs,
    split_pairs,
)


def write_rows(path: Path, rows: list[object]) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_three_formats(tmp_path: Path) -> None:
    rows = [
        {
            "id": "a",
            "prompt": [{"role": "user", "content": "Hi?"}],
            "chosen": [{"role": "assistant", "content": "Hello."}],
            "rejected": [{"role": "assistant", "content": "Go away."}],
        },
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
        {
            "chosen": "\n\nHuman: Help me.\n\nAssistant: Sure.\n\nHuman: Now?\n\nAssistant: Yes, now.",
            "rejected": "\n\nHuman: Help me.\n\nAssistant: Sure.\n\nHuman: Now?\n\nAssistant: Never.",
        },
    ]
    pairs = load_pairs(write_rows(tmp_path / "p.jsonl", rows))
    assert [p.id for p in pairs] == ["a", "p.jsonl:2", "p.jsonl:3"]
    assert pairs[0].messages == [{"role": "user", "content": "Hi?"}]
    assert (pairs[0].chosen, pairs[0].rejected) == ("Hello.", "Go away.")
    assert pairs[1].messages == [{"role": "user", "content": "Name a colour."}]
    assert pairs[2].messages == [
        {"role": "user", "content": "Help me."},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "Now?"},
    ]
    assert (pairs[2].chosen, pairs[2].rejected) == ("Yes, now.", "Never.")


def test_hh_prompt_string_with_open_assistant_turn(tmp_path: Path) -> None:
    rows = [{"prompt": "\n\nHuman: Why?\n\nAssistant:", "chosen": " Because.", "rejected": " No idea."}]
    (pair,) = load_pairs(write_rows(tmp_path / "p.jsonl", rows))
    assert pair.messages == [{"role": "user", "content": "Why?"}]
    assert pair.chosen == " Because."


def test_parse_hh_transcript_rejects_other_text() -> None:
    with pytest.raises(DataFormatError, match="not an HH transcript"):
        parse_hh_transcript("Hello there\n\nHuman: hi")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("{not json", r"p.jsonl:2: invalid JSON"),
        ({"prompt": "q", "chosen": "a"}, r"p.jsonl:2: missing field 'rejected'"),
        (
            {"prompt": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"},
            r"p.jsonl:2: field 'prompt'\[0\].role: 'robot'",
        ),
        (
            {"prompt": [{"role": "user", "content": 3}], "chosen": "a", "rejected": "b"},
            r"p.jsonl:2: field 'prompt'\[0\].content: expected a string",
        ),
        (
            {"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
            r"p.jsonl:2: field 'chosen': expected only assistant messages",
        ),
        (
            {"prompt": "q", "chosen": "a", "rejected": "   "},
            r"p.jsonl:2: field 'rejected': the reply is empty",
        ),
        (
            {
                "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "chosen": "a",
                "rejected": "b",
            },
            r"p.jsonl:2: field 'prompt' must end with a user turn",
        ),
        (
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"},
            r"p.jsonl:2: fields 'chosen' and 'rejected' differ before the last reply",
        ),
        ([1, 2], r"p.jsonl:2: expected a JSON object, got list"),
    ],
)
def test_errors_name_line_and_field(tmp_path: Path, row: object, message: str) -> None:
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = write_rows(tmp_path / "p.jsonl", [good, row])
    with pytest.raises(DataFormatError, match=message):
        load_pairs(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="no such preference file"):
        load_pairs(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataFormatError, match="no preference pairs"):
        load_pairs(tmp_path / "empty.jsonl")


def test_splits_and_samples_are_deterministic(tmp_path: Path) -> None:
    rows = [{"prompt": f"q{i % 10}", "chosen": "a", "rejected": f"b{i}"} for i in range(40)]
    pairs = load_pairs(write_rows(tmp_path / "p.jsonl", rows))
    keep, held = split_pairs(pairs, 0.3, seed=1)
    keep2, held2 = split_pairs(pairs, 0.3, seed=1)
    assert [p.id for p in held] == [p.id for p in held2] and len(keep) + len(held) == 40
    assert not {str(p.prompt) for p in keep} & {str(p.prompt) for p in held}  # a prompt never crosses splits
    assert [p.id for p in sample_pairs(pairs, 5, seed=3)] == [p.id for p in sample_pairs(pairs, 5, seed=3)]
    assert len(sample_pairs(pairs, 5, seed=3)) == 5


def test_encode_budgets_and_collate(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "user", "content": "x" * 50},
        {"role": "assistant", "content": "y" * 50},
        {"role": "user", "content": "hello"},
    ]
    enc = encode(tok, messages, "abcdefghij", budget=TokenBudget(prompt=40, response=4))
    prompt = tok.decode(enc.input_ids[: enc.prompt_len])
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"  # oldest turns dropped
    assert tok.decode(enc.input_ids[enc.prompt_len :]) == "abcd"
    with_system = encode(
        tok, messages[-1:], "ab", system="be nice", budget=TokenBudget(prompt=40, response=4)
    )
    assert tok.decode(with_system.input_ids).startswith(
        "<|im_start|>system\nbe nice<|im_end|>\n<|im_start|>user"
    )
    long = encode(
        tok, [{"role": "user", "content": "z" * 100}], "ab", budget=TokenBudget(prompt=30, response=4)
    )
    assert long.prompt_len == 30
    assert len(enc.input_ids) == 28
    batch = collate([enc, long], pad_id=0)
    assert batch.input_ids.shape == (2, 32)
    assert batch.attention_mask.sum(dim=1).tolist() == [len(enc.input_ids), 32]
    assert batch.response_mask.sum(dim=1).tolist() == [4, 2]
    assert batch.prompt_lengths == [enc.prompt_len, 30]
