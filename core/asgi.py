"""The ASGI types every route uses, the one ASGI body reader, the bound on a uvicorn server's graceful stop
(``bound_uvicorn``; ``ShutdownBound``, an API worker's requests in flight after SIGTERM), and the public service's
outermost layers: ``merge_slashes`` and ``ContractErrors`` (every answer JSON in the contract's shape)."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import signal
import threading
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

import orjson

from core.errors import RequestError
from core.secrets import scrub

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

BACKSTOP_S = 1.0  # after the bound, uvicorn cancels whatever is left
_log = logging.getLogger("core.asgi")


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
        # The requests in their deadline now. One timer for all of them, due at or before the earliest deadline (it
        # is left armed when that request ends, and then looks again): a timer per request cost ~2 µs more on uvloop.
        self._running: dict[Bounded, None] = {}
        self._timer: asyncio.Handle | None = None
        self._timer_at = math.inf
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def bounded(self, timeout_s: float) -> Bounded:
        """``with`` it, inside a task: run the body within ``timeout_s`` (TimeoutError) and within the shutdown's bound
        once one has begun (RequestError 503). On the API worker's event loop."""
        loop = asyncio.get_running_loop()
        when = loop.time() + timeout_s
        if self._stop_at is not None and self._stop_at <= when:
            return Bounded(self, loop, self._stop_at, by_shutdown=True)
        return Bounded(self, loop, when)

    def stop_within(self, bound_s: float) -> None:
        """On the event loop, at SIGTERM: every request running now or later ends within ``bound_s``."""
        loop = asyncio.get_running_loop()
        self.bound_s = bound_s
        self._stop_at = stop_at = loop.time() + bound_s
        for deadline in self._running:
            if deadline.when > stop_at:
                deadline.when, deadline.by_shutdown = stop_at, True
        if self._running and stop_at < self._timer_at:
            self._arm(loop, stop_at)

    def _entered(self, deadline: Bounded) -> None:
        if deadline.loop is not self._timer_loop and self._timer_loop is not None:
            # A timer and requests left on another loop (one that has ended, its tasks never finished: tests run one
            # app on several) are not this loop's: cancelling a dead loop's task would fail in the timer.
            self._running = {kept: None for kept in self._running if kept.loop is deadline.loop}
            self._timer_at = math.inf
        self._running[deadline] = None
        if deadline.when < self._timer_at:
            self._arm(deadline.loop, deadline.when)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at, self._timer_loop = when, loop
        # As asyncio.Timeout: a deadline already passed fires on the next iteration of the loop.
        self._timer = loop.call_soon(self._expire_due) if when <= loop.time() else loop.call_at(when, self._expire_due)

    def _expire_due(self) -> None:
        """The timer: cancel every request whose deadline has come, and wait for the next one."""
        loop = self._timer_loop
        # Every deadline up to the one the timer was set for is due, even if the loop runs it a moment early (as a
        # timer of their own would have fired by now).
        due_at = max(loop.time(), self._timer_at)
        self._timer, self._timer_at = None, math.inf
        due = [deadline for deadline in self._running if deadline.when <= due_at]
        for deadline in due:
            del self._running[deadline]
            deadline.expire()
        if self._running:
            self._arm(loop, min(deadline.when for deadline in self._running))

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
    """One request's deadline under a ``ShutdownBound``: ``asyncio.Timeout``'s semantics (at ``when``, a loop time,
    the task is cancelled; that cancellation, and only that one, leaves the block as TimeoutError), as a plain
    context manager on its owner's one timer. Entered once per request: ``async with asyncio.Timeout`` inside an async
    context manager cost ~4.9 µs per request on uvloop, this ~1 µs (no coroutines, no timer of its own;
    docs/performance.md, sections 21 and 28). Raises RuntimeError outside a task."""

    __slots__ = ("_cancelling", "_expired", "_owner", "_task", "by_shutdown", "loop", "when")

    def __init__(
        self, owner: ShutdownBound, loop: asyncio.AbstractEventLoop, when: float, by_shutdown: bool = False
    ) -> None:
        self._owner = owner
        self.loop = loop
        self.when = when
        # Whether ``when`` is the shutdown's bound: read at the end, not the clock (uvloop's timers round to the
        # millisecond and may fire up to ~0.5 ms early, and a second SIGTERM moves the bound later).
        self.by_shutdown = by_shutdown
        self._expired = False

    def __enter__(self) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a request's deadline is entered inside a task")
        self._task = task
        self._cancelling = task.cancelling()  # cancellations asked before the block are not the deadline's
        self._owner._entered(self)

    def expire(self) -> None:
        """The deadline has come (``ShutdownBound``'s timer)."""
        self._expired = True
        self._task.cancel()

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        owner = self._owner
        owner._running.pop(self, None)
        # As asyncio.Timeout: the deadline's own cancellation is taken back whatever the block raised; it becomes
        # TimeoutError only when no other cancellation was asked meanwhile and the block ended by it.
        if self._expired and self._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
            if self.by_shutdown:
                raise RequestError(
                    503,
                    f"the service is shutting down; the request did not finish within {owner.bound_s:g} s "
                    "(SHUTDOWN_TIMEOUT_S)",
                ) from None
            raise TimeoutError from error


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


