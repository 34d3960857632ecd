"""The profile store: a directory of profile files, loaded, replaced and removed at run time.

Knows file names, upload formats (profile safetensors or a GGUF control vector), validation against
the loaded model's fingerprint, atomic writes and thread-safe snapshots. A snapshot is an immutable
mapping, so a request that took its profiles from one keeps them even when a profile is replaced or
deleted. Knows nothing about HTTP (errors are the library's typed errors) or generation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from steering_vectors.errors import ProfileError, ProfileFormatError
from steering_vectors.gguf_io import read_profile
from steering_vectors.profile import ModelFingerprint, Profile, atomic_write, validate_name

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
# what steering_vectors.profile.atomic_write leaves behind when the process dies mid-write: removed at the
# next load once older than this (a write in progress, by this or another process, takes milliseconds)
STALE_TEMP_S = 600.0


class ProfileNotFoundError(KeyError):
    """No profile of that name is loaded."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"profile {self.name!r} is not loaded"


@dataclass(frozen=True)
class SkippedFile:
    path: str  # the file's name in the profile directory (API answers carry no server paths)
    reason: str


def parse_profile(data: bytes, *, name: str, source: str | None = None) -> Profile:
    """Read a profile (safetensors or GGUF control vector) and give it `name`."""
    return read_profile(data, name=name, source=source or f"upload {name!r}")


class ProfileRegistry:
    """Profiles by name, backed by `directory` (or memory only when it is None)."""

    def __init__(
        self, directory: Path | None, fingerprint: ModelFingerprint, *, check_digest: bool = True
    ) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint = fingerprint
        self.check_digest = check_digest
        self._lock = threading.Lock()
        self._profiles: Mapping[str, Profile] = MappingProxyType({})
        self.skipped: list[SkippedFile] = []
        self.loaded = False

    # -- reading ------------------------------------------------------------------------------------

    def snapshot(self) -> Mapping[str, Profile]:
        """An immutable view of the profiles now; later changes do not alter it."""
        return self._profiles

    def get(self, name: str) -> Profile:
        try:
            return self._profiles[name]
        except KeyError:
            raise ProfileNotFoundError(name) from None

    def names(self) -> list[str]:
        return sorted(self._profiles)

    # -- loading ------------------------------------------------------------------------------------

    def load_directory(self) -> list[SkippedFile]:
        """(Re)load every profile file in the directory; bad files are logged and skipped."""
        profiles: dict[str, Profile] = {}
        skipped: list[SkippedFile] = []
        if self.directory is not None:
            if not self.directory.is_dir():
                log.warning("profile directory %s does not exist: creating it empty", self.directory)
            self.directory.mkdir(parents=True, exist_ok=True)
            for path in sorted(self.directory.iterdir()):
                if path.name.startswith(".") and path.name.endswith(".tmp"):
                    self._remove_stale(path)
                    continue
                if path.name.startswith(".") or path.suffix not in (SUFFIX, ".gguf") or not path.is_file():
                    continue
                try:
                    name = validate_name(path.stem)
                    if name in profiles:
                        raise ProfileFormatError(f"another file already provides profile {name!r}")
                    profile = parse_profile(path.read_bytes(), name=name, source=path.name)
                    profiles[name] = profile.validate_for(self.fingerprint, check_digest=self.check_digest)
                except ProfileError as exc:
                    skipped.append(SkippedFile(path.name, str(exc)))
                    log.warning("skipping profile file %s: %s", path, exc)
                except OSError as exc:
                    skipped.append(SkippedFile(path.name, f"{path.name}: cannot read it ({exc.strerror})"))
                    log.warning("skipping profile file %s: %s", path, exc)
        with self._lock:
            self._profiles = MappingProxyType(profiles)
            self.skipped = skipped
            self.loaded = True
        log.info("loaded %d profiles (%d skipped)", len(profiles), len(skipped))
        return skipped

    @staticmethod
    def _remove_stale(path: Path) -> None:
        try:
            if time.time() - path.stat().st_mtime > STALE_TEMP_S:
                path.unlink()
                log.info("removed %s, left by an interrupted profile write", path)
        except OSError:
            pass

    # -- changing -----------------------------------------------------------------------------------

    def put(self, name: str, data: bytes) -> tuple[Profile, bool]:
        """Validate `data` as profile `name`, store it and make it visible. Returns (profile, created).

        Nothing on disk changes unless the upload is valid for the loaded model.
        """
        validate_name(name)
        profile = parse_profile(data, name=name)
        profile.validate_for(self.fingerprint, check_digest=self.check_digest)
        with self._lock:
            created = name not in self._profiles
            if self.directory is not None:
                atomic_write(self.directory / f"{name}{SUFFIX}", profile.to_bytes())
                stale = self.directory / f"{name}.gguf"
                stale.unlink(missing_ok=True)
            updated = dict(self._profiles)
            updated[name] = profile
            self._profiles = MappingProxyType(updated)
        log.info("profile %s %s", name, "added" if created else "replaced")
        return profile, created

    def delete(self, name: str) -> Profile:
        with self._lock:
            if name not in self._profiles:
                raise ProfileNotFoundError(name)
            if self.directory is not None:
                for suffix in (SUFFIX, ".gguf"):
                    (self.directory / f"{name}{suffix}").unlink(missing_ok=True)
            updated = dict(self._profiles)
            removed = updated.pop(name)
            self._profiles = MappingProxyType(updated)
        log.info("profile %s deleted", name)
        return removed
