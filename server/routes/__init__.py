"""Thin FastAPI routers: parse, call the serving layer or the registry, wrap the result.

Knows paths, methods and response framing (JSON or server-sent events); everything else lives in
`serving`, `registry`, `auth` and `errors`.
"""
