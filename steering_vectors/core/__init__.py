"""The runtime core: everything a serving process or an engine worker needs to apply steering profiles.

Knows the profile file format and its validation against a model (`profile`, `gguf_io` for llama.cpp
control vectors, `generation_record` for the section of a profile's provenance that holds its judged
replies), the typed errors (`errors`), where an architecture keeps its decoder layers (`layers`),
offline model loading and fingerprints, the embedded default model and its cache (`models`), the one home of
steering arithmetic, per-row plans and the forward hooks (`hooks`), and the few torch helpers both halves
share (`tensors`: a model's device, bf16 autocast, response-token log-probabilities).

Knows nothing of training: it never imports `steering_vectors.training`, preference data, the pipeline,
peft or matplotlib (tests/foundation/test_imports.py checks this in a fresh interpreter), nor any web code.
transformers and safetensors' loaders are imported only by the functions that load a model. The server,
its backends and the vLLM worker extension import this package and, for the few-example fit route only,
`training.quickfit`.
"""