# Every answer the public service gives is JSON in the contract's shape: ``ContractErrors``, the outermost layer.

SHOWN_PATH_CHARS = 120  # a path quoted in an error description is cut here: a target may be MAX_HEADER_BYTES long
ERROR_BODY_BYTES = 64 * 1024  # an error body the layer rewrites is read this far for its words, the rest dropped
_PLAIN_WORDS_CHARS = 300  # a plain-text error body longer than this is not one line of words: the phrase is used
_REPLACED_HEADERS = frozenset({b"content-type", b"content-length", b"transfer-encoding", b"content-encoding"})

ErrorFor = Callable[[str, int, str], Any]  # (path, status, description) -> the JSON error body for that path
IsOwnError = Callable[[str, int, Any], bool]  # (path, status, decoded JSON body) -> already in the path's shape


def shown(path: str) -> str:
    """``path`` as an error description quotes it: at most SHOWN_PATH_CHARS characters, then how long it was."""
    if len(path) <= SHOWN_PATH_CHARS:
        return path
    return f"{path[:SHOWN_PATH_CHARS]}... ({len(path)} characters)"


class ContractErrors:
    """The public service's outermost ASGI layer: whatever the layers inside it answer, the client gets JSON.

    - Request targets that are not a path (``scope["path"]`` not starting with ``/``), which BentoML's router
      answered with a plain-text 404: ``OPTIONS *`` (RFC 9110, 9.3.7: a question about the server as a whole) goes
      to ``asterisk``, the public app, which answers 204 with every method served in ``Allow``; any other method
      with ``*`` (only OPTIONS takes it, RFC 9110, 7.1) and any other non-path target get 400.
    - Error answers (status 400 and up) that are not in the path's error shape, from BentoML's stack or the
      libraries it runs (Starlette's static files answer a bad ``Range`` in plain text, BentoML's own routes
      ``{"error": ...}``): rewritten into ``error_for``'s body with the same status, keeping the answer's words
      when it had one line of them. ``is_own_error`` recognises the bodies already right, which pass unchanged;
      the service's own answers (``{"code": "<status>", ...}``) are recognised from their first bytes, unparsed.
    - An application that raises before it answers, or returns without answering: a JSON 500, and the error is
      logged once (uvicorn sent ``Internal Server Error`` in plain text).

    On the API worker's event loop; a request on the happy path pays one status check in ``send``.
    """

    def __init__(self, app: Any, asterisk: Any, error_for: ErrorFor, is_own_error: IsOwnError) -> None:
        self.app = app
        self.asterisk = asterisk
        self.error_for = error_for
        self.is_own_error = is_own_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if not path.startswith("/"):
            if path == "*" and scope["method"] == "OPTIONS":
                return await self.asterisk(scope, receive, send)
            target = "*" if path == "*" else shown(path)
            why = "only OPTIONS takes the target *" if path == "*" else "the request target must be a path"
            return await self._error(send, path, 400, f"{why}; send {scope['method']} /<route>, got {target}")
        answer = _Answer(self, path, send)
        try:
            await self.app(scope, receive, answer.send)
        except Exception as e:
            if answer.state in (_Answer.NOT_STARTED, _Answer.HELD):  # nothing has gone out yet
                _log.exception("request to %s failed before its answer began", shown(path))
                return await self._error(send, path, 500, f"internal error: {type(e).__name__}; see the server log")
            if answer.state == _Answer.SENT:  # the inner layer answered (now in JSON) and then re-raised
                _log.exception("request to %s failed after its answer", shown(path))
                return
            raise  # part of an answer has gone out: uvicorn closes the connection
        if answer.state == _Answer.NOT_STARTED:
            _log.error("request to %s ended without an answer", shown(path))
            await self._error(send, path, 500, "internal error: the request ended without an answer")
        elif answer.state == _Answer.HELD:
            await answer.release()

    async def _error(self, send: Send, path: str, status: int, description: str) -> None:
        await _send_json(send, status, self.error_for(path, status, description), [(b"connection", b"close")])


