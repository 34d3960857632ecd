"""Prometheus metrics of one app: requests by status, tokens, latency, time to first token, queue depth,
requests per profile.

Knows metric names and labels; each app gets its own registry so several apps can live in one process
(tests). Knows nothing about what produces the numbers: the middleware, the serving layer and the
engine's `stats()` feed them.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 - re-exported
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rahf_requests", "HTTP requests by route and status", ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "rahf_request_latency_seconds", "Time from request to the end of its response", ["route"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.ttft = Histogram(
            "rahf_time_to_first_token_seconds", "Time from admission to the first generated token",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.tokens = Counter("rahf_tokens", "Tokens processed", ["kind"], registry=self.registry)
        self.profile_requests = Counter(
            "rahf_profile_requests", "Generation requests per steering profile", ["profile"],
            registry=self.registry,
        )
        self.queue = Gauge("rahf_engine_requests", "Engine requests by state", ["state"], registry=self.registry)
        self.profiles_loaded = Gauge("rahf_profiles_loaded", "Profiles loaded", registry=self.registry)
        self._stats: Callable[[], dict[str, int]] | None = None
        self._profiles: Callable[[], int] | None = None

    def bind(self, stats: Callable[[], dict[str, int]], profiles: Callable[[], int]) -> None:
        """Read the engine's queue and the registry's size at every scrape."""
        self._stats, self._profiles = stats, profiles

    def render(self) -> bytes:
        if self._stats is not None:
            for state, value in self._stats().items():
                self.queue.labels(state=state).set(value)
        if self._profiles is not None:
            self.profiles_loaded.set(self._profiles())
        return generate_latest(self.registry)
