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

Crashes: a request whose forward kills the runner's process (``os._exit``, a segfault, the OOM killer) would crash
it again each time a client retries. ``CrashWatch`` remembers the requests that were in the runner when it died and
sends each alone if it comes again; one that kills the process again while running alone is refused (422) for a
while (docs/reliability.md, "A request that kills the runner"). Every API worker of one server shares that memory
(core/crash_records.py). Until the runner dies, it costs an attribute test and a read of a mapped counter per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import aiohttp
import httptools

from core import bentoml_seam, crash_records, model_call
from core.bentoml_seam import PICKLE
from core.crash_records import request_digest
from core.errors import Outcome

log = logging.getLogger("public.runner_client")

# Sends the data of several requests to the runner in one call; one outcome per request, in order. Called with
# ``alone=True`` for a call the runner must run as a batch of its own (``CrashWatch``).
RunnerCall = Callable[..., Awaitable[list[Outcome]]]


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
        self.crashes = CrashWatch()

    async def submit(self, item: Any) -> Outcome:
        """The outcome of one request's ``item`` (its data), sent with the others waiting now; sent alone, or
        refused, when it was in the runner when its process died (``CrashWatch``)."""
        crashes = self.crashes
        # Only for a few minutes after the runner's process died, seen here or by another API worker of this server.
        if crashes.watching or crashes.counter[:8] != crashes.seen:
            outcome = await self._watched(item)
            if outcome is not None:
                return outcome
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((item, future))
        self._schedule(loop)
        return await future

    async def _watched(self, item: Any) -> Outcome | None:
        """A suspect's outcome, sent in a call of its own that the runner runs as a batch of its own (``alone``); a
        known poison's refusal; None for any other request (it goes with the others)."""
        crashes = self.crashes
        crashes.refresh()
        if not crashes.watching:
            return None
        key = request_digest(item)
        if crashes.is_poison(key):
            return crashes.refusal()
        if not crashes.is_suspect(key):
            return None
        try:
            [outcome] = await self._call([item], alone=True)
        except BaseException as e:
            if not runner_died(e):
                raise
            if crash_records.was_waiting(crashes.directory, key):
                # The runner had not started it (it waited behind another call's forward): still only a suspect.
                crashes.died([item])
                raise
            # It ran in a batch of its own: the process died while running this request.
            crashes.died([item], poison=key)
            return crashes.refusal()
        crashes.cleared(key)
        return outcome

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
            if runner_died(e):
                self.crashes.died([item for item, _ in group])
            for _, future in group:
                if not future.done():
                    future.set_exception(e)
            if isinstance(e, asyncio.CancelledError):
                raise
        finally:
            self._inflight -= 1
            self._schedule(asyncio.get_running_loop())


# How long a request that was in the runner when its process died is sent alone if it comes again; how long an input
# that killed the process while running alone is refused; how many of each the API workers remember (the oldest go).
SUSPECT_S = 300.0
POISON_S = 600.0
MAX_REMEMBERED = 1024


