"""The API worker's side of the hop to the runner: its waiting requests grouped into one call
(``RunnerCallBatcher``), and the client that sends the call, ``POST /infer``, in BentoML's pickle serde.

Grouping: the requests waiting in one API worker leave for the runner together, in one call. There is no timer: a
request is sent on the next turn of the event loop, so a lone request never waits. While ``max_inflight`` calls are
out, newcomers queue and leave together in the next call, so batches grow with load by themselves. One call per group
matters: each hop to the runner costs more than a small forward.

Four calls in flight, not two: with two, a worker whose calls were both in the model's batch had none waiting for
the next one, so the model started it without that worker's requests. With four, every worker keeps a call queued
behind the running batch: heavy c=64 batches grew from ~23 to ~31 requests and throughput by 8-15 %; eight was no
better (docs/performance.md, section 14).

Sending: BentoML's client for ``bentoml.depends`` builds each call through aiohttp, pydantic IO models of the
arguments and the answer, and OpenTelemetry context propagation: 40 % of a busy API worker's time with lone requests,
more than our own parsing and answer, all of it on each request's path (docs/performance.md, section 18). This client
sends the same bytes to the same address (the runner's URL from ``bentoml.depends``) over kept-alive connections, one
call per connection at a time, and reads the answer with httptools (uvicorn's parser). ``describe`` and the
readiness probe stay on BentoML's client: they are rare. On the runner, ``PickledCall`` (core/bentoml_seam.py)
answers it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlparse

import httptools

from core import bentoml_seam
from core.bentoml_seam import PICKLE
from core.errors import Outcome

# Sends the data of several requests to the runner in one call; one outcome per request, in order.
RunnerCall = Callable[[list[Any]], Awaitable[list[Outcome]]]


class RunnerCallBatcher:
    """One API worker's requests, sent to the runner in groups of at most ``max_items``, at most ``max_inflight``
    calls at a time. On the worker's event loop; a failed call fails every request of its group with its error."""

    def __init__(self, call: RunnerCall, max_items: int, max_inflight: int = 4) -> None:
        self._call = call
        # 1 when the runner's model runs every request alone: a call is answered once all its requests are done, so
        # each request is sent alone and answered when its own forward ends (PublicApp.runner_ready sets it).
        self.max_items = max_items
        self._max_inflight = max_inflight
        self._pending: list[tuple[Any, asyncio.Future[Any]]] = []
        self._inflight = 0
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references to tasks

    async def submit(self, item: Any) -> Outcome:
        """The outcome of one request's ``item`` (its data), sent with the others waiting now."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((item, future))
        self._schedule(loop)
        return await future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled and self._pending and self._inflight < self._max_inflight:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending and self._inflight < self._max_inflight:
            group, self._pending = self._pending[: self.max_items], self._pending[self.max_items :]
            group = [(item, future) for item, future in group if not future.done()]  # callers that gave up
            if group:
                self._inflight += 1
                task = asyncio.ensure_future(self._send(group))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _send(self, group: list[tuple[Any, asyncio.Future[Any]]]) -> None:
        try:
            results = await self._call([item for item, _ in group])
            if len(results) != len(group):
                raise RuntimeError(f"runner returned {len(results)} results for {len(group)} requests")
            for (_, future), result in zip(group, results):
                if not future.done():
                    future.set_result(result)
        except BaseException as e:  # every waiting caller must hear of the failure
            for _, future in group:
                if not future.done():
                    future.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._inflight -= 1
            self._schedule(asyncio.get_running_loop())


def through_bentoml(client: Any) -> Callable[[list[Any]], Awaitable[list[Outcome]]]:
    """The runner call on BentoML's public path (fast path off): BentoML's own client of ``bentoml.depends``.
    BentoML's typed route dumps the answer with pydantic, which turns each ``Outcome`` into a dict; they are
    turned back here, on the event loop."""

    async def infer(requests: list[Any]) -> list[Outcome]:
        return [Outcome(**o) if isinstance(o, dict) else o for o in await client.call("infer", requests=requests)]

    return infer


class RunnerCallError(Exception):
    """The runner answered with an error status (``error_code``, as BentoML's client errors carry it)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"the runner answered {status}: {message}")
        self.error_code = status


class ConnectionLost(ConnectionError):
    def __init__(self, answered: bool) -> None:
        super().__init__("the runner closed the connection" + (" mid-answer" if answered else " before answering"))


class RunnerClient:
    """Calls the runner's API methods; at most ``max_idle`` connections are kept open between calls, each for at most
    ``max_idle_s`` seconds."""

    def __init__(self, url: str, timeout: float, max_idle: int = 8, max_idle_s: float = 0.5) -> None:
        self._address = _address(url)
        self.timeout = timeout
        self.max_idle_s = max_idle_s
        self._max_idle = max_idle
        self._idle: list[_Connection] = []
        self._serde = bentoml_seam.PickleSerde()

    async def call(self, method: str, **arguments: Any) -> Any:
        payload = self._serde.serialize_value(arguments)
        body = b"".join(payload.data)
        head = (
            f"POST /{method} HTTP/1.1\r\nhost: runner\r\ncontent-type: {PICKLE}\r\n"
            f"content-length: {len(body)}\r\nbuffer-lengths: {payload.metadata['buffer-lengths']}\r\n\r\n"
        ).encode("latin-1")
        self._drop_stale()
        async with asyncio.timeout(self.timeout):
            status, headers, answer = await self._exchange(head + body)
        if status != 200:
            raise RunnerCallError(status, answer.decode("utf-8", "replace")[:500])
        return self._serde.deserialize_value(bentoml_seam.Payload((answer,), metadata=headers))

    async def _exchange(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        connection = self._idle.pop() if self._idle else await self._open()
        try:
            reply = await connection.send(request)
        except BaseException:  # also cancelled or timed out mid-call: this connection's next bytes are this call's
            connection.close()
            raise
        if connection.reusable and len(self._idle) < self._max_idle:
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
        else:
            connection.close()
        return reply

    def _drop_stale(self) -> None:
        """Close the connections that idled longer than ``max_idle_s``.

        A call is never retried (the runner may have died running it, and a call that crashed it must not crash it
        twice), so a call must not go out on a connection the runner is closing: uvicorn closes one after 5 s idle
        (``--timeout-keep-alive``). Opening a Unix socket connection again costs ~0.1 ms, only when traffic is slow.
        """
        deadline = time.monotonic() - self.max_idle_s
        fresh = []
        for connection in self._idle:
            if connection.reusable and connection.idle_since > deadline:
                fresh.append(connection)
            else:
                connection.close()
        self._idle = fresh

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        kind, where = self._address
        if kind == "unix":
            _, connection = await loop.create_unix_connection(_Connection, where)
        else:
            host, port = where
            _, connection = await loop.create_connection(_Connection, host, port)
        return connection

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()


def _address(url: str) -> tuple[str, Any]:
    """The runner's address from the URL BentoML gives ``bentoml.depends``: ``file://`` for a Unix socket (what
    ``bentoml serve`` uses), ``tcp://`` or ``http://`` for a port."""
    parsed = urlparse(url)
    if parsed.scheme in ("file", "unix"):
        return "unix", unquote(parsed.path)
    if parsed.scheme in ("tcp", "http") and parsed.hostname and parsed.port:
        return "tcp", (parsed.hostname, parsed.port)
    raise ValueError(
        f"unsupported runner address {url!r}: the API workers reach the runner at file://, tcp:// or http://"
    )


class _Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection to the runner, one exchange at a time."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._reply: asyncio.Future[tuple[int, dict[str, str], bytes]] | None = None
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._answered = False
        self._keep_alive = True
        self.closed = False
        self.idle_since = 0.0

    @property
    def reusable(self) -> bool:
        return not self.closed and self._keep_alive and self._reply is None

    def send(self, request: bytes) -> asyncio.Future[tuple[int, dict[str, str], bytes]]:
        assert self._transport is not None and self._reply is None
        if self.closed:
            raise ConnectionLost(answered=False)
        self._reply = asyncio.get_running_loop().create_future()
        self._headers, self._body, self._answered = {}, [], False
        self._transport.write(request)
        return self._reply

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionLost(self._answered))

    def data_received(self, data: bytes) -> None:
        if self._reply is None:  # nothing was asked: the connection is out of step
            self.close()
            return
        self._answered = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(ConnectionError(f"unreadable answer from the runner: {e}"))
            self.close()

    # httptools.HttpResponseParser
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._keep_alive = self._parser.should_keep_alive()
        reply, self._reply = self._reply, None
        if reply is not None and not reply.done():
            reply.set_result((self._parser.get_status_code(), self._headers, b"".join(self._body)))
        if not self._keep_alive:
            self.close()

    def _fail(self, error: Exception) -> None:
        reply, self._reply = self._reply, None
        if reply is not None and not reply.done():
            reply.set_exception(error)
