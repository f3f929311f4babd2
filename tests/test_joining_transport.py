"""public/http_protocol.py ``JoiningTransport``: a response's head and body leave in one write, in order, and a head
with no body after it is never held past the event loop's turn.

The unit tests wrap a recording stand-in for the socket transport (what the kernel receives is the list of writes);
the last test serves real uvicorn with the service's ``Protocol`` on a loopback socket and reads the answers back.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import uvicorn

from public.http_protocol import JoiningTransport, Protocol

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n"


class RecordingTransport:
    """Stands in for the socket transport: records each write as the bytes one system call would send."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def writelines(self, chunks: Any) -> None:
        self.writes.append(b"".join(chunks))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1234) if name in ("peername", "sockname") else default


def run(check) -> None:
    async def main() -> None:
        raw = RecordingTransport()
        await check(raw, JoiningTransport(raw, asyncio.get_running_loop()))

    asyncio.run(main())


def test_head_and_body_leave_in_one_write():
    async def check(raw: RecordingTransport, joined: JoiningTransport) -> None:
        joined.write(HEAD)
        assert raw.writes == []  # held for the body
        joined.write(b"{}")
        assert raw.writes == [HEAD + b"{}"]
        await asyncio.sleep(0)
        assert raw.writes == [HEAD + b"{}"]  # nothing left to flush

    run(check)


def test_a_head_without_a_body_leaves_at_the_end_of_the_turn():
    async def check(raw: RecordingTransport, joined: JoiningTransport) -> None:
        joined.write(HEAD)  # HEAD request, 204, or a body streamed later
        await asyncio.sleep(0)
        assert raw.writes == [HEAD]
        joined.write(b"later")
        assert raw.writes == [HEAD, b"later"]

    run(check)


def test_order_is_kept_and_close_flushes_first():
    async def check(raw: RecordingTransport, joined: JoiningTransport) -> None:
        joined.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        joined.writelines([b"a", b"b"])
        joined.write(HEAD)
        joined.close()
        assert raw.writes == [b"HTTP/1.1 100 Continue\r\n\r\n", b"ab", HEAD]
        assert raw.closed
        await asyncio.sleep(0)  # the scheduled flush finds nothing held and writes nothing after the close
        assert len(raw.writes) == 3

    run(check)


def test_a_large_body_is_not_copied_behind_the_head():
    async def check(raw: RecordingTransport, joined: JoiningTransport) -> None:
        body = b"x" * (JoiningTransport._JOIN_BYTES + 1)
        joined.write(HEAD)
        joined.write(body)
        assert raw.writes == [HEAD + body]  # one writelines call: one system call for both buffers

    run(check)


def test_other_attributes_are_the_transports():
    async def check(raw: RecordingTransport, joined: JoiningTransport) -> None:
        assert joined.get_extra_info("peername") == ("127.0.0.1", 1234)
        assert joined.is_closing() is False

    run(check)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_uvicorn_with_the_service_protocol_answers_whole(method):
    """Real uvicorn, the service's Protocol, a loopback socket: keep-alive answers arrive whole and in order."""

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b'{"n": %d}' % int(scope["path"].strip("/"))
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def main() -> list[bytes]:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        config = uvicorn.Config(app, http=Protocol, log_config=None, lifespan="off")
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answers = []
        for n in range(3):
            writer.write(f"{method} /{n} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(
                next(line for line in head.split(b"\r\n") if line.startswith(b"content-length")).split(b":")[1]
            )
            body = b"" if method == "HEAD" else await asyncio.wait_for(reader.readexactly(length), 5)
            answers.append(head.split(b"\r\n")[0] + b" " + body)
        writer.close()
        server.should_exit = True
        await task
        return answers

    answers = asyncio.run(main())
    if method == "HEAD":
        assert answers == [b"HTTP/1.1 200 OK "] * 3
    else:
        assert answers == [b'HTTP/1.1 200 OK {"n": %d}' % n for n in range(3)]