class CrashWatch:
    """The API workers' memory of the runner's deaths: the requests (digests of their data, ``request_digest``) that
    were in the runner when its process died, and those that killed it while running alone. On the worker's event
    loop. Under ``bentoml serve`` the memory is shared by every API worker of the server (core/crash_records.py says
    how and why that is safe), so a crasher that reaches another worker is known there too; otherwise (``directory``
    None) it is this worker's own. Empty until the runner dies, costing an attribute test and a read of the shared
    counter per request; each entry expires."""

    def __init__(
        self,
        suspect_s: float = SUSPECT_S,
        poison_s: float = POISON_S,
        max_remembered: int = MAX_REMEMBERED,
        directory: Path | Callable[[], Path | None] | None = crash_records.this_server,
    ) -> None:
        self.suspect_s = suspect_s
        self.poison_s = poison_s
        self._max = max_remembered
        self.directory = directory() if callable(directory) else directory
        self._shared = crash_records.SharedRecords(self.directory) if self.directory is not None else None
        self.watching = False  # anything remembered: only then is a request's digest computed
        # The shared count of changes, mapped into memory (reading it is no system call), and its value as last read;
        # b"" and b"" without sharing.
        self.counter: Any = self._shared.counter if self._shared is not None else b""
        self.seen = self.changes()
        self._suspects: dict[bytes, float] = {}  # digest -> when it is forgotten (time.monotonic())
        self._poison: dict[bytes, float] = {}
        self._lost = 0  # requests in the calls lost since the last log line
        self._poisoned = 0
        self.on_death: Callable[[], None] | None = None  # told of each death (PublicApp: probe the runner again)

    def changes(self) -> bytes:
        return self.counter[:8]

    def died(self, items: list[Any], poison: bytes | None = None) -> None:
        """The runner's connection was lost while ``items`` were in it: its process died. They become suspects
        (``poison``: the digest of a suspect that was running alone, which becomes poison). One ERROR line per
        death, however many calls it cut, and never the requests' data."""
        now = time.monotonic()
        if poison is not None:
            self._poisoned += 1
            keys = []
        else:
            keys = [request_digest(item) for item in items]

        def change(suspects: dict[bytes, float], poisons: dict[bytes, float]) -> None:
            if poison is not None:
                suspects.pop(poison, None)
                _remember(poisons, poison, now + self.poison_s, self._max)
            for key in keys:
                _remember(suspects, key, now + self.suspect_s, self._max)

        self._change(change)
        if self.on_death is not None:
            self.on_death()
        if self._lost == 0:  # the other calls the same death cut fail within the next few turns of the loop
            asyncio.get_running_loop().call_later(0.1, self._report)
        self._lost += len(items)

    def _change(self, change: Callable[[dict[bytes, float], dict[bytes, float]], None]) -> None:
        if self._shared is not None:
            try:
                self.seen, self._suspects, self._poison = self._shared.update(change, self._max)
            except OSError as e:  # the directory was removed (the server is stopping): this worker's own memory
                log.warning("cannot share what the runner's death taught this API worker: %s", e)
                self._shared, self.counter = None, b""
                self.seen = self.changes()
                change(self._suspects, self._poison)
        else:
            change(self._suspects, self._poison)
        self.watching = bool(self._suspects or self._poison)

    def _report(self) -> None:
        lost, poisoned, self._lost, self._poisoned = self._lost, self._poisoned, 0, 0
        if poisoned:
            log.error(
                "the model runner process died while running %d request(s) of this API worker, %d of them sent alone "
                "after an earlier death: those inputs are refused (422) for %g s",
                lost,
                poisoned,
                self.poison_s,
            )
        else:
            log.error(
                "the model runner process died while running %d request(s) of this API worker; each is sent to the "
                "runner alone if it comes again within %g s",
                lost,
                self.suspect_s,
            )

    def is_suspect(self, key: bytes) -> bool:
        return self._suspects.get(key, 0.0) > time.monotonic()

    def is_poison(self, key: bytes) -> bool:
        return self._poison.get(key, 0.0) > time.monotonic()

    def cleared(self, key: bytes) -> None:
        """A suspect that ran alone and was answered: it did not kill the process."""
        self._change(lambda suspects, _: suspects.pop(key, None))

    def refresh(self) -> None:
        """What the other API workers learned since the last look (read only when the shared counter changed), less
        what has expired (each dict is in the order its entries expire); watching stops once both are empty."""
        if self._shared is not None and self.changes() != self.seen:
            try:
                self.seen, self._suspects, self._poison = self._shared.read()
            except OSError:  # the directory was removed (the server is stopping): keep what this worker knows
                self._shared, self.counter = None, b""
                self.seen = self.changes()
        now = time.monotonic()
        for remembered in (self._suspects, self._poison):
            while remembered and next(iter(remembered.values())) <= now:
                del remembered[next(iter(remembered))]
        self.watching = bool(self._suspects or self._poison)

    forget_expired = refresh

    def refusal(self) -> Outcome:
        return Outcome(
            422,
            None,
            f"this input crashed the model's process; it is not run again for {self.poison_s:g} s",
        )


