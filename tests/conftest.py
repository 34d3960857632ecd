"""Shared fixtures: a tiny randomly initialised Llama (fast, exact tests) and the embedded default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_LAYERS = 4
TINY_HIDDEN = 64


def make_tiny_llama(seed: int = 0, layers: int = TINY_LAYERS, hidden: int = TINY_HIDDEN, heads: int = 4,
                    kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tiny_model():
    return make_tiny_llama()


def save_tiny_model_dir(path: Path, seed: int = 0, **shape: int) -> Path:
    """A complete local model directory (weights, config, a small word-level tokenizer with a chat template);
    `shape`: `make_tiny_llama`'s size arguments (layers, hidden, heads, kv_heads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = make_tiny_llama(seed, **shape)
    model.save_pretrained(path)
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)] + [chr(c) for c in range(0xE0, 0x100)]
    words = chars + [f"<w{i}>" for i in range(512 - len(specials) - len(chars))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def default_model():
    """The embedded SmolLM2-135M-Instruct (dequantised once into the user's cache)."""
    from steering_vectors.core.models import load_model

    return load_model()


TOY_GENERATION = {  # a generation section (steering_vectors.core.generation_record) with hand-picked numbers
    "set": "toy", "judge": "toy-head.safetensors", "judge_sha256": "", "replies": "engine", "max_new_tokens": 8,
    "prompts": 5, "half_a": 3, "half_b": 2, "chosen_strength": 1.0,
    "unsteered": {"loop_rate": 0.5, "refusal_rate": 0.0, "perplexity": 2.0},
    "strengths": [{"strength": 1.0, "win_rate": 0.75, "low": 0.5, "high": 1.0, "loop_rate": 0.0,
                   "refusal_rate": 0.5, "perplexity": 2.2},
                  {"strength": 2.0, "win_rate": 1.0, "low": 1.0, "high": 1.0, "loop_rate": 1.0,
                   "refusal_rate": None, "perplexity": 3.0}],
    "source": "",
}  # fmt: skip


@pytest.fixture
def generation_record():
    """`TOY_GENERATION` as a record (a fresh copy of the dict for tests that break it: `TOY_GENERATION`)."""
    from steering_vectors.core.generation_record import GenerationRecord

    return GenerationRecord.from_json(TOY_GENERATION)
