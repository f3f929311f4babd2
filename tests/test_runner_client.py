"""RunnerClient (api/runner_client.py): the API workers' client for the runner's POST /infer.

Against real servers on this machine: uvicorn serving the runner's own route (``RunnerService`` → ``PickledCall``)
on a Unix socket and on a loopback port, and small asyncio servers that misbehave on purpose (close an idle
connection, die mid-answer, never answer). Every HTTP test that POSTs /service_output goes through it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from _bentoml_sdk.service import set_current_service
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.crash_records import request_digest
from public.runner_client import (
    ConnectionLost,
    CrashWatch,
    RunnerCallBatcher,
    RunnerCallError,
    RunnerClient,
    _address,
    over,
)
from tests.test_pickled_call import Doubler


@pytest.fixture
def doubler():
    instance = Doubler()
    set_current_service(instance)  # PickledCall calls the current service's method, as in the runner
    yield instance
    set_current_service(None)


@contextlib.asynccontextmanager
async def runner_server(**where: Any):
    """The runner's real ASGI app (as a dependency, so /infer is PickledCall) under uvicorn with httptools.

    uvicorn's own protocol class, named, not "httptools": a test that installs public/http_protocol.py's Protocol
    (tests/test_http_edges.py) remaps that name for the rest of the process, and its keep-alive is KEEP_ALIVE_TIMEOUT_S,
    not the ``timeout_keep_alive`` these tests set."""
    config = uvicorn.Config(
        Doubler.to_asgi(is_main=False), lifespan="off", http=HttpToolsProtocol, log_level="warning", **where
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        await task


def connections(server: uvicorn.Server) -> int:
    return len(server.server_state.connections)


def test_a_call_reaches_the_runner_over_a_unix_socket_and_comes_back(doubler, tmp_path: Path):
    async def main() -> None:
        async with runner_server(uds=str(tmp_path / "runner.sock")):
            client = RunnerClient(f"file://{tmp_path / 'runner.sock'}", timeout=5)
            result = await client.call("infer", datas=[1, 2.5, np.arange(3.0), "ab"])
            assert result[:2] == [2, 5.0] and result[3] == "abab"
            assert np.array_equal(result[2], np.arange(3.0) * 2)  # numpy travels as pickle-5 out-of-band buffers
            big = np.arange(200_000, dtype=np.float64)  # 1.6 MB: the answer arrives in many reads
            assert np.array_equal((await client.call("infer", datas=[big]))[0], big * 2)
            client.close()

    asyncio.run(main())


def test_sequential_calls_share_one_connection_and_concurrent_calls_get_their_own(doubler, tmp_path: Path):
    async def main() -> None:
        async with runner_server(host="127.0.0.1", port=0) as server:
            port = server.servers[0].sockets[0].getsockname()[1]
            client = RunnerClient(f"tcp://127.0.0.1:{port}", timeout=5)
            for i in range(5):
                assert await client.call("infer", datas=[i]) == [2 * i]
            assert connections(server) == 1
            results = await asyncio.gather(*(client.call("infer", datas=[i, "x"]) for i in range(4)))
            assert results == [[2 * i, "xx"] for i in range(4)]  # each caller gets its own answer
            assert connections(server) == 4
            client.close()

    asyncio.run(main())


def test_an_error_status_carries_its_code_and_the_runners_message(doubler, tmp_path: Path):
    async def main() -> None:
        async with runner_server(uds=str(tmp_path / "r.sock")):
            client = RunnerClient(f"file://{tmp_path / 'r.sock'}", timeout=5)
            with pytest.raises(RunnerCallError) as failed:
                await client.call("infer", datas=[1, "boom"])
            assert failed.value.error_code == 500
            assert "infer failed; see the runner's log" in str(failed.value)
            assert await client.call("infer", datas=[3]) == [6]  # the connection is still good

    asyncio.run(main())


def test_a_connection_the_runner_closed_while_idle_is_not_used_again(doubler, tmp_path: Path):
    async def main() -> None:
        async with runner_server(uds=str(tmp_path / "r.sock"), timeout_keep_alive=0.1) as server:
            client = RunnerClient(f"file://{tmp_path / 'r.sock'}", timeout=5, max_idle_s=60)
            assert await client.call("infer", datas=[1]) == [2]
            for _ in range(100):  # uvicorn closes the idle connection after 0.1 s; later on a loaded machine
                if connections(server) == 0:
                    break
                await asyncio.sleep(0.05)
            assert connections(server) == 0
            await asyncio.sleep(0.2)  # the client's side of the close, on this same event loop
            assert await client.call("infer", datas=[2]) == [4]

    asyncio.run(main())


ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nbuffer-lengths: %d\r\n\r\n%s"


def pickled(value: Any) -> bytes:
    import pickle

    body = pickle.dumps(value, protocol=5)
    return ANSWER % (len(body), len(body), body)


@contextlib.asynccontextmanager
async def scripted_server(path: Path, script):
    """An asyncio Unix server; ``script(n, reader, writer)`` handles the n-th connection (from 0)."""
    accepted = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        n, accepted = accepted, accepted + 1
        try:
            await script(n, reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, str(path))
    try:
        yield lambda: accepted
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return await reader.readexactly(length)


def serve_forever(answer: Any):
    async def script(n, reader, writer):
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(pickled(answer))
            await writer.drain()

    return script


def test_a_connection_idle_longer_than_max_idle_s_is_not_used_again(tmp_path: Path):
    # uvicorn closes a connection after 5 s idle; a call sent as it does so would be lost, and calls are never retried.
    async def main() -> None:
        async with scripted_server(tmp_path / "s.sock", serve_forever(["ok"])) as accepted:
            client = RunnerClient(f"file://{tmp_path / 's.sock'}", timeout=5, max_idle_s=0.2)
            assert await client.call("infer", datas=[1]) == ["ok"]
            assert await client.call("infer", datas=[2]) == ["ok"]
            assert accepted() == 1
            await asyncio.sleep(0.3)
            assert await client.call("infer", datas=[3]) == ["ok"]
            assert accepted() == 2

    asyncio.run(main())


@pytest.mark.parametrize(
    "sent, error",
    [(b"", "before answering"), (pickled(["x" * 1000])[:60], "mid-answer")],
    ids=["before the answer", "mid-answer"],
)
def test_a_runner_that_dies_during_a_call_fails_it_without_a_retry(tmp_path: Path, sent: bytes, error: str):
    # The runner may have died running it: a call that crashed the runner must not crash it twice.
    async def script(n, reader, writer):
        await read_request(reader)
        writer.write(sent)  # nothing or part of the answer, then the process is gone
        await writer.drain()

    async def main() -> None:
        async with scripted_server(tmp_path / "s.sock", script) as accepted:
            client = RunnerClient(f"file://{tmp_path / 's.sock'}", timeout=5)
            with pytest.raises(ConnectionLost, match=error):
                await client.call("infer", datas=[1])
            assert accepted() == 1

    asyncio.run(main())


def test_a_call_that_outlives_the_timeout_fails_and_its_late_answer_reaches_nobody(tmp_path: Path):
    abandoned: list[bytes] = []

    async def script(n, reader, writer):
        await read_request(reader)
        if n == 0:
            abandoned.append(await reader.read())  # b"": the client closed this connection when it gave up
            writer.write(pickled(["late"]))
            return
        writer.write(pickled(["on time"]))
        await writer.drain()

    async def main() -> None:
        async with scripted_server(tmp_path / "s.sock", script):
            client = RunnerClient(f"file://{tmp_path / 's.sock'}", timeout=0.2)
            with pytest.raises(TimeoutError):
                await client.call("infer", datas=[1])
            assert await client.call("infer", datas=[2]) == ["on time"]
            await asyncio.sleep(0.1)
            assert abandoned == [b""]

    asyncio.run(main())


def test_no_runner_listening_is_a_connection_error(tmp_path: Path):
    async def main() -> None:
        client = RunnerClient(f"file://{tmp_path / 'nobody.sock'}", timeout=1)
        with pytest.raises(OSError):
            await client.call("infer", datas=[1])

    asyncio.run(main())


def test_the_runner_address_comes_from_the_url_bentoml_gives():
    assert _address("file:///tmp/bentoml%20x/runner.sock") == ("unix", "/tmp/bentoml x/runner.sock")
    assert _address("tcp://127.0.0.1:3001") == ("tcp", ("127.0.0.1", 3001))
    assert _address("http://localhost:8000") == ("tcp", ("localhost", 8000))
    with pytest.raises(ValueError, match="unsupported runner address"):
        _address("https://example.com")


# A runner stand-in in a process of its own, so that it can die as the runner does (SIGKILL) while this event loop is
# not running: the close of the connections it had accepted is then still unread here, as on a busy API worker.
RUNNER_PROCESS = """
import asyncio, pickle, sys

