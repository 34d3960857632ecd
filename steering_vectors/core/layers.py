"""Decoder-layer discovery for transformers causal language models.

Knows where each supported architecture keeps its stack of decoder layers. Knows nothing about
steering: hooks and fingerprints ask this module for the layers and do the rest.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import UnsupportedArchitectureError

# Attribute paths, relative to the (unwrapped) model, where decoder layers live.
# Llama/SmolLM, Mistral, Qwen2, Gemma, Gemma2, Gemma3 text, Phi, Phi3: model.layers
# Gemma3 and other multimodal wrappers: model.language_model.layers
# GPT-2, Falcon, Bloom, GPT-J: transformer.h; GPT-NeoX: gpt_neox.layers; OPT: model.decoder.layers
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.blocks",
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        return get_base()
    return model


def _resolve(obj: object, path: str) -> object | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """Return the model's decoder layers in order, or raise `UnsupportedArchitectureError`."""
    base = unwrap_model(model)
    for path in LAYER_PATHS:
        layers = _resolve(base, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise UnsupportedArchitectureError(
        f"cannot find the decoder layers of {type(base).__name__}: none of "
        f"{', '.join(LAYER_PATHS)} is a list of layers. Supported are Llama/SmolLM, Mistral, Qwen2, "
        "Gemma/Gemma2/Gemma3, Phi, GPT-2, GPT-NeoX, Falcon and OPT style models; add the attribute "
        "path of your architecture to steering_vectors.layers.LAYER_PATHS."
    )


def hidden_size_of(model: nn.Module) -> int:
    """Width of the residual stream (the size of every offset)."""
    config: Any = unwrap_model(model).config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.hidden_size)
