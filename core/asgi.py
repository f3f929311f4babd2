"""The ASGI types every route uses, the one ASGI body reader, and the bound on a uvicorn server's graceful stop."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class ClientDisconnected(ConnectionError):
    """The client went away before its whole body arrived."""


class BodyTooLarge(Exception):
    """More than the reader's ``limit`` bytes arrived."""


async def read_body(receive: Receive, limit: int | None = None) -> bytes:
    """The request's body as sent (no Content-Encoding decoded), on the server's event loop. Raises
    ``ClientDisconnected``, and ``BodyTooLarge`` as soon as more than ``limit`` bytes (when given) have arrived."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected before sending the whole body")
        chunk = message.get("body", b"")
        if limit is not None:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def bound_uvicorn(handler: Any, seconds: float) -> None:
    """Make the uvicorn server whose SIGTERM handler ``handler`` is cancel the requests left ``seconds`` after its
    shutdown starts (``timeout_graceful_shutdown``; BentoML sets it only from ``bentoml serve
    --timeout-graceful-shutdown``, and by default uvicorn waits for ever). uvicorn reads it when its shutdown starts,
    after the handler has run. Any thread; does nothing for another handler."""
    config = getattr(getattr(handler, "__self__", None), "config", None)
    if config is not None and hasattr(config, "timeout_graceful_shutdown"):
        current = config.timeout_graceful_shutdown
        config.timeout_graceful_shutdown = seconds if current is None else min(current, seconds)
