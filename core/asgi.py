"""The ASGI types every route uses, the one ASGI body reader, and the bound on a uvicorn server's graceful stop
(``bound_uvicorn``; ``ShutdownBound``, an API worker's requests in flight after SIGTERM)."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from core.errors import RequestError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

BACKSTOP_S = 1.0  # after the bound, uvicorn cancels whatever is left


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


class ShutdownBound:
    """An API worker's requests in flight, bounded by SHUTDOWN_TIMEOUT_S once SIGTERM has arrived.

    Without a bound, uvicorn waits for every request to end: an upload stalled mid-body holds the worker until
    REQUEST_TIMEOUT_S (60 s by default), past Kubernetes' 30 s before SIGKILL. Once SIGTERM arrives, each request's
    deadline becomes the earlier of its own and the shutdown's; a request still running then is answered with the
    contract's JSON 503 (its connection then closes: uvicorn stops keep-alive during shutdown). uvicorn's own graceful
    timeout is set a moment later as a backstop for requests BentoML's routes hold.
    """

    def __init__(self) -> None:
        self.bound_s: float | None = None
        self._stop_at: float | None = None  # loop time at which requests still running get 503
        self._deadlines: set[asyncio.Timeout] = set()

    def bounded(self, timeout_s: float) -> Bounded:
        """``async with`` it: run the body within ``timeout_s`` (TimeoutError) and within the shutdown's bound once one
        has begun (RequestError 503). On the API worker's event loop."""
        when = asyncio.get_running_loop().time() + timeout_s
        if self._stop_at is not None:
            when = min(when, self._stop_at)
        return Bounded(self, asyncio.Timeout(when))

    def stop_within(self, bound_s: float) -> None:
        """On the event loop, at SIGTERM: every request running now or later ends within ``bound_s``."""
        loop = asyncio.get_running_loop()
        self.bound_s = bound_s
        self._stop_at = loop.time() + bound_s
        for deadline in self._deadlines:
            when = deadline.when()
            if when is None or when > self._stop_at:
                deadline.reschedule(self._stop_at)

    def install(self, bound_s: float) -> bool:
        """Wrap the server's SIGTERM handler. Call in the API worker's main thread, on its running event loop,
        after uvicorn installed its handler (BentoML builds the service then); False when it cannot."""
        if threading.current_thread() is not threading.main_thread():
            return False
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return False
        loop = asyncio.get_running_loop()

        def bounded_exit(signum: int, frame: Any) -> None:
            bound_uvicorn(previous, bound_s + BACKSTOP_S)
            loop.call_soon_threadsafe(self.stop_within, bound_s)
            previous(signum, frame)

        signal.signal(signal.SIGTERM, bounded_exit)
        return True


class Bounded:
    """One request's deadline under a ``ShutdownBound`` (``asyncio.Timeout`` underneath). A class rather than an
    ``asynccontextmanager``: entered once per request, the generator's machinery cost ~3x as much (docs/performance.md,
    section 21)."""

    __slots__ = ("_deadline", "_owner")

    def __init__(self, owner: ShutdownBound, deadline: asyncio.Timeout) -> None:
        self._owner = owner
        self._deadline = deadline

    async def __aenter__(self) -> None:
        await self._deadline.__aenter__()
        self._owner._deadlines.add(self._deadline)

    async def __aexit__(self, kind: Any, error: Any, traceback: Any) -> bool | None:
        owner = self._owner
        owner._deadlines.discard(self._deadline)
        try:
            return await self._deadline.__aexit__(kind, error, traceback)
        except TimeoutError:
            if owner._stop_at is not None and asyncio.get_running_loop().time() >= owner._stop_at:
                raise RequestError(
                    503,
                    f"the service is shutting down; the request did not finish within {owner.bound_s:g} s "
                    "(SHUTDOWN_TIMEOUT_S)",
                ) from None
            raise


_SLASHES = re.compile(r"//+")
_RAW_SLASHES = re.compile(rb"//+")


def merge_slashes(app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """``app`` seeing each HTTP request's path (and ``raw_path``) with repeated slashes merged: ``//service_output``
    and ``/v2//models/x/infer`` reach the routes ``/service_output`` and ``/v2/models/x/infer``. Why: an Infernet node
    configured with a URL ending in ``/`` posts to ``//service_output``, and the Quart original answered it (Werkzeug
    merges slashes). Nothing else changes: a trailing slash stays (``/info/`` is still not ``/info``), the query
    string is separate and kept. On the server's event loop; raises what ``app`` raises."""

    async def merged(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and "//" in scope.get("path", ""):
            scope = {**scope, "path": _SLASHES.sub("/", scope["path"])}
            if isinstance(scope.get("raw_path"), bytes):
                scope["raw_path"] = _RAW_SLASHES.sub(b"/", scope["raw_path"])
        await app(scope, receive, send)

    return merged
