"""GGUF control vectors: the `controlvector` files that llama.cpp and repeng read and write.

Knows the control-vector layout; knows nothing about hooks or serving.

Layer-index convention: tensor ``direction.N`` is added to the output of decoder layer ``N`` counted
from 0 — the same index this project's profiles use (``offset.N``), and the same as repeng's layer ids.
llama.cpp never steers layer 0 (it rejects a ``direction.0`` tensor), so exporting a profile that
steers layer 0 is refused. Our own metadata (name, fingerprint, provenance, …) travels in extra
``rahf.*`` keys that other readers ignore, so a round trip keeps it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .errors import ProfileError, ProfileFormatError, ProfileLayerError, ProfileShapeError
from .profile import ModelFingerprint, Profile

ARCH = "controlvector"
_DIRECTION = re.compile(r"^direction\.(\d+)$")
_META_KEY = "rahf.profile"


def is_gguf(data: bytes) -> bool:
    return data[:4] == b"GGUF"


def write_control_vector(profile: Profile, *, model_hint: str | None = None) -> bytes:
    """Encode `profile` as a GGUF control vector (float32 `direction.N` tensors)."""
    import gguf

    if 0 in profile.offsets:
        raise ProfileLayerError(
            f"profile {profile.name!r} steers layer 0, which GGUF control vectors cannot carry "
            "(llama.cpp rejects direction.0); drop that layer before exporting"
        )
    if profile.low_rank:
        raise ProfileFormatError(
            f"profile {profile.name!r} has low-rank (input-dependent) terms at layers {sorted(profile.low_rank)}, "
            "which GGUF control vectors cannot carry (they hold one constant offset per layer); serve it from "
            "the safetensors file instead"
        )
    if profile.condition is not None:
        raise ProfileFormatError(
            f"profile {profile.name!r} has a condition (a probe at layer {profile.condition.layer} that decides "
            "whether it acts); a GGUF control vector has no way to carry one: serve the safetensors file"
        )
    if profile.lora:
        raise ProfileFormatError(
            f"profile {profile.name!r} has LoRA terms of attention projections at layers {sorted(profile.lora)}, "
            "which GGUF control vectors cannot carry (they hold one constant offset per layer); serve it from "
            "the safetensors file instead"
        )
    hint = model_hint or (profile.fingerprint.architecture if profile.fingerprint else "llama")
    meta = profile.metadata()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "profile.gguf"
        writer = gguf.GGUFWriter(path, ARCH)
        writer.add_string(f"{ARCH}.model_hint", hint)
        writer.add_uint32(f"{ARCH}.layer_count", len(profile.offsets))
        writer.add_string(_META_KEY, json.dumps(meta, sort_keys=True))
        for layer, offset in profile.offsets.items():
            writer.add_tensor(f"direction.{layer}", offset.numpy().astype(np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return path.read_bytes()


def read_profile(data: bytes, *, name: str | None = None, source: str = "<bytes>") -> Profile:
    """Read a profile from safetensors or GGUF control-vector bytes; rename it to `name` when given."""
    if is_gguf(data):
        return read_control_vector(data, name=name or "imported", source=source)
    profile = Profile.from_bytes(data, source=source)
    return profile if name is None or profile.name == name else profile.renamed(name)


def read_control_vector(data: bytes, *, name: str, source: str = "<bytes>") -> Profile:
    """Decode a GGUF control vector into a Profile named `name` (our metadata wins where present)."""
    import gguf

    if not is_gguf(data):
        raise ProfileFormatError(f"{source}: not a GGUF file")
    fd, tmp = tempfile.mkstemp(suffix=".gguf")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        try:
            reader = gguf.GGUFReader(tmp)
            offsets, meta = _decode(reader, source)
        except ProfileError:  # a readable file with content we refuse: its own message
            raise
        except Exception as exc:  # any failure of the third-party parser on untrusted bytes
            raise ProfileFormatError(f"{source}: unreadable GGUF control vector ({exc}); truncated?") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
    if not offsets:
        raise ProfileFormatError(f"{source}: GGUF file has no direction.N tensors; not a control vector")
    fingerprint = meta.get("fingerprint") or ""
    try:
        return Profile(
            name=name,
            offsets=offsets,
            description=meta.get("description", f"imported GGUF control vector {source}"),
            fingerprint=ModelFingerprint.from_json(fingerprint) if fingerprint else None,
            default_strength=float(meta.get("default_strength", "1.0")),
            position_mode=meta.get("position_mode", "all"),
            method=meta.get("method", "gguf-control-vector"),
            provenance=json.loads(meta.get("provenance") or "{}"),
            created=float(meta.get("created", "0")) or time.time(),
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise ProfileFormatError(f"{source}: malformed rahf metadata in GGUF ({exc})") from exc


def _decode(reader: object, source: str) -> tuple[dict[int, torch.Tensor], dict[str, str]]:
    fields = reader.fields  # type: ignore[attr-defined]
    arch_field = fields.get("general.architecture")
    if arch_field is None or _field_string(arch_field) != ARCH:
        raise ProfileFormatError(f"{source}: GGUF file is not a control vector (general.architecture != {ARCH})")
    meta: dict[str, str] = {}
    if _META_KEY in fields:
        meta = json.loads(_field_string(fields[_META_KEY]))
    offsets: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:  # type: ignore[attr-defined]
        match = _DIRECTION.match(tensor.name)
        if not match:
            continue
        data = np.asarray(tensor.data)
        if not np.issubdtype(data.dtype, np.floating):
            raise ProfileFormatError(f"{source}: tensor {tensor.name!r} is {data.dtype}; directions are floating point")
        if data.squeeze().ndim != 1:
            raise ProfileShapeError(f"{source}: tensor {tensor.name!r} has shape {data.shape}, expected 1-D")
        offsets[int(match.group(1))] = torch.from_numpy(data.astype(np.float32).reshape(-1).copy())
    return offsets, meta


def _field_string(field: object) -> str:
    parts = field.parts  # type: ignore[attr-defined]
    return bytes(parts[field.data[0]]).decode("utf-8")  # type: ignore[attr-defined]
