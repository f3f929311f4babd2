"""The HTTP/1.1 connection handling of every uvicorn worker of the service: uvicorn's httptools protocol with the
limits it lacks.

BentoML builds each worker's ``uvicorn.Config`` itself (in its worker module) and its service
configuration has none of these; they are set here, where every way of starting the service (``bentoml serve``,
``make serve``, the image, Kubernetes) loads them with service.py:

- keep-alive: idle connections are closed after ``KEEP_ALIVE_TIMEOUT_S`` instead of uvicorn's 5 s, which is shorter
  than the clients' pools (aiohttp 15 s, load balancers 60 s and more): a request sent on a connection the server is
  closing at that moment is lost. ``bentoml serve --timeout-keep-alive`` is overridden.
- the request head: httptools buffers each header whole before uvicorn sees it, with no limit (an 8 MiB header was
  answered 200). Bytes received while a head is incomplete are counted as they arrive, so a head that never ends is
  refused having read at most one read buffer (256 KiB) beyond the limit; a complete head is measured exactly (its
  target and header lines) before the request is handed on. Past ``MAX_HEADER_BYTES`` the answer is 431 and the
  connection is closed.
- unreadable requests (a malformed request line or header, a Content-Length with a Transfer-Encoding, a broken chunk):
  uvicorn answers them 400 in plain text; here the answer is the contract's JSON error naming the parser's reason, and
  the connection is closed. A method the parser does not know gets 501 (RFC 9110, 9.1), and so does ``CONNECT``
  (the service is no proxy: RFC 9110, 9.3.6); an absolute-form target without a path is taken as ``/``.
- uvicorn's other answers of its own, ``Internal Server Error`` (an application that raised before answering) and
  ``Service Unavailable`` (``limit_concurrency``, which BentoML does not set), are the contract's JSON too
  (``Cycle``, ``service_unavailable``): no answer of the server is plain text.
- Upgrade offers (``h2c``, WebSocket) are ignored and the request answered in HTTP/1.1, body included (``_feed``); a
  client's half-close gets the answers to what it sent (``eof_received``); an error in bytes after pipelined requests
  is answered once theirs are (``on_response_complete``).
- one write per answer: uvicorn writes a response's head at ``http.response.start`` and its body at
  ``http.response.body``, two system calls and two wake-ups of the client for one small answer. ``JoiningTransport``
  holds the head back until the body's first write, in the same turn of the event loop, and sends both at once
  (docs/performance.md, section 21). The runner's server uses it too, for its answers to the API workers.
- slow senders: uvicorn waits forever for the rest of a head or body once its first byte has come. A head, and then
  a body, not received within ``BODY_TIMEOUT_S`` gets 408 and the connection is closed. The timer is only set when a
  request does not arrive whole in one read, so the usual small request pays nothing.

uvicorn internals: the subclass relies on ``HttpToolsProtocol``'s parser callbacks, ``data_received``, and its
``transport``, ``cycle``, ``loop``, ``server_state`` and ``timeout_keep_alive`` attributes, and is registered through
``uvicorn.config.HTTP_PROTOCOLS``. uvicorn is pinned (requirements.txt) to the version this was written against;
another version logs a warning at start-up. tests/test_http_edges.py checks each behaviour over real sockets.
"""

from __future__ import annotations

import asyncio
import logging
import re
from asyncio import TimerHandle
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from core.settings import ServiceSettings
from core.terms import error_body

TESTED_UVICORN = "0.54.0"
log = logging.getLogger("public.http_protocol")
_settings = ServiceSettings()  # install() sets the service's own


