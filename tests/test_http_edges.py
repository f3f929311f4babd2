"""HTTP behaviour real clients rely on (docs/reliability.md, "HTTP edges"): keep-alive, answers sent before the body
was read, Allow/OPTIONS/HEAD, request-head size, slow senders, Content-Encoding.

Most checks talk raw HTTP/1.1 over a socket, as a pooled client's connection does, so that what happens to the
connection after an answer (kept, or closed) is visible.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import socket
import threading
import time
import zlib
from urllib.parse import urlsplit

import pytest

from core.errors import RequestError, StartupError
from core.settings import ServiceSettings
from public.app import gunzip as _gunzip
from public.app import gzip_layers as _gzip_layers
from public.routes import ROUTE_METHODS, allowed_methods
from tests.fixtures.server import serving

GOOD = json.dumps({"source": 1, "data": {"dtype": "float", "values": [[5.1, 3.5, 1.4, 0.2]]}}).encode()


# --- the logic, without a server ------------------------------------------------------------------------------------


def test_gzip_bodies_decode_within_the_limit():
    assert _gunzip(gzip.compress(GOOD), 1000) == GOOD
    assert _gunzip(gzip.compress(b"ab") + gzip.compress(b"cd"), 1000) == b"abcd"  # two members, as `cat a.gz b.gz`
    bomb = gzip.compress(b"\0" * (64 << 20))  # ~64 KB that would expand to 64 MiB
    with pytest.raises(RequestError) as refused:
        _gunzip(bomb, 1 << 20)
    assert refused.value.status == 413 and "MAX_REQUEST_BYTES" in refused.value.description
    for broken in (b"not gzip at all", gzip.compress(GOOD)[:-12]):
        with pytest.raises(RequestError) as refused:
            _gunzip(broken, 1000)
        assert refused.value.status == 400 and "gzip" in refused.value.description


def test_content_encodings_other_than_gzip_and_identity_are_refused():
    assert _gzip_layers(b"identity") == 0
    assert _gzip_layers(b"gzip") == _gzip_layers(b"GZip, identity") == 1
    assert _gzip_layers(b"gzip, gzip") == 2
    for coding in (b"br", b"deflate", b"gzip, zstd"):
        with pytest.raises(RequestError) as refused:
            _gzip_layers(coding)
        assert refused.value.status == 415 and "gzip, identity" in refused.value.description


def test_every_route_has_its_methods():
    assert allowed_methods("/service_output") == ("POST",)
    for path in ("/info", "/service-resources", "/livez", "/readyz", "/metrics", "/", "/static_content/x.js"):
        assert allowed_methods(path) == ("GET", "HEAD"), path
    assert allowed_methods("/nope") is None
    assert set(ROUTE_METHODS) >= {"/service_output", "/info", "/livez"}


def test_http_settings_parse_and_name_the_variable():
    settings = ServiceSettings.from_env(
        {"KEEP_ALIVE_TIMEOUT_S": "90", "BODY_TIMEOUT_S": "2.5", "MAX_HEADER_BYTES": "4096"}
    )
    assert (settings.keep_alive_timeout_s, settings.body_timeout_s, settings.max_header_bytes) == (90, 2.5, 4096)
    defaults = ServiceSettings.from_env({})
    assert defaults.keep_alive_timeout_s > 60 and defaults.body_timeout_s < defaults.timeout_s
    for name, value in (("KEEP_ALIVE_TIMEOUT_S", "0"), ("BODY_TIMEOUT_S", "soon"), ("MAX_HEADER_BYTES", "10")):
        with pytest.raises(StartupError, match=name):
            ServiceSettings.from_env({name: value})


# --- over HTTP ------------------------------------------------------------------------------------------------------


def connect(server, timeout: float = 30) -> socket.socket:
    address = urlsplit(server.url)
    return socket.create_connection((address.hostname, address.port), timeout=timeout)


def request(method: str, path: str, body: bytes = b"", *headers: str) -> bytes:
    return request_bytes(method, path, body, *headers)


def request_bytes(method: str, path: str, body: bytes = b"", *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test", *headers]
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_response(conn: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response (status, headers by lower-case name, body), read as far as its Content-Length says."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = conn.recv(65536)
        assert chunk, "connection closed inside a response body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def assert_closed(conn: socket.socket) -> None:
    """The server closed the connection: reading gives end-of-file (or a reset) before the timeout."""
    with contextlib.suppress(ConnectionResetError):
        assert conn.recv(65536) == b""


def assert_contract_error(status: int, headers: dict[str, str], body: bytes, expected: int) -> dict:
    assert status == expected, body
    assert headers["content-type"] == "application/json"
    error = json.loads(body)
    assert error["code"] == str(expected) and error["description"]
    return error


@pytest.mark.slow
def test_an_idle_connection_is_reused_after_six_seconds(iris_server):
    # uvicorn closed idle connections after 5 s; a pool that kept them longer lost the request sent as it closed.
    with connect(iris_server) as conn:
        conn.sendall(request("POST", "/service_output", GOOD, "Content-Type: application/json"))
        first = read_response(conn)
        assert first[0] == 200 and "connection" not in first[1]
        time.sleep(6)
        conn.sendall(request("POST", "/service_output", GOOD, "Content-Type: application/json"))
        second = read_response(conn)
        assert (second[0], second[2]) == (200, first[2]) and "connection" not in second[1]
        conn.sendall(request("GET", "/livez"))
        assert read_response(conn)[0] == 200


@pytest.mark.slow
def test_early_413_after_expect_100_continue_closes_the_connection(iris_server):
    with connect(iris_server) as conn:
        conn.sendall(
            b"POST /service_output HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: 41943040\r\n\r\n"
        )
        status, headers, body = read_response(conn)
        assert_contract_error(status, headers, body, 413)
        assert headers["connection"] == "close"
        # Before, the connection stayed open and the client's next request was read as the 40 MiB body.
        conn.sendall(request("GET", "/livez"))
        assert_closed(conn)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "path", "headers", "expected"),
    [
        ("POST", "/info", (), 405),
        ("POST", "/livez", (), 405),
        ("POST", "/nope", (), 404),
        ("POST", "/service_output", ("Content-Encoding: br",), 415),
    ],
)
def test_answers_sent_without_reading_the_body_close_the_connection(iris_server, method, path, headers, expected):
    with connect(iris_server) as conn:
        conn.sendall(request(method, path, GOOD, *headers))
        status, answer_headers, body = read_response(conn)
        assert_contract_error(status, answer_headers, body, expected)
        assert answer_headers["connection"] == "close"
        assert_closed(conn)


@pytest.mark.slow
def test_405_names_the_allowed_methods_and_options_answers_them(iris_server):
    host = urlsplit(iris_server.url)
    client = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
    allowed = {
        "/service_output": "POST, OPTIONS",
        "/info": "GET, HEAD, OPTIONS",
        "/service-resources": "GET, HEAD, OPTIONS",
        "/livez": "GET, HEAD, OPTIONS",
        "/readyz": "GET, HEAD, OPTIONS",
        "/metrics": "GET, HEAD, OPTIONS",
    }
    for path, methods in allowed.items():
        wrong = "GET" if path == "/service_output" else "PUT"
        client.request(wrong, path)
        response = client.getresponse()
        response.read()
        assert response.status == 405, path
        assert response.getheader("Allow") == methods, path
        client.request("OPTIONS", path)
        response = client.getresponse()
        assert (response.status, response.getheader("Allow"), response.read()) == (204, methods, b""), path
    client.request("OPTIONS", "/nope")
    response = client.getresponse()
    assert response.status == 404 and json.loads(response.read())["code"] == "404"
    # HEAD: GET's status and headers, no body; the connection carries on.
    for path in ("/info", "/livez", "/readyz"):
        client.request("GET", path)
        got = client.getresponse()
        body = got.read()
        client.request("HEAD", path)
        head = client.getresponse()
        assert head.status == got.status == 200, path
        assert head.getheader("Content-Type") == got.getheader("Content-Type"), path
        assert head.getheader("Content-Length") == got.getheader("Content-Length") == str(len(body)), path
        assert head.read() == b""
    client.close()


@pytest.mark.slow
def test_an_oversized_request_head_gets_431_and_a_normal_one_is_served(iris_server):
    with connect(iris_server) as conn:

        def send_big_header() -> None:
            with contextlib.suppress(OSError):  # the server stops reading once the head is over the limit
                conn.sendall(request("GET", "/info", b"", "X-Big: " + "a" * (8 << 20)))

        sender = threading.Thread(target=send_big_header)
        sender.start()
        status, headers, body = read_response(conn)
        sender.join(30)
        assert "MAX_HEADER_BYTES" in assert_contract_error(status, headers, body, 431)["description"]
        assert headers["connection"] == "close"
    with connect(iris_server) as conn:
        conn.sendall(request("GET", "/livez", b"", "X-Fine: " + "a" * 16384))
        assert read_response(conn)[0] == 200


@pytest.mark.slow
@pytest.mark.parametrize("header_lines", [1, 40])
def test_a_head_just_over_the_limit_gets_431_even_when_it_arrives_whole(iris_server, header_lines):
    # A head that arrived complete in one read was not counted: 70 KB against the 64 KiB default was served 200.
    size = 70_000 // header_lines
    headers = [f"X-Big-{i}: " + "a" * size for i in range(header_lines)]
    with connect(iris_server) as conn:
        conn.sendall(request("POST", "/service_output", GOOD, "Content-Type: application/json", *headers))
        status, answer_headers, body = read_response(conn)
        assert "MAX_HEADER_BYTES" in assert_contract_error(status, answer_headers, body, 431)["description"]
        assert answer_headers["connection"] == "close"
        assert_closed(conn)
    with connect(iris_server) as conn:  # just under the limit is served
        conn.sendall(
            request("POST", "/service_output", GOOD, "Content-Type: application/json", "X-Big: " + "a" * 60_000)
        )
        assert read_response(conn)[0] == 200


@pytest.mark.slow
@pytest.mark.parametrize(
    "unreadable",
    [
        b"POST /service_output HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /service_output HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n{}",
        b"POST /service_output HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        b"POST /service_output HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
def test_unreadable_requests_get_the_contracts_json_400_and_the_connection_closes(iris_server, unreadable):
    # uvicorn answered these in plain text ("Invalid HTTP request received."); every error is the contract's JSON.
    with connect(iris_server) as conn:
        conn.sendall(unreadable)
        status, headers, body = read_response(conn)
        assert "not valid HTTP/1.1" in assert_contract_error(status, headers, body, 400)["description"]
        assert headers["connection"] == "close"
        assert_closed(conn)


@pytest.mark.slow
@pytest.mark.parametrize("server", ["iris_server", "public_path_server"])
def test_repeated_slashes_are_merged_on_every_route(server, request):
    # An Infernet node configured with a URL ending in "/" posts to //service_output; the Quart original (Werkzeug)
    # answered it. Both the fast routes and BentoML's own stack (INFERNET_FAST_PATH=0) must see the merged path.
    served = request.getfixturevalue(server)
    with connect(served) as conn:
        conn.sendall(request_bytes("POST", "/service_output", GOOD, "Content-Type: application/json"))
        plain = read_response(conn)
        assert plain[0] == 200
        for path in ("//service_output", "///service_output?unused=1"):
            conn.sendall(request_bytes("POST", path, GOOD, "Content-Type: application/json"))
            assert read_response(conn)[::2] == (200, plain[2]), path
        for path, expected in (
            ("//v2//health//ready", {"ready": True}),
            ("/v2//models/model/ready", {"name": "model", "ready": True}),
            ("//readyz", {"ready": True}),
            ("//livez", {"live": True}),
        ):
            conn.sendall(request_bytes("GET", path))
            status, _, body = read_response(conn)
            assert (status, json.loads(body)) == (200, expected), path
        conn.sendall(request_bytes("GET", "//info"))
        assert read_response(conn)[0] == 200
        conn.sendall(request_bytes("GET", "/info/"))  # only repeated slashes merge: a trailing one is another path
        assert read_response(conn)[0] == 404


@pytest.mark.slow
def test_gzip_bodies_are_decoded_and_bombs_refused(iris_server):
    with connect(iris_server) as conn:
        conn.sendall(request("POST", "/service_output", GOOD, "Content-Type: application/json"))
        plain = read_response(conn)
        zipped = gzip.compress(GOOD)
        conn.sendall(request("POST", "/service_output", zipped, "Content-Encoding: gzip"))
        status, headers, body = read_response(conn)
        assert (status, body) == (200, plain[2])
        assert "connection" not in headers  # a decoded body leaves the connection open
        # 40 MiB of zeros in ~40 KB: refused once MAX_REQUEST_BYTES are decoded, not expanded whole.
        bomb = zlib.compress(b"\0" * (40 << 20), 9, wbits=31)
        conn.sendall(request("POST", "/service_output", bomb, "Content-Encoding: gzip"))
        assert "MAX_REQUEST_BYTES" in assert_contract_error(*read_response(conn), 413)["description"]
        conn.sendall(request("POST", "/service_output", GOOD, "Content-Encoding: gzip"))
        assert "gzip" in assert_contract_error(*read_response(conn), 400)["description"]
        conn.sendall(request("POST", "/service_output", GOOD, "Content-Encoding: br"))
        status, headers, body = read_response(conn)
        assert "gzip, identity" in assert_contract_error(status, headers, body, 415)["description"]
        assert headers["accept-encoding"] == "gzip, identity"


@pytest.mark.slow
def test_slow_senders_get_408_and_idle_connections_close_after_the_setting(tmp_path):
    env = {"BODY_TIMEOUT_S": "1", "KEEP_ALIVE_TIMEOUT_S": "1"}
    with serving(env, tmp_path) as server:
        # A body that stops half way: 408 (not a 504 a minute later), and the connection is closed.
        with connect(server) as conn:
            conn.sendall(b'POST /service_output HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n{"source":')
            status, headers, body = read_response(conn)
            assert "BODY_TIMEOUT_S" in assert_contract_error(status, headers, body, 408)["description"]
            assert headers["connection"] == "close"
            assert_closed(conn)
        # A head that never ends.
        with connect(server) as conn:
            conn.sendall(b"GET /info HTTP/1.1\r\nHost: test\r\nX-Slow: ")
            status, headers, body = read_response(conn)
            assert "head" in assert_contract_error(status, headers, body, 408)["description"]
            assert_closed(conn)
        # KEEP_ALIVE_TIMEOUT_S=1: an idle connection is closed well within 8 s.
        with connect(server) as conn:
            conn.sendall(request("GET", "/livez"))
            assert read_response(conn)[0] == 200
            conn.settimeout(8)
            assert_closed(conn)


def read_until_closed(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := conn.recv(65536):
            data += chunk
    return data


def parse_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in ``data``, each read as far as its Content-Length says (these carry one, or none: 204)."""
    responses = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
        size = int(headers.get("content-length", 0))
        responses.append((int(status_line.split()[1]), headers, data[:size]))
        data = data[size:]
    return responses


