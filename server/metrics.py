"""Prometheus metrics of one app: requests by status, tokens, latency, time to first token, queue depth,
requests per profile.

Knows metric names and labels (every sample carries `model_name`, as vLLM's do); each app gets its own
registry so several apps can live in one process (tests). Knows nothing about what produces the
numbers: the middleware, the serving layer and the engine's `stats()` feed them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: F401 - re-exported
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _ModelLabelled:
    """A metric whose every sample also carries `model_name` (the served model's name), so that call sites
    name only their own labels: `metrics.tokens.labels(kind="prompt").inc()`, `metrics.ttft.observe(s)`."""

    def __init__(self, metric: Any, owner: Metrics) -> None:
        self._metric = metric
        self._owner = owner

    def labels(self, **labels: str) -> Any:
        return self._metric.labels(model_name=self._owner.model_name, **labels)

    def __getattr__(self, name: str) -> Any:  # inc, observe, set of a metric without labels of its own
        return getattr(self._metric.labels(model_name=self._owner.model_name), name)


class Metrics:
    def __init__(self, model_name: str = "") -> None:
        self.model_name = model_name  # set once the model is loaded (requests before that: empty)
        self.registry = CollectorRegistry()
        labelled = self._labelled
        self.requests = labelled(Counter(
            "rahf_requests", "HTTP requests by route and status", ["model_name", "route", "method", "status"],
            registry=self.registry,
        ))
        self.latency = labelled(Histogram(
            "rahf_request_latency_seconds", "Time from request to the end of its response", ["model_name", "route"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        ))
        self.ttft = labelled(Histogram(
            "rahf_time_to_first_token_seconds", "Time from admission to the first generated token", ["model_name"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        ))
        self.tokens = labelled(Counter("rahf_tokens", "Tokens processed", ["model_name", "kind"],
                                       registry=self.registry))
        self.profile_requests = labelled(Counter(
            "rahf_profile_requests", "Generation requests per steering profile", ["model_name", "profile"],
            registry=self.registry,
        ))
        self.conditions = labelled(Counter(
            "rahf_profile_conditions", "Conditional profiles decided on a request's prompt, by whether they fired",
            ["model_name", "profile", "fired"], registry=self.registry,
        ))
        self.queue = labelled(Gauge("rahf_engine_requests", "Engine requests by state", ["model_name", "state"],
                                    registry=self.registry))
        self.profiles_loaded = labelled(Gauge("rahf_profiles_loaded", "Profiles loaded", ["model_name"],
                                              registry=self.registry))
        self._stats: Callable[[], dict[str, int]] | None = None
        self._profiles: Callable[[], int] | None = None

    def _labelled(self, metric: Any) -> Any:
        return _ModelLabelled(metric, self)

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
