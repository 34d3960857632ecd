"""Typed errors of the library.

Each error says what went wrong and what the user can do about it. The server maps these to HTTP
status codes in one place; nothing here knows about HTTP.
"""

from __future__ import annotations


class SteeringError(Exception):
    """Base class of every error this library raises on purpose."""


class ModelNotFoundError(SteeringError):
    """The requested model (or the embedded default) is not installed or not a model directory."""


class DeviceError(SteeringError):
    """The requested torch device is unknown or not available on this machine."""


class UnsupportedArchitectureError(SteeringError):
    """The model's decoder layers could not be located."""


class ProfileError(SteeringError):
    """Base class of errors about a profile file or its contents."""


class ProfileFormatError(ProfileError):
    """The file is not a readable profile (truncated, not safetensors/GGUF, missing metadata)."""


class ProfileValueError(ProfileError):
    """An offset tensor holds NaN or Inf values."""


class ProfileShapeError(ProfileError):
    """An offset tensor's size does not match the model's hidden size."""


class ProfileLayerError(ProfileError):
    """A profile names a layer index the model does not have."""


class ProfileMismatchError(ProfileError):
    """The profile was made for another model (architecture, size, weights or tokenizer differ)."""


class PlanError(SteeringError):
    """A steering plan does not fit the batch it is applied to."""
