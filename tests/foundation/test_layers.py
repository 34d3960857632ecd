"""Decoder-layer discovery and steering across transformers architectures."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from steering_vectors import Profile, Steerer, UnsupportedArchitectureError, build_plan, combine_offsets
from steering_vectors.core.layers import find_decoder_layers, hidden_size_of

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(COMMON, intermediate_size=64, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(COMMON, intermediate_size=64, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(COMMON, intermediate_size=64, num_key_value_heads=2)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(COMMON, intermediate_size=64, num_key_value_heads=2, head_dim=8)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(COMMON, intermediate_size=64, num_key_value_heads=2, head_dim=8)),
    # pad_token_id given: transformers 5.0.0's PhiConfig has no default for it, and PhiModel reads it
    "phi": ("PhiConfig", "PhiForCausalLM", dict(COMMON, intermediate_size=64, pad_token_id=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64)),
}


def _build(arch: str) -> nn.Module:
    config_name, model_name, kwargs = ARCHITECTURES[arch]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**kwargs)
    return getattr(transformers, model_name)(config).eval()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_layers_found_and_steering_adds_exactly_the_offset(arch):
    model = _build(arch)
    layers = find_decoder_layers(model)
    assert len(layers) == 3
    assert hidden_size_of(model) == 32
    steerer = Steerer.attach(model)
    seen = {}
    layers[1].register_forward_hook(lambda m, a, out: seen.__setitem__("before", out), prepend=True)
    layers[1].register_forward_hook(lambda m, a, out: seen.__setitem__("after", out))
    offset = torch.randn(32)
    plan = build_plan([combine_offsets([(Profile(name="p", offsets={1: offset}), 2.0)])] * 2)
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with steerer.steering(plan):
            steered = model(input_ids=ids).logits
    before = seen["before"][0] if isinstance(seen["before"], tuple) else seen["before"]
    after = seen["after"][0] if isinstance(seen["after"], tuple) else seen["after"]
    assert torch.equal(after, before + offset * 2.0)
    assert not torch.allclose(plain, steered)


def test_peft_wrapped_model_finds_the_same_layers():
    from peft import LoraConfig, get_peft_model

    model = _build("llama")
    layers = find_decoder_layers(model)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert find_decoder_layers(wrapped) is layers


def test_unknown_architecture_is_a_clear_error():
    class Strange(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(UnsupportedArchitectureError, match="Strange.*LAYER_PATHS"):
        find_decoder_layers(Strange())
