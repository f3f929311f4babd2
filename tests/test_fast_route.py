"""POST /service_output skips BentoML's middleware (core/bentoml_seam.py FastRoute): what those layers did must
still happen.

Against a real ``bentoml serve``: the request series reach /metrics with BentoML's names and labels, counted
exactly, and the access log can still be switched on. Every other route still goes through BentoML's stack.
"""

from __future__ import annotations

import re
import time

import requests

from tests.fixtures.server import serving

GOOD = {"source": 1, "data": {"dtype": "double", "values": [[1.0380048, 0.5586108, 1.1037828, 1.712096]]}}
SERIES = re.compile(r"^(bentoml_service_request_\w+)\{([^}]*)\} (\S+)$")


def route_series(server, endpoint: str = "/service_output") -> dict[tuple[str, str], float]:
    """(series name, status code) -> value for one endpoint, summed over the API workers."""
    values: dict[tuple[str, str], float] = {}
    for line in server.get("/metrics").text.splitlines():
        match = SERIES.match(line)
        if not match or f'endpoint="{endpoint}"' not in match.group(2):
            continue
        code = re.search(r'http_response_code="(\d+)"', match.group(2))
        key = (match.group(1), code.group(1) if code else "")
        values[key] = values.get(key, 0.0) + float(match.group(3))
    return values


def delta(after: dict, before: dict, name: str, code: str) -> float:
    return after.get((name, code), 0.0) - before.get((name, code), 0.0)


def test_requests_are_counted_by_status_with_bentomls_series(iris_server):
    before = route_series(iris_server)
    for _ in range(5):
        assert iris_server.post(GOOD).status_code == 200
    for _ in range(3):
        bad = requests.post(f"{iris_server.url}/service_output", data=b"{not json", timeout=30)
        assert bad.status_code == 400
    wrong_shape = iris_server.post({"source": 1, "data": {"dtype": "double", "values": [1.0, 2.0, 3.0]}})
    assert wrong_shape.status_code == 422
    after = route_series(iris_server)

    assert delta(after, before, "bentoml_service_request_total", "200") == 5
    assert delta(after, before, "bentoml_service_request_total", "400") == 3
    assert delta(after, before, "bentoml_service_request_total", "422") == 1
    assert delta(after, before, "bentoml_service_request_duration_seconds_count", "200") == 5
    seconds = delta(after, before, "bentoml_service_request_duration_seconds_sum", "200")
    assert 0 < seconds < 5 * 30
    assert after[("bentoml_service_request_in_progress", "")] == 0  # every request finished


def test_other_routes_still_go_through_bentoml(iris_server):
    # /info is served by the mounted app behind BentoML's stack, so BentoML's metrics middleware counts it.
    before = route_series(iris_server, "/info")
    for _ in range(2):
        assert iris_server.get("/info").status_code == 200
    after = route_series(iris_server, "/info")
    assert delta(after, before, "bentoml_service_request_total", "200") == 2
    assert iris_server.get("/readyz").status_code == 200
    assert iris_server.get("/docs.json").json()["paths"]["/service_output"]["post"]


def test_access_log_can_be_switched_back_on(tmp_path, iris_server):
    iris_server.post(GOOD)
    assert "path=/service_output" not in iris_server.log()  # off by default (docs/performance.md)

    env = {"BENTOML_CONFIG_OPTIONS": "services.infernet_torch_service.logging.access.enabled=true"}
    with serving(env, tmp_path) as server:
        assert server.post(GOOD).status_code == 200
        assert server.post({"source": 1}).status_code == 400
        # The line is written once the response has gone out, so it may trail the client by a moment.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(access_lines(server.log())) < 2:
            time.sleep(0.1)
        lines = access_lines(server.log())
    assert any("status=200" in line for line in lines), lines
    assert any("status=400" in line for line in lines), lines


def access_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "path=/service_output" in line]


def test_with_cors_on_every_route_goes_through_bentoml(tmp_path):
    # BentoML's CORS middleware must see the inference route too (preflight and answer headers).
    options = "services.infernet_torch_service.http.cors"
    env = {
        "BENTOML_CONFIG_OPTIONS": f'{options}.enabled=true {options}.access_control_allow_origins=["http://example.com"]'
        f' {options}.access_control_allow_methods=["POST","GET"]'
    }
    origin = {"Origin": "http://example.com"}
    with serving(env, tmp_path) as server:
        preflight = requests.options(
            f"{server.url}/service_output", headers={**origin, "Access-Control-Request-Method": "POST"}, timeout=30
        )
        answer = server.post(GOOD, headers=origin)
        # BentoML's stack serves every route here, its health routes too: they answered in plain text (explorer F-i).
        health = {path: server.get(path) for path in ("/readyz", "/livez", "/healthz")}
    assert {path: (r.status_code, r.headers["content-type"], r.json()) for path, r in health.items()} == {
        "/readyz": (200, "application/json", {"ready": True}),
        "/livez": (200, "application/json", {"live": True}),
        "/healthz": (200, "application/json", {"live": True}),
    }
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://example.com"
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://example.com"
    assert answer.json()["shape"] == [1, 3]
