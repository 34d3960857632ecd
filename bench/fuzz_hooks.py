"""schemathesis hooks for bench/fuzz.py (loaded through SCHEMATHESIS_HOOKS).

A profile upload's body is a binary file whose validity JSON Schema cannot describe, so bytes drawn at
random for `PUT /v1/profiles/{name}` are never a profile and always get a 400. For the raw-body cases
schemathesis draws as valid (positive mode) this hook sends one of a few real profile files for the fuzz
model instead (RAHF_FUZZ_UPLOADS: a folder of them, written by bench/fuzz.py), so that the positive checks
and the stateful sequences (upload, read, replace, delete) test real uploads. Invalid (negative) cases
keep their bytes. Multipart bodies are left alone: schemathesis reuses some valid form bodies as
"negative" cases when it cannot make a form invalid, and a real profile there would be accepted, rightly.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import schemathesis
from schemathesis.core.parameters import ParameterLocation

_FOLDER = os.environ.get("RAHF_FUZZ_UPLOADS")
UPLOADS = [p.read_bytes() for p in sorted(Path(_FOLDER).iterdir())] if _FOLDER else []


def _pick(seed: object) -> bytes:
    digest = hashlib.sha256(repr(seed).encode("utf-8", "surrogatepass")).digest()
    return UPLOADS[digest[0] % len(UPLOADS)]


@schemathesis.hook
def map_case(context, case):
    operation = case.operation
    if not UPLOADS or operation.method.upper() != "PUT" or operation.path != "/v1/profiles/{name}":
        return case
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return case
    if any(component.mode.is_negative for component in meta.components.values()):
        return case
    if ParameterLocation.BODY not in meta.components:
        return case
    if case.media_type == "application/octet-stream" and isinstance(case.body, (bytes, bytearray, str)):
        case.body = _pick(case.body)
    return case