def _remember(remembered: dict[bytes, float], key: bytes, until: float, most: int) -> None:
    remembered.pop(key, None)  # to the end: the dict's order is the order they are forgotten in
    remembered[key] = until
    while len(remembered) > most:
        del remembered[next(iter(remembered))]


def runner_died(error: BaseException) -> bool:
    """Whether a runner call failed because the runner's connection was lost while the call was in it: its process
    died (the fast path's own client, or BentoML's aiohttp client on the public path)."""
    return isinstance(error, (ConnectionLost, aiohttp.ServerDisconnectedError))


def over(client: RunnerClient) -> RunnerCall:
    """The runner call on the fast path: ``RunnerClient``'s ``POST /infer``. A call marked ``alone`` (a suspect,
    ``CrashWatch``) goes on a connection opened for it: a kept one may have been accepted by a runner process that has
    died since, and the call's failure there would be taken for this input's second death (``RunnerClient.call``).
    The usual call's bytes stay as they were. On the API worker's event loop."""

    async def infer(requests: list[Any], alone: bool = False) -> list[Outcome]:
        if alone:
            return await client.call("infer", new_connection=True, requests=requests, alone=True)
        return await client.call("infer", requests=requests)

    return infer


def through_bentoml(client: Any) -> RunnerCall:
    """The runner call on BentoML's public path (fast path off): BentoML's own client of ``bentoml.depends``.
    BentoML's client dumps the arguments with pydantic, which turned a ``ForModel`` into a dict and CHAIN values
    (``SentValues``) into plain lists, and its typed route dumps the answer the same way (each ``Outcome`` a dict):
    so the items go sealed and the outcomes come back sealed (core/model_call.py ``seal``), with the types the fast
    path's pickle keeps. On the API worker's event loop."""

    async def infer(requests: list[Any], alone: bool = False) -> list[Outcome]:
        sealed = model_call.seal(requests)
        [answer] = await client.call("infer", sealed=sealed, alone=alone)
        return model_call.unseal(answer)

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

    async def call(self, method: str, /, *, new_connection: bool = False, **arguments: Any) -> Any:
        """The runner's answer to ``method(**arguments)``. ``new_connection``: sent on a connection opened for it,
        never on a kept one (a suspect sent alone, ``CrashWatch``: a kept connection may be one the runner's dead
        process had accepted, whose close this event loop has not read yet; the call would fail without reaching any
        runner and be taken for a second death of that input). Raises ``ConnectionLost`` when the connection is
        lost before the whole answer came, ``RunnerCallError`` for an error status, ``TimeoutError`` past
        ``timeout``, ``OSError`` when no runner accepts the connection."""
        payload = self._serde.serialize_value(arguments)
        body = b"".join(payload.data)
        head = (
            f"POST /{method} HTTP/1.1\r\nhost: runner\r\ncontent-type: {PICKLE}\r\n"
            f"content-length: {len(body)}\r\nbuffer-lengths: {payload.metadata['buffer-lengths']}\r\n\r\n"
        ).encode("latin-1")
        self._drop_stale()
        async with asyncio.timeout(self.timeout):
            status, headers, answer = await self._exchange(head + body, new_connection)
        if status != 200:
            raise RunnerCallError(status, answer.decode("utf-8", "replace")[:500])
        return self._serde.deserialize_value(bentoml_seam.Payload((answer,), metadata=headers))

    async def _exchange(self, request: bytes, new_connection: bool = False) -> tuple[int, dict[str, str], bytes]:
        connection = self._idle.pop() if self._idle and not new_connection else await self._open()
        try:
            reply = await connection.send(request)
        except BaseException as e:  # also cancelled or timed out mid-call: this connection's next bytes are this call's
            connection.close()
            if isinstance(e, ConnectionLost):  # the runner's process is gone: so are the connections kept to it
                self.close()
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
        # is_closing: the runner's close was read in this turn of the event loop; connection_lost comes in the next.
        transport = self._transport
        return (
            not self.closed
            and self._keep_alive
            and self._reply is None
            and transport is not None
            and not transport.is_closing()
        )

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