ANSWER = pickle.dumps([sys.argv[2]], protocol=5)

async def serve(reader, writer):
    while True:
        try:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            break
        length = next(int(l.split(b":")[1]) for l in head.split(b"\\r\\n") if l.lower().startswith(b"content-length"))
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\\r\\ncontent-length: %d\\r\\nbuffer-lengths: %d\\r\\n\\r\\n%s"
                     % (len(ANSWER), len(ANSWER), ANSWER))
    writer.close()

async def main():
    server = await asyncio.start_unix_server(serve, sys.argv[1])
    print("listening", flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


@contextlib.contextmanager
def runner_process(path: Path, answer: str):
    """A process answering every POST with ``[answer]`` on the Unix socket ``path``; yields it once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-c", RUNNER_PROCESS, str(path), answer], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline() == "listening\n"
        yield process
    finally:
        process.kill()
        process.wait(10)


def test_a_suspect_sent_alone_after_the_runner_was_replaced_reaches_the_new_runner_and_is_not_poison(tmp_path: Path):
    # A request that was in the runner when its process died is sent alone when it comes again, and one that kills
    # the process while alone is refused as poison (CrashWatch). It went out on a kept connection: one the dead
    # process had accepted, whose close this API worker had not read yet (a busy worker reads its events late). The
    # call failed without reaching any runner, that failure was taken for the input's own second death, and a good
    # input was refused 422 for 600 s (a CI failure of tests/test_crash_recovery.py).
    async def main() -> None:
        path = tmp_path / "runner.sock"
        client = RunnerClient(f"file://{path}", timeout=10, max_idle_s=60)  # kept for the whole test
        calls = RunnerCallBatcher(over(client), max_items=8)
        calls.crashes = CrashWatch(directory=None)  # this worker's own memory, as outside bentoml serve
        item = {"dtype": "float", "values": [[1.0, 2.0]]}
        with runner_process(path, "old") as old:
            assert await calls.submit(item) == "old"  # its connection is kept
            calls.crashes.died([item])  # an earlier death: the item is a suspect
            old.kill()
            old.wait(10)
            # Not a single await since: this event loop has not read the close of the kept connection.
            with runner_process(path, "new"):
                assert await calls.submit(item) == "new"
                key = request_digest(item)
                assert not calls.crashes.is_poison(key) and not calls.crashes.is_suspect(key)  # answered: cleared
                assert await calls.submit(item) == "new"
        client.close()

    asyncio.run(main())


def test_a_lost_connection_closes_the_other_kept_connections_to_the_same_runner(tmp_path: Path):
    # Kept connections to a runner whose process died are dead too: none is used for a later call.
    async def main() -> None:
        path = tmp_path / "runner.sock"
        client = RunnerClient(f"file://{path}", timeout=10, max_idle_s=60)
        with runner_process(path, "old") as old:
            assert await asyncio.gather(*(client.call("infer", n=n) for n in range(3))) == [["old"]] * 3
            kept = list(client._idle)
            assert len(kept) == 3
            old.kill()
            old.wait(10)
            with pytest.raises(ConnectionLost):
                await client.call("infer", n=3)  # on a kept connection: the dead process's
            assert client._idle == [] and all(connection.closed for connection in kept)
            with runner_process(path, "new"):
                assert await client.call("infer", n=4) == ["new"]
        client.close()

    asyncio.run(main())