class Protocol(HttpToolsProtocol):
    """One client connection, on the worker's event loop (uvicorn creates one per accepted socket)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeout_keep_alive = _settings.keep_alive_timeout_s
        self._in_message = False  # from a request's first byte to the end of its body
        self._in_head = False  # from a request's first byte to the end of its head
        self._begun = 0  # requests begun on this connection
        self._head_bytes = 0  # bytes read while this head was incomplete
        self._refusal: tuple[int, str] | None = None  # why the parser was stopped in a callback (``_Refused``)
        self._read_timer: TimerHandle | None = None
        # A request with an Upgrade header and a body: the body's framing header lines, until its body is parsed.
        self._upgrade_framing: bytes | None = None
        self._stand_in = False  # parsing the stand-in head that resumes such a body: its callbacks are not a request's
        self._deferred: tuple[int, str] | None = None  # an error answer waiting for earlier requests' answers
        self._parse_error = ""  # httptools' reason for the last parse error

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(JoiningTransport(transport, self.loop))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        if self._deferred is not None:
            return  # the parser has failed; what follows the bad bytes is not read
        was_in_head, was_in_message, begun = self._in_head, self._in_message, self._begun
        self._feed(data)
        if not self._in_message or self._deferred is not None or self.transport.is_closing():
            return
        # Count only bytes certain to be this head's: a read that also ended an earlier request is left out (pipelined
        # requests only), so a head may pass the limit by one more read before it is refused.
        if self._in_head and (
            (was_in_head and begun == self._begun) or (not was_in_message and begun + 1 == self._begun)
        ):
            self._head_bytes += len(data)
            if self._head_bytes > _settings.max_header_bytes:
                self._refuse(431, _head_too_large())
                return
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(_settings.body_timeout_s, self._read_timed_out)

    def _feed(self, data: bytes) -> None:
        """uvicorn's parsing of received bytes, with every Upgrade ignored (RFC 9110, 7.8: a server may): the
        request is answered in HTTP/1.1 and the connection carries on in it.

        httptools stops at the end of an upgrade request's head, having skipped its body (it tells llhttp the body is
        the new protocol's), and raises ``HttpParserUpgrade`` with the offset where HTTP ends. Here the bytes after
        it are parsed again: the skipped body through a stand-in head with the request's own framing lines, whose
        callbacks are not passed on (so the body reaches the request that is already running), then the next
        request."""
        self._unset_keepalive_if_required()
        while True:
            try:
                self.parser.feed_data(data)
                return
            except httptools.HttpParserInvalidMethodError as e:
                # A well-formed request line with a method unknown to the parser (RFC 9110, 9.1: 501); other bytes
                # that fail at the method (a TLS handshake, stray text) are not HTTP: 400.
                method = _unknown_method(data)
                if method is not None:
                    self._refusal = (501, f"method {method} is not supported; {_METHODS}")
                self._parse_error = str(e)
                self.send_400_response("Invalid HTTP request received.")
                return
            except httptools.HttpParserError as e:
                self._parse_error = str(e)
                self.send_400_response("Invalid HTTP request received.")
                return
            except httptools.HttpParserUpgrade as upgrade:
                data = data[upgrade.args[0] :]
                framing, self._upgrade_framing = self._upgrade_framing, None
                if framing is not None:
                    # The stand-in's target and header lines go to uvicorn's ``on_url`` and ``on_header``, which
                    # add to ``self.url`` and ``self.headers``: the running request's (its scope holds that list).
                    # They get scratch ones meanwhile, so that every other request's callbacks stay uvicorn's own,
                    # with no check of ours per header (docs/performance.md, section 26).
                    url, headers, self.headers = self.url, self.headers, []
                    self._stand_in = True
                    try:
                        self.parser.feed_data(b"PUT / HTTP/1.1\r\n" + framing + b"\r\n")
                    finally:
                        self._stand_in = False
                        self.url, self.headers = url, headers

    def _should_upgrade_to_ws(self) -> bool:
        # No route of the service speaks WebSocket: a handshake is answered as the plain request it also is (uvicorn
        # handed it to the application, which never answered: a text 500 after ~70 s).
        return False

    def eof_received(self) -> bool:
        """The client half-closed (``shutdown(SHUT_WR)``), which HTTP/1.1 allows: requests already received are
        answered and then the connection closes; a request cut short gets 400. Returns True: the connection stays
        open for writing until then (asyncio's default, and uvicorn's, closed it at once and the answers were
        lost)."""
        if self._deferred is not None:
            return True  # that answer closes the connection once sent
        if self._in_message:
            self._refuse(400, "the client closed its side of the connection before the request was complete")
        elif self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # the newest request: its answer closes the connection
        else:
            self.transport.close()
        return True

    def on_message_begin(self) -> None:
        if self._stand_in:
            return
        super().on_message_begin()
        self._in_message = self._in_head = True
        self._head_bytes = 0
        self._begun += 1

    def on_headers_complete(self) -> None:
        if self._stand_in:
            return
        # the target and the header lines (": " and the line's end: 4 bytes each), as httptools handed them over
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        # Each refusal stops the parser before uvicorn builds the request, so nothing runs for it; httptools turns
        # the exception into the parse error that is answered with ``send_400_response``.
        if size > _settings.max_header_bytes:
            self._refusal = (431, _head_too_large())
            raise _Refused
        if self.parser.get_method() == b"CONNECT":
            self._refusal = (501, f"CONNECT is not supported: this service is not a proxy; {_METHODS}")
            raise _Refused
        if self.url[:1] not in (b"/", b"*"):
            # absolute-form (RFC 9112, 3.2.2), which uvicorn reads through httptools: an empty path there is "/"
            parsed = _parse_url(self.url)
            if parsed is not None and parsed.path is None:
                self.url = b"/" + (b"?" + parsed.query if parsed.query else b"")
        self._in_head = False
        self._cancel_read_timer()  # the body has a time of its own
        if self.parser.should_upgrade():
            self._upgrade_framing = _body_framing(self.headers)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._upgrade_framing is not None:
            return  # httptools skipped an upgrade request's body: it is parsed next (``_feed``)
        self._in_message = False
        self._cancel_read_timer()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        if self._deferred is not None and not self.pipeline and not self.transport.is_closing():
            # the last request before the unreadable bytes is answered: now theirs
            self.server_state.total_requests += 1
            self._refuse(*self._deferred)
            return
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_read_timer()
        super().connection_lost(exc)

    def _cancel_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self._in_message and self._deferred is None and not self.transport.is_closing():
            part = "head" if self._in_head else "body"
            self._refuse(408, f"request {part} not received within {_settings.body_timeout_s:g} s (BODY_TIMEOUT_S)")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes httptools cannot parse (it has logged ``msg``), in the contract's JSON: the
        refusal a parser callback gave (431, 501), else 400 naming the parser's reason."""
        if self._refusal is not None:
            self._refuse(*self._refusal)
            return
        reason = f" ({self._parse_error})" if self._parse_error else ""
        self._refuse(
            400,
            f"the request is not valid HTTP/1.1{reason}: a malformed request line, header or chunk, or a "
            "Content-Length that cannot be read or comes with a Transfer-Encoding",
        )

    def _refuse(self, status: int, description: str) -> None:
        """Answer ``status`` in the contract's JSON and close the connection. When earlier requests' answers are still
        to come (pipelined), this one waits for them (``on_response_complete``); when this request's own answer has
        begun, the connection is only closed."""
        self._cancel_read_timer()
        cycle, self._deferred = self.cycle, None
        mine = cycle is not None and self._in_message and not self._in_head  # the error is in this cycle's body
        if cycle is not None and not mine and not cycle.response_complete:
            self._deferred = (status, description)
            return
        if cycle is None or cycle.response_complete or not cycle.response_started:
            if mine and not cycle.response_complete:
                # The application sees a disconnect and its answer, if any, is dropped (as uvicorn does on a lost
                # connection).
                cycle.disconnected = True
                cycle.message_event.set()
            log.info("%s:%s %s: %s", *(self.client or ("-", 0)), status, description)
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            headers, payload = contract_answer(status, description)
            head += [b"%s: %s\r\n" % header for header in headers]
            self.transport.write(b"".join(head) + b"\r\n" + payload)
        self.transport.close()


