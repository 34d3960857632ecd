"""Graceful stop for streams: let server-sent-event responses in flight finish after SIGTERM.

sse-starlette, which frames the streamed completions, patches uvicorn's signal handler and ends every
open event stream the moment SIGTERM arrives, so a rolling update or `podman stop` cuts the answers
that are being generated even though uvicorn itself would wait for them. `keep_streams_open_on_shutdown`
turns that off; uvicorn's graceful shutdown then decides: it stops accepting connections, waits up to
`timeout_graceful_shutdown` seconds for the responses in flight (streams included) and cancels what is
left after that. Call it once, before `uvicorn.run`.
"""

from __future__ import annotations


def keep_streams_open_on_shutdown() -> None:
    """Stop sse-starlette from ending open streams on SIGTERM (process-wide; idempotent)."""
    from sse_starlette.sse import AppStatus

    AppStatus.disable_automatic_graceful_drain()
