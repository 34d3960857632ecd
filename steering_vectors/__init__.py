"""RAHF steering vectors: learn preference profiles and apply them per row through forward hooks.

Two halves. `steering_vectors.core` is what serving needs (profile format, hooks, model loading, layers,
GGUF, errors); `steering_vectors.training` learns and evaluates profiles (data, the RAHF steps, pipeline,
compare, conditions, quickfit) on top of it. This package re-exports the core's main names only, so
`import steering_vectors` (or `steering_vectors.core`) loads nothing of training. `cli` and `profiles_cli`
are the `rahf` command, above both halves: its parser registers the training commands from
`training.pipeline_cli`, and `rahf profiles` imports training only for `condition`.

The library never downloads from a model hub: importing it switches the Hugging Face libraries to
offline mode unless the caller already chose otherwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from .core.errors import (  # noqa: E402
    DeviceError,
    ModelNotFoundError,
    PlanError,
    ProfileError,
    ProfileFormatError,
    ProfileLayerError,
    ProfileMismatchError,
    ProfileShapeError,
    ProfileValueError,
    SteeringError,
    UnsupportedArchitectureError,
)
from .core.hooks import (  # noqa: E402
    Steerer,
    SteeringPlan,
    apply_lora,
    build_plan,
    combine_lora,
    combine_low_rank,
    combine_offsets,
    lora_delta,
    low_rank_delta,
    positions_from_attention_mask,
)
from .core.layers import find_decoder_layers  # noqa: E402
from .core.profile import ModelFingerprint, Profile  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "ModelFingerprint",
    "DeviceError",
    "ModelNotFoundError",
    "PlanError",
    "Profile",
    "ProfileError",
    "ProfileFormatError",
    "ProfileLayerError",
    "ProfileMismatchError",
    "ProfileShapeError",
    "ProfileValueError",
    "Steerer",
    "SteeringError",
    "SteeringPlan",
    "UnsupportedArchitectureError",
    "apply_lora",
    "build_plan",
    "combine_lora",
    "combine_low_rank",
    "combine_offsets",
    "find_decoder_layers",
    "lora_delta",
    "low_rank_delta",
    "positions_from_attention_mask",
]
