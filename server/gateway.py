"""Graceful stop: new work is refused with 503 while requests in flight (streams too) finish after SIGTERM.

sse-starlette, which frames the streamed completions, patches uvicorn's signal handler and ends every
open event stream the moment SIGTERM arrives, so a rolling update or `podman stop` cuts the answers
that are being generated even though uvicorn itself would wait for them. `keep_streams_open_on_shutdown`
turns that off (call it once, before uvicorn runs). `draining_server` then decides: on SIGTERM the app
answers new requests 503 while the ones in flight (streams included) finish, up to the shutdown timeout;
then uvicorn's graceful shutdown stops listening and cancels whatever is left when the time is up.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

log = logging.getLogger(__name__)


def keep_streams_open_on_shutdown() -> None:
    """Stop sse-starlette from ending open streams on SIGTERM (process-wide; idempotent)."""
    from sse_starlette.sse import AppStatus

    AppStatus.disable_automatic_graceful_drain()


def draining_server(config: Any, app: Any, timeout_s: float) -> Any:
    """A uvicorn server that drains before it stops: on the first SIGTERM (or SIGINT) the app is marked
    draining, so `/readyz` and new API requests answer 503 with `Retry-After` (a gateway or a Kubernetes
    Service moves traffic elsewhere instead of hitting a closed port), while the listening socket stays
    open and the requests that arrived before the signal run to their end. Once none is left, or after
    `timeout_s`, uvicorn's own graceful shutdown runs (stop listening, close connections, cancel what is
    left once the remaining time is up, the app's shutdown) and the process exits by the signal it got. A
    second signal stops at once, as plain uvicorn does."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        drain_deadline: float | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            if self.drain_deadline is None and not self.should_exit:
                getattr(self, "_captured_signals", []).append(sig)  # re-raised on exit, as uvicorn does
                self.drain_deadline = time.monotonic() + timeout_s
                app.state.draining = True
                return
            super().handle_exit(sig, frame)

        async def on_tick(self, counter: int) -> bool:
            if self.drain_deadline is not None and not self.should_exit:
                now = time.monotonic()
                in_flight = app.state.in_flight.before_drain
                if counter % 50 == 0 or in_flight == 0:
                    log.info("draining: %d requests in flight, %.0fs left", in_flight, self.drain_deadline - now)
                if in_flight == 0 or now >= self.drain_deadline:
                    # what is left of the budget bounds uvicorn's own wait (0 would mean "cancel at once")
                    self.config.timeout_graceful_shutdown = max(1, math.ceil(self.drain_deadline - now))
                    self.should_exit = True
            return await super().on_tick(counter)

    return DrainingServer(config)
