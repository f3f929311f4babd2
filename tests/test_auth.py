"""BEARER_TOKEN / BEARER_TOKEN_FILE: the inference and information routes need the token the Infernet node sends
(its container entry's ``bearer``); probes and /metrics stay open; the token is never written anywhere."""

from __future__ import annotations

import asyncio
import secrets
import socket
from urllib.parse import urlparse

import orjson
import pytest
import requests

from core.errors import StartupError
from core.settings import ServiceSettings
from public.app import PublicApp
from tests.fixtures.server import serving
from tests.reliability_support import assert_contract_error

TOKEN = "tok_" + secrets.token_urlsafe(24)
IRIS = {"source": 1, "data": {"dtype": "float", "values": [[1.0380048, 0.5586108, 1.1037828, 1.712096]]}}


# --- settings ----------------------------------------------------------------------------------------------------


def test_no_token_configured_means_no_check():
    assert ServiceSettings.from_env({}).bearer_token is None
    assert ServiceSettings.from_env({"BEARER_TOKEN": "  "}).bearer_token is None


def test_token_from_the_variable_or_a_file(tmp_path):
    assert ServiceSettings.from_env({"BEARER_TOKEN": TOKEN}).bearer_token == TOKEN
    secret = tmp_path / "bearer"
    secret.write_text(TOKEN + "\n")  # `kubectl create secret --from-file` and editors leave a newline
    assert ServiceSettings.from_env({"BEARER_TOKEN_FILE": str(secret)}).bearer_token == TOKEN


@pytest.mark.parametrize(
    "content, message",
    [(None, "BEARER_TOKEN_FILE: cannot read"), ("\n", "BEARER_TOKEN_FILE: "), ("two words", "BEARER_TOKEN_FILE: ")],
)
def test_unusable_token_file_is_a_start_up_error_naming_the_variable(tmp_path, content, message):
    secret = tmp_path / "bearer"
    if content is not None:
        secret.write_text(content)
    with pytest.raises(StartupError) as refused:
        ServiceSettings.from_env({"BEARER_TOKEN_FILE": str(secret)})
    assert str(refused.value).startswith(message)
    assert "words" not in str(refused.value)  # never the content


def test_both_variables_set_is_an_error_and_the_token_never_shows():
    with pytest.raises(StartupError) as refused:
        ServiceSettings.from_env({"BEARER_TOKEN": TOKEN, "BEARER_TOKEN_FILE": "/nowhere"})
    assert "BEARER_TOKEN and BEARER_TOKEN_FILE" in str(refused.value) and TOKEN not in str(refused.value)
    settings = ServiceSettings.from_env({"BEARER_TOKEN": TOKEN})
    assert TOKEN not in repr(settings) and TOKEN not in str(settings)
    with pytest.raises(StartupError) as refused:
        ServiceSettings.from_env({"BEARER_TOKEN": TOKEN + " x"})
    assert TOKEN not in str(refused.value)


# --- the public app, in-process ----------------------------------------------------------------------------------


def call(app: PublicApp, path: str, headers: list[tuple[bytes, bytes]], method: str = "GET") -> tuple[dict, list]:
    sent: list[dict] = []
    received: list[int] = []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": orjson.dumps(IRIS)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers, "query_string": b""}
    asyncio.run(app.serve(scope, receive, send))
    return sent[0], received


PROTECTED_PATHS = ["/service_output", "/info", "/v2", "/v2/models/model/infer", "/v2/models/m"]


@pytest.mark.parametrize("path", PROTECTED_PATHS)
@pytest.mark.parametrize(
    "authorization, challenge",
    [
        (None, b"Bearer"),
        (b"Basic " + TOKEN.encode(), b"Bearer"),
        (b"Bearer", b"Bearer"),
        (b"Bearer wrong", b'Bearer error="invalid_token"'),
        (b"Bearer " + TOKEN.encode() + b"x", b'Bearer error="invalid_token"'),
    ],
)
def test_protected_routes_refuse_without_the_token_before_reading_the_body(path, authorization, challenge):
    app = PublicApp(ServiceSettings(bearer_token=TOKEN))
    headers = [(b"authorization", authorization)] if authorization is not None else []
    start, received = call(app, path, headers, "POST" if path.endswith(("/service_output", "/infer")) else "GET")
    assert start["status"] == 401
    answer = dict(start["headers"])
    assert answer[b"www-authenticate"] == challenge
    assert answer[b"connection"] == b"close"
    assert answer[b"content-type"] == b"application/json"
    assert received == []  # refused before the body was read


