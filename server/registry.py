"""The profile store: a directory of profile files that is the source of truth for every replica.

Knows file names, upload formats (profile safetensors or a GGUF control vector), validation against
the loaded model's fingerprint, atomic writes, content digests and thread-safe snapshots. The directory
is read, not remembered: a request that names a profile checks its file (one `stat`) and loads it
when it is new or changed, or forgets it when it is gone, so a file written, replaced or deleted by
another replica or by hand is seen at the next request (`lookup`); `rescan` brings the whole listing up
to date (the file watcher and the listing routes call it). Files are only ever replaced by a rename,
so a reader sees the old file or the new one, never half of one; a file that changes while it is read
is read again.

A snapshot is immutable, so a request that took its profiles from one keeps them even when a profile is
replaced or deleted. Knows nothing about HTTP (errors are the library's typed errors) or generation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from steering_vectors.core.errors import ProfileError
from steering_vectors.core.gguf_io import read_profile
from steering_vectors.core.profile import ModelFingerprint, Profile, atomic_write, validate_name

log = logging.getLogger(__name__)

SUFFIX = ".safetensors"
# the file that provides a profile when both exist: an upload writes the .safetensors file first and
# removes the .gguf one after, so the new file wins from the moment it lands
SUFFIXES = (SUFFIX, ".gguf")
# what steering_vectors.core.profile.atomic_write leaves behind when the process dies mid-write: removed at the
# next load once older than this (a write in progress, by this or another process, takes milliseconds)
STALE_TEMP_S = 600.0
_READ_TRIES = 3

Stamp = tuple[int, int, int, int, int]  # device, inode, size, mtime_ns, ctime_ns: changes with any write


def _stamp(st: os.stat_result) -> Stamp:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def content_digest(data: bytes) -> str:
    """The digest of a profile file's bytes, as the API reports it."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class ProfileNotFoundError(KeyError):
    """No profile of that name is loaded."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"profile {self.name!r} is not loaded"


class ProfileStoreReadOnlyError(Exception):
    """This replica does not write the profile store (uploads are turned off)."""

    def __str__(self) -> str:
        return ("this server serves its profile directory read-only (profile_uploads is off): upload, replace "
                "and delete profiles through the replica or job that writes the directory")


@dataclass(frozen=True)
class SkippedFile:
    path: str  # the file's name in the profile directory (API answers carry no server paths)
    reason: str


@dataclass(frozen=True)
class Entry:
    """A loaded profile, the digest of the bytes it was read from, and the file it came from."""

    profile: Profile
    digest: str
    file: str | None = None  # its file name in the directory (None: memory only)
    stamp: Stamp | None = field(default=None, compare=False)


@dataclass(frozen=True)
class State:
    """One consistent view: profiles, their digests and the files skipped, swapped as a whole."""

    entries: Mapping[str, Entry]
    profiles: Mapping[str, Profile]
    skipped: tuple[SkippedFile, ...] = ()

    @classmethod
    def of(cls, entries: dict[str, Entry], skipped: Iterable[SkippedFile]) -> State:
        ordered = dict(sorted(entries.items()))
        return cls(MappingProxyType(ordered), MappingProxyType({k: e.profile for k, e in ordered.items()}),
                   tuple(sorted(skipped, key=lambda s: s.path)))

    def digest(self, name: str) -> str | None:
        entry = self.entries.get(name)
        return entry.digest if entry is not None else None


def parse_profile(data: bytes, *, name: str, source: str | None = None) -> Profile:
    """Read a profile (safetensors or GGUF control vector) and give it `name`."""
    return read_profile(data, name=name, source=source or f"upload {name!r}")


def _valid_name(name: str) -> bool:
    try:
        validate_name(name)
    except ProfileError:
        return False
    return True


class ProfileRegistry:
    """Profiles by name, backed by `directory` (or memory only when it is None).

    `writable=False`: a replica that reads a directory another process writes; `put` and `delete` raise
    ProfileStoreReadOnlyError and nothing in the directory is created or removed.
    """

    def __init__(
        self,
        directory: Path | None,
        fingerprint: ModelFingerprint,
        *,
        check_digest: bool = True,
        writable: bool = True,
    ) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint = fingerprint
        self.check_digest = check_digest
        self.writable = writable
        self._lock = threading.RLock()
        self._state = State.of({}, ())
        self._bad: dict[str, tuple[Stamp, SkippedFile]] = {}  # unchanged bad files are not parsed again
        self.loaded = False

    # -- reading ------------------------------------------------------------------------------------

    def state(self) -> State:
        """The current view (what was last read; `lookup` and `rescan` bring it up to date)."""
        return self._state

    def snapshot(self) -> Mapping[str, Profile]:
        """An immutable view of the profiles now; later changes do not alter it."""
        return self._state.profiles

    @property
    def skipped(self) -> list[SkippedFile]:
        return list(self._state.skipped)

    def get(self, name: str) -> Profile:
        """The profile `name` as its file is now (loaded on a miss); ProfileNotFoundError if there is none."""
        try:
            return self.lookup([name]).profiles[name]
        except KeyError:
            raise ProfileNotFoundError(name) from None

    def entry(self, name: str) -> Entry:
        try:
            return self.lookup([name]).entries[name]
        except KeyError:
            raise ProfileNotFoundError(name) from None

    def digest(self, name: str) -> str:
        return self.entry(name).digest

    def names(self) -> list[str]:
        return list(self._state.profiles)

    def lookup(self, names: Iterable[str]) -> State:
        """A view in which each of `names` is as its file is now: loaded on a miss, reloaded when its file
        changed, gone when its file is. Costs one `stat` per name and file suffix when nothing changed."""
        state = self._state
        if self.directory is None:
            return state
        stale = []
        for name in dict.fromkeys(names):
            if not _valid_name(name):
                continue
            found = self._files_of(name)
            entry = state.entries.get(name)
            if not found:
                if entry is not None or self._bad_files_of(name):
                    stale.append(name)
            elif entry is None or entry.file != found[0][0].name or entry.stamp != _stamp(found[0][1]):
                stale.append(name)
        if not stale:
            return state
        with self._lock:
            entries = dict(self._state.entries)
            skipped = {s.path: s for s in self._state.skipped}
            for name in stale:
                self._refresh(name, self._files_of(name), entries, skipped, reread=False)
            self._state = State.of(entries, skipped.values())
            return self._state

    # -- loading ------------------------------------------------------------------------------------

    def load_directory(self) -> list[SkippedFile]:
        """(Re)read every profile file in the directory; bad files are logged and skipped."""
        return self._scan(reread=True)

    def rescan(self) -> list[SkippedFile]:
        """Bring the view up to date with the directory, reading only files that changed."""
        return self._scan(reread=False)

    def _scan(self, *, reread: bool) -> list[SkippedFile]:
        with self._lock:
            entries: dict[str, Entry] = {}
            skipped: dict[str, SkippedFile] = {}
            if self.directory is not None:
                files: dict[str, list[tuple[Path, os.stat_result]]] = {}
                if not self.directory.is_dir():
                    if self.writable:
                        log.warning("profile directory %s does not exist: creating it empty", self.directory)
                        self.directory.mkdir(parents=True, exist_ok=True)
                    elif not self.loaded:
                        log.warning("profile directory %s does not exist (yet): no profiles", self.directory)
                paths = sorted(self.directory.iterdir()) if self.directory.is_dir() else []
                for path in paths:
                    if path.name.startswith(".") and path.name.endswith(".tmp"):
                        if self.writable:
                            self._remove_stale(path)
                        continue
                    if path.name.startswith(".") or path.suffix not in SUFFIXES:
                        continue
                    try:
                        st = path.stat()
                    except FileNotFoundError:
                        continue  # deleted while listed
                    except OSError as exc:
                        skipped[path.name] = self._skip(path, f"{path.name}: cannot read it ({exc.strerror})", exc)
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        continue
                    try:
                        validate_name(path.stem)
                    except ProfileError as exc:
                        skipped[path.name] = self._skip(path, str(exc), exc)
                        continue
                    files.setdefault(path.stem, []).append((path, st))
                previous = self._state.entries
                for name, found in files.items():
                    found.sort(key=lambda item: SUFFIXES.index(item[0].suffix))
                    if name in previous:
                        entries[name] = previous[name]
                    self._refresh(name, found, entries, skipped, reread=reread)
                self._bad = {k: v for k, v in self._bad.items() if k in skipped}
            else:
                entries = dict(self._state.entries)
            old = self._state
            self._state = State.of(entries, skipped.values())
            if not self.loaded or reread:
                log.info("loaded %d profiles (%d skipped)", len(entries), len(skipped))
            else:
                self._log_changes(old, self._state)
            self.loaded = True
            return list(self._state.skipped)

    @staticmethod
    def _log_changes(old: State, new: State) -> None:
        for name in new.entries.keys() - old.entries.keys():
            log.info("profile %s appeared in the directory (%s)", name, new.entries[name].digest)
        for name in old.entries.keys() - new.entries.keys():
            log.info("profile %s left the directory", name)
        for name in new.entries.keys() & old.entries.keys():
            if new.entries[name].digest != old.entries[name].digest:
                log.info("profile %s changed in the directory (%s)", name, new.entries[name].digest)

    def _files_of(self, name: str) -> list[tuple[Path, os.stat_result]]:
        """The regular files that could provide profile `name`, the one that does first."""
        assert self.directory is not None
        found = []
        for suffix in SUFFIXES:
            path = self.directory / f"{name}{suffix}"
            try:
                st = path.stat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append((path, st))
        return found

    def _bad_files_of(self, name: str) -> list[str]:
        return [f"{name}{suffix}" for suffix in SUFFIXES if f"{name}{suffix}" in self._bad]

    def _refresh(
        self,
        name: str,
        found: list[tuple[Path, os.stat_result]],
        entries: dict[str, Entry],
        skipped: dict[str, SkippedFile],
        *,
        reread: bool,
    ) -> None:
        """Update `entries` and `skipped` for profile `name`, whose files are `found` (preferred first)."""
        for suffix in SUFFIXES:
            skipped.pop(f"{name}{suffix}", None)
        previous = entries.pop(name, None)
        if not found:
            for file in self._bad_files_of(name):
                self._bad.pop(file, None)
            return
        (path, st), others = found[0], found[1:]
        for other, _ in others:
            skipped[other.name] = self._skip(
                other, f"{other.name}: another file ({path.name}) already provides profile {name!r}", None)
        stamp = _stamp(st)
        if not reread and previous is not None and previous.file == path.name and previous.stamp == stamp:
            entries[name] = previous
            return
        bad = self._bad.get(path.name)
        if not reread and bad is not None and bad[0] == stamp:
            skipped[path.name] = bad[1]
            return
        try:
            data, stamp = self._read(path)
            digest = content_digest(data)
            if previous is not None and previous.digest == digest:
                profile = previous.profile
            else:
                profile = parse_profile(data, name=name, source=path.name)
                profile.validate_for(self.fingerprint, check_digest=self.check_digest)
        except ProfileError as exc:
            skip = self._skip(path, str(exc), exc)
        except FileNotFoundError:
            return  # deleted while it was read: gone
        except OSError as exc:
            skip = self._skip(path, f"{path.name}: cannot read it ({exc.strerror})", exc)
        else:
            self._bad.pop(path.name, None)
            entries[name] = Entry(profile, digest, path.name, stamp)
            return
        skipped[path.name] = skip
        self._bad[path.name] = (stamp, skip)

    @staticmethod
    def _read(path: Path) -> tuple[bytes, Stamp]:
        """The file's bytes and the stamp they belong to. A file replaced by a rename is read whole from
        the inode that was opened; one written in place while it is read is read again."""
        for _ in range(_READ_TRIES):
            with path.open("rb") as handle:
                before = _stamp(os.fstat(handle.fileno()))
                data = handle.read()
                after = _stamp(os.fstat(handle.fileno()))
            if before == after and len(data) == after[2]:
                return data, after
            time.sleep(0.02)
        return data, after  # still changing: parsed as it is; the next change is read again

    @staticmethod
    def _skip(path: Path, reason: str, exc: BaseException | None) -> SkippedFile:
        log.warning("skipping profile file %s: %s", path, exc if exc is not None else reason)
        return SkippedFile(path.name, reason)

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
        if not self.writable:
            raise ProfileStoreReadOnlyError
        validate_name(name)
        profile = parse_profile(data, name=name)
        profile.validate_for(self.fingerprint, check_digest=self.check_digest)
        stored = profile.to_bytes()
        with self._lock:
            entries = dict(self._state.entries)
            skipped = {s.path: s for s in self._state.skipped}
            if self.directory is not None:
                created = not self._files_of(name)
                path = atomic_write(self.directory / f"{name}{SUFFIX}", stored)
                (self.directory / f"{name}.gguf").unlink(missing_ok=True)
                entry = Entry(profile, content_digest(stored), path.name, _stamp(path.stat()))
                for suffix in SUFFIXES:
                    skipped.pop(f"{name}{suffix}", None)
                    self._bad.pop(f"{name}{suffix}", None)
            else:
                created = name not in entries
                entry = Entry(profile, content_digest(stored))
            entries[name] = entry
            self._state = State.of(entries, skipped.values())
        log.info("profile %s %s (%s)", name, "added" if created else "replaced", entry.digest)
        return profile, created

    def delete(self, name: str) -> Profile | None:
        """Remove profile `name` (its files). Returns the profile as it was loaded here, if it was."""
        if not self.writable:
            raise ProfileStoreReadOnlyError
        with self._lock:
            entries = dict(self._state.entries)
            removed = entries.pop(name, None)
            if self.directory is not None:
                found = self._files_of(name)
                for path, _ in found:
                    path.unlink(missing_ok=True)
                skipped = [s for s in self._state.skipped if s.path not in {f"{name}{x}" for x in SUFFIXES}]
                self._state = State.of(entries, skipped)
                if not found:
                    raise ProfileNotFoundError(name)
            else:
                if removed is None:
                    raise ProfileNotFoundError(name)
                self._state = State.of(entries, self._state.skipped)
        log.info("profile %s deleted", name)
        return removed.profile if removed is not None else None
