"""Keeps a replica's view of the profile directory current without requests: file events, then a rescan.

Watches the directory with `watchfiles` (inotify and its kin) and rescans it at each change and every
`rescan_s` seconds besides, which is all there is on file systems that deliver no events (NFS and most
network volumes: there the interval bounds how long the listings lag; requests that name a profile
never lag, the registry checks the file on each). Runs in one daemon thread; a failure of the watcher
falls back to the timer alone. Knows nothing about HTTP.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from .registry import SUFFIXES, ProfileRegistry

log = logging.getLogger(__name__)


def _profile_file(_change: object, path: str) -> bool:
    return Path(path).suffix in SUFFIXES and not Path(path).name.startswith(".")


class ProfileWatcher:
    def __init__(self, registry: ProfileRegistry, *, rescan_s: float, events: bool = True) -> None:
        assert registry.directory is not None
        self.registry = registry
        self.directory: Path = registry.directory
        self.rescan_s = rescan_s
        self.events = events
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rescans = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="profile-watcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _rescan(self) -> None:
        try:
            self.registry.rescan()
        except Exception as exc:  # a store that cannot be read now: keep the last view, try again later
            log.warning("profile directory rescan failed: %s", exc)
        self.rescans += 1

    def _run(self) -> None:
        warned = False
        while not self._stop.is_set():
            if self.events and self.directory.is_dir():
                try:
                    self._watch()
                    return  # stopped
                except Exception as exc:
                    if not warned:
                        log.warning("no file events for the profile directory (%s): rescanning every %gs",
                                    exc, self.rescan_s)
                        warned = True
            if self._stop.wait(self.rescan_s):
                return
            self._rescan()

    def _watch(self) -> None:
        import watchfiles

        timeout_ms = max(1, int(self.rescan_s * 1000))
        for _changes in watchfiles.watch(
            self.directory, watch_filter=_profile_file, debounce=50, step=20, stop_event=self._stop,
            rust_timeout=timeout_ms, yield_on_timeout=True, recursive=False, raise_interrupt=False,
            ignore_permission_denied=True,
        ):
            self._rescan()