@pytest.mark.parametrize("path", ["/v2/health/live", "/v2/health/ready", "/livez", "/readyz"])
def test_health_routes_need_no_token(path):
    # Not bound to a runner: the v2 health routes answer 200 (live) or 503 (not ready), BentoML's routes 404 here.
    start, _ = call(PublicApp(ServiceSettings(bearer_token=TOKEN)), path, [])
    assert start["status"] != 401


def test_the_right_token_passes_the_check():
    app = PublicApp(ServiceSettings(bearer_token=TOKEN))
    # Not bound to a runner: past the check, the request is answered as it would be without a token (503 starting).
    start, _ = call(app, "/service_output", [(b"authorization", b"bearer " + TOKEN.encode())], "POST")
    assert start["status"] == 503


def test_without_a_token_configured_nothing_is_checked():
    start, _ = call(PublicApp(ServiceSettings()), "/service_output", [], "POST")
    assert start["status"] == 503


# --- a real server ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bearer")
    secret = tmp / "bearer-token"
    secret.write_text(TOKEN + "\n")
    with serving({"BEARER_TOKEN_FILE": str(secret)}, tmp) as server:
        yield server


@pytest.mark.slow
def test_real_server_needs_the_bearer_on_the_protected_routes(guarded_server):
    server = guarded_server
    good = {"Authorization": f"Bearer {TOKEN}"}
    # The Infernet node reads /service-resources without its bearer (explorer N1): open, as the health routes are.
    assert server.get("/service-resources").status_code == 200
    for path in ("/info",):
        missing = server.get(path)
        assert_contract_error(missing, 401)
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = server.get(path, headers={"Authorization": "Bearer not-it"})
        assert_contract_error(wrong, 401)
        assert wrong.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert server.get(path, headers=good).status_code == 200
    assert_contract_error(server.post(IRIS), 401)
    assert_contract_error(server.post(IRIS, headers={"Authorization": "Bearer not-it"}), 401)
    answer = server.post(IRIS, headers=good)
    assert answer.status_code == 200 and answer.json()["shape"] == [1, 3]
    for path in ("/livez", "/readyz", "/metrics"):
        assert server.get(path).status_code == 200, path  # probes and scrapers send no token
    info = server.get("/info", headers=good).text
    assert TOKEN not in info and TOKEN[4:] not in info
    assert TOKEN not in server.get("/metrics").text
    assert TOKEN not in server.log() and TOKEN[4:] not in server.log()


@pytest.mark.slow
def test_the_swagger_document_declares_the_bearer_scheme_on_the_protected_routes(guarded_server):
    # Explorer F17: with a token set, /docs.json declared no scheme, so Swagger UI had no Authorize button and its
    # Try it out could only get 401.
    spec = guarded_server.get("/docs.json").json()
    assert spec["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "BEARER_TOKEN (the Infernet node's bearer)",
    }
    for path, method in (("/service_output", "post"), ("/info", "get")):
        operation = spec["paths"][path][method]
        assert operation["security"] == [{"bearer": []}], path
        assert operation["responses"]["401"]["content"]["application/json"]["example"]["code"] == "401", path
    resources = spec["paths"]["/service-resources"]["get"]
    assert "security" not in resources and "401" not in resources["responses"]  # open: the node reads it
    assert TOKEN not in guarded_server.get("/docs.json").text
    # What Try it out then sends: the iris example with the header Swagger UI adds.
    example = spec["paths"]["/service_output"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    answer = guarded_server.post(example["iris"]["value"], headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200 and answer.json()["shape"] == [1, 3]


@pytest.mark.slow
def test_real_server_closes_the_connection_after_refusing_an_unread_body(guarded_server):
    """A client that sends a large body without the token gets its 401 at once, then the connection closes: the
    unread body is never taken for a next request."""
    url = urlparse(guarded_server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as raw:
        raw.sendall(
            b"POST /service_output HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n" + b"[" * 10
        )
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk  # ends when the server closes the connection
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), head
    assert b"connection: close" in head.lower()
    assert orjson.loads(body)["code"] == "401"
    assert requests.get(f"{guarded_server.url}/livez", timeout=30).status_code == 200