def contract_answer(status: int, description: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and body of every answer uvicorn would have given in plain text: the contract's JSON error, and
    the connection closes (what follows on it cannot be trusted, or the server is out of room)."""
    payload = orjson.dumps(error_body(status, description))
    headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    return [*headers, (b"content-length", b"%d" % len(payload))], payload


class Cycle(RequestResponseCycle):
    """uvicorn's request cycle, with its answer to an application that failed before answering in JSON."""

    async def send_500_response(self) -> None:
        headers, payload = contract_answer(500, "internal error: the request failed before its answer; see the log")
        await self.send({"type": "http.response.start", "status": 500, "headers": headers})
        await self.send({"type": "http.response.body", "body": payload, "more_body": False})


async def service_unavailable(scope: Any, receive: Any, send: Any) -> None:
    """uvicorn's answer past its ``limit_concurrency``, in JSON."""
    headers, payload = contract_answer(503, "overloaded: too many connections in this worker; retry")
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


class _Refused(Exception):
    """A complete request head refused in a parser callback (``Protocol._refusal`` says why)."""


_METHODS = "the service answers GET, HEAD, POST and OPTIONS"
# A request line at a line's start: a method token (RFC 9110, 5.6.2), a target, the version.
_REQUEST_LINE = re.compile(rb"(?:^|(?<=\n))([!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}) [!-~]{1,8192} HTTP/\d\.\d\r?\n")
_CANDIDATES = 64  # request lines looked at in the read that failed (pipelined requests before it are well-formed)


def _unknown_method(data: bytes) -> str | None:
    """The method of a well-formed request line in ``data`` that httptools refuses for its method, or None. Which of
    the read's requests failed is not said by the parser, so each request line is parsed alone."""
    for number, line in enumerate(_REQUEST_LINE.finditer(data)):
        if number == _CANDIDATES:
            break
        try:
            httptools.HttpRequestParser(_NoCallbacks()).feed_data(line[0])
        except httptools.HttpParserInvalidMethodError:
            return line[1].decode("ascii")
        except httptools.HttpParserError:
            continue
    return None


class _NoCallbacks:
    """A parser's protocol that wants no callbacks (httptools calls only the ones an object has)."""


def _parse_url(url: bytes) -> Any:
    try:
        return httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        return None


def _body_framing(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """A request's Content-Length and Transfer-Encoding lines, as sent; None when it has no body."""
    lines = [(name, value) for name, value in headers if name in (b"content-length", b"transfer-encoding")]
    if all(name == b"content-length" and value.strip() == b"0" for name, value in lines):
        return None
    return b"".join(name + b": " + value + b"\r\n" for name, value in lines)


def _head_too_large() -> str:
    return f"request head exceeds the limit of {_settings.max_header_bytes} bytes (MAX_HEADER_BYTES)"


class JoiningTransport:
    """A connection's transport that sends a response's head together with the first write after it.

    uvicorn writes the head (status line and headers, always starting ``HTTP/1.1 ``) and then the body; joined, a
    small answer leaves in one system call and wakes the client once. A head is held only until the end of the
    current turn of the event loop: a body that comes later (a streamed answer) or no body at all (HEAD, 204) still
    gets the head at once. Bytes always leave in the order written. Everything else is the wrapped transport's.
    On the connection's event loop, like the transport itself.
    """

    __slots__ = ("_held", "_loop", "_transport")
    _JOIN_BYTES = 64 * 1024  # a body up to this size is copied behind the head; a larger one is sent as two buffers

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._transport.is_closing():
            # The connection is going (closed by the client, or after the last answer): uvloop's transport raises
            # for a write now, which uvicorn logged as an ERROR with a traceback for each client that went away.
            self._held = None
            return
        held = self._held
        if held is not None:
            self._held = None
            if len(data) <= self._JOIN_BYTES:
                self._transport.write(held + data)
            else:
                self._transport.writelines((held, data))
        elif data[:9] == b"HTTP/1.1 " and len(data) <= self._JOIN_BYTES:
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def writelines(self, chunks: Any) -> None:
        self.flush()
        if not self._transport.is_closing():
            self._transport.writelines(chunks)

    def flush(self) -> None:
        """Send a held head now (the end of the loop's turn, or before closing)."""
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


# What ``install`` replaces, as uvicorn has it before: ``uninstall`` puts it back.
_UVICORN_OWN = (
    {name: HTTP_PROTOCOLS[name] for name in ("auto", "httptools")},
    httptools_impl.RequestResponseCycle,
    httptools_impl.service_unavailable,
)


def install(settings: ServiceSettings) -> None:
    """Make ``Protocol`` the HTTP protocol of every uvicorn server this process starts afterwards.

    Runs at import of service.py, in every process that loads it, before BentoML's worker builds its
    ``uvicorn.Config`` (which resolves ``http="auto"`` through ``HTTP_PROTOCOLS`` when it loads). Process-wide until
    ``uninstall``.
    """
    global _settings
    _settings = settings
    if uvicorn.__version__ != TESTED_UVICORN:
        log.warning(
            "uvicorn %s, not %s: the HTTP limits of public/http_protocol.py are untested with it",
            uvicorn.__version__,
            TESTED_UVICORN,
        )
    HTTP_PROTOCOLS["auto"] = HTTP_PROTOCOLS["httptools"] = f"{__name__}:Protocol"
    # uvicorn's module looks both up when a request arrives: its plain-text answers become the contract's JSON.
    httptools_impl.RequestResponseCycle = Cycle  # type: ignore[misc]
    httptools_impl.service_unavailable = service_unavailable


def uninstall() -> None:
    """Undo ``install``: uvicorn's own protocol under "auto" and "httptools", and its own plain-text answers, for the
    uvicorn servers this process starts afterwards. Call it once the servers on ``Protocol`` have stopped: uvicorn's
    module looks its answers' classes up per request. For tests that run a uvicorn server on ``Protocol`` in a
    process that goes on to run other servers: without it, every later "httptools" server in the process spoke
    ``Protocol``, with its KEEP_ALIVE_TIMEOUT_S in place of the ``timeout_keep_alive`` it was given. The service
    never calls it."""
    global _settings
    protocols, cycle, unavailable = _UVICORN_OWN
    HTTP_PROTOCOLS.update(protocols)
    httptools_impl.RequestResponseCycle = cycle  # type: ignore[misc]
    httptools_impl.service_unavailable = unavailable
    _settings = ServiceSettings()