class _Answer:
    """One request's ``send`` under ``ContractErrors``: answers below 400 pass straight through; an error answer is
    held until its body shows whether it is already JSON in the path's shape, then passed or rewritten."""

    NOT_STARTED, PASSING, HELD, SENT = range(4)
    __slots__ = ("_body", "_layer", "_path", "_send", "_start", "state")

    def __init__(self, layer: ContractErrors, path: str, send: Send) -> None:
        self._layer = layer
        self._path = path
        self._send = send
        self._start: dict[str, Any] | None = None
        self._body: list[bytes] = []
        self.state = self.NOT_STARTED

    async def send(self, message: dict[str, Any]) -> None:
        state = self.state
        if state == self.PASSING:
            return await self._send(message)
        kind = message["type"]
        if state == self.NOT_STARTED and kind == "http.response.start":
            if message["status"] < 400:
                self.state = self.PASSING
                return await self._send(message)
            self._start, self.state = message, self.HELD
            return None
        if state == self.HELD and kind == "http.response.body":
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            status = self._start["status"]
            if not self._body and not more and chunk.startswith(b'{"code":"%d"' % status):
                self.state = self.PASSING  # the service's own error, whole: as it is
                await self._send(self._start)
                return await self._send(message)
            if sum(map(len, self._body)) < ERROR_BODY_BYTES:
                self._body.append(chunk)
            if not more:
                await self.release()
            return None
        return await self._send(message)  # http.response.trailers and the like, after a passed answer

    async def release(self) -> None:
        """Send the held error answer: as it was when it is in the path's shape, else rewritten."""
        start, body = self._start, b"".join(self._body)[:ERROR_BODY_BYTES]
        self.state = self.SENT
        status, headers = start["status"], start.get("headers", [])
        content_type = next((value for name, value in headers if name.lower() == b"content-type"), b"")
        decoded = _json_or_none(body) if content_type.split(b";")[0].strip() == b"application/json" else None
        if decoded is not None and self._layer.is_own_error(self._path, status, decoded):
            await self._send(start)
            return await self._send({"type": "http.response.body", "body": body})
        description = scrub(_words(decoded, body) or f"{HTTPStatus(status).phrase}: {shown(self._path)}")
        kept = [(name, value) for name, value in headers if name.lower() not in _REPLACED_HEADERS]
        await _send_json(self._send, status, self._layer.error_for(self._path, status, description), kept)


def _json_or_none(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _words(decoded: Any, body: bytes) -> str | None:
    """The one line an error body says, if it says one: BentoML's ``{"error": ...}`` (or its ``[{"error": ...}]``),
    or short plain text."""
    if isinstance(decoded, list) and len(decoded) == 1:
        decoded = decoded[0]
    if isinstance(decoded, dict):
        words = next((decoded[k] for k in ("description", "error", "detail") if isinstance(decoded.get(k), str)), None)
        return words.strip() or None if words is not None else None
    if decoded is not None:
        return None
    text = body.decode("utf-8", "replace").strip()
    if not text or len(text) > _PLAIN_WORDS_CHARS or "\n" in text or text.lstrip().startswith("<"):
        return None
    return text


async def _send_json(send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]]) -> None:
    payload = orjson.dumps(body)
    start = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload)), *headers]
    if status == 503 and not any(name.lower() == b"retry-after" for name, _ in headers):
        start.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": payload})