@pytest.mark.slow
def test_upgrades_half_closes_and_trailing_garbage_get_prompt_json_answers(iris_server):
    """Each answer within a few seconds (the socket times out at 5 s), in the contract's JSON, and no ERROR logged."""
    log_start = len(iris_server.log())
    with connect(iris_server, timeout=5) as conn:
        conn.sendall(request("POST", "/service_output", GOOD, "Content-Type: application/json"))
        plain = read_response(conn)[2]
    # curl --http2 on http://: an h2c upgrade offer on a POST. It is ignored (RFC 9110, 7.8) and the body kept
    # (uvicorn with httptools dropped it: 400); the connection carries on in HTTP/1.1.
    h2c = ("Connection: Upgrade, HTTP2-Settings", "Upgrade: h2c", "HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA")
    with connect(iris_server, timeout=5) as conn:
        conn.sendall(request("POST", "/service_output", GOOD, "Content-Type: application/json", *h2c))
        assert read_response(conn)[::2] == (200, plain)
        chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(GOOD), GOOD)
        head = "\r\n".join(("POST /service_output HTTP/1.1", "Host: test", *h2c, "Transfer-Encoding: chunked"))
        conn.sendall(head.encode() + b"\r\n\r\n" + chunked)
        assert read_response(conn)[::2] == (200, plain)
        conn.sendall(request("GET", "/livez", b"", *h2c))
        assert read_response(conn)[0] == 200
    # A WebSocket handshake: no route takes one, so the request is answered as plain HTTP (it hung ~70 s, then a
    # text 500), and the next request on the connection is served.
    websocket = (
        "Connection: Upgrade",
        "Upgrade: websocket",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    )
    with connect(iris_server, timeout=5) as conn:
        conn.sendall(request("GET", "/service_output", b"", *websocket))
        status, headers, body = read_response(conn)
        assert_contract_error(status, headers, body, 405)
        assert headers["allow"] == "POST, OPTIONS"
        conn.sendall(request("GET", "/livez", b"", *websocket) + request("GET", "/readyz"))
        assert [r[0] for r in (read_response(conn), read_response(conn))] == [200, 200]
    # A request then bytes that are not HTTP, in one read: the request is answered, then the garbage gets 400.
    for garbage in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"hello there\r\n\r\n"):
        with connect(iris_server, timeout=5) as conn:
            conn.sendall(request("GET", "/livez") + request("POST", "/service_output", GOOD) + garbage)
            answers = parse_responses(read_until_closed(conn))
            assert [a[0] for a in answers] == [200, 200, 400], answers
            assert answers[1][2] == plain
            assert "not valid HTTP/1.1" in assert_contract_error(*answers[2], 400)["description"]
    # Half-close (shutdown(SHUT_WR)) after a whole request: the answer comes, then the server closes.
    with connect(iris_server, timeout=5) as conn:
        conn.sendall(request("POST", "/service_output", GOOD) + request("GET", "/livez"))
        conn.shutdown(socket.SHUT_WR)
        answers = parse_responses(read_until_closed(conn))
        assert [(a[0], a[2]) for a in answers][:1] == [(200, plain)] and [a[0] for a in answers] == [200, 200]
        assert answers[1][1]["connection"] == "close"
    # ...and after part of one: 400 naming what was missing.
    for part in (
        b"POST /service_output HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{",
        b"GET /livez HTTP/1.1\r\n",
    ):
        with connect(iris_server, timeout=5) as conn:
            conn.sendall(part)
            conn.shutdown(socket.SHUT_WR)
            (answer,) = parse_responses(read_until_closed(conn))
            assert "before the request was complete" in assert_contract_error(*answer, 400)["description"]
    # Clients that vanish: before their answer, in the middle of a body, right after sending.
    for sent in (request("POST", "/service_output", GOOD), request("POST", "/service_output", GOOD[:20] + b"   ")):
        conn = connect(iris_server, timeout=5)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close with a reset
        conn.sendall(sent[:-3])
        conn.close()
    time.sleep(1)
    log = iris_server.log()[log_start:]
    assert " ERROR " not in log and "Traceback" not in log, log
    assert iris_server.get("/livez").status_code == 200
