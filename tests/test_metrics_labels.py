"""/metrics stays bounded whatever paths clients send, and each server keeps its own numbers
(api/bentoml_fixes.py: the endpoint label of unknown paths, a metrics directory per server)."""

from __future__ import annotations

import re
import secrets

import pytest
import requests
from bentoml._internal.configuration.containers import BentoMLContainer
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from core import bentoml_seam as bentoml_fixes
from core.bentoml_seam import UNMATCHED, endpoint_label
from core.settings import ServiceSettings
from public.app import PublicApp
from tests.fixtures.server import serving

IRIS = {"source": 1, "data": {"dtype": "float", "values": [[1.0380048, 0.5586108, 1.1037828, 1.712096]]}}
METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD")


def ok(request):
    return PlainTextResponse("ok")


def bentoml_like_app() -> Starlette:
    """The route table the public service has: BentoML's routes around the public app mounted at "/"."""
    routes = [
        Route("/livez", ok),
        Route("/readyz", ok),
        Route("/metrics", ok),
        Mount("/", app=PublicApp(ServiceSettings())),
        Mount("/static_content", app=ok),
        Route("/docs.json", ok),
        Route("/", ok),
    ]
    return Starlette(routes=routes)


@pytest.mark.parametrize(
    "method, path, label",
    [
        ("POST", "/service_output", "/service_output"),
        ("GET", "/service_output", "/service_output"),  # a wrong method still names the route
        ("GET", "/info", "/info"),
        ("GET", "/service-resources", "/service-resources"),
        ("GET", "/livez", "/livez"),
        ("DELETE", "/readyz", "/readyz"),
        ("GET", "/docs.json", "/docs.json"),
        ("GET", "/", "/"),
        ("GET", "/static_content/index.css", "/static_content"),
        ("GET", "/static_content/" + secrets.token_hex(8), "/static_content"),
        ("GET", "/" + secrets.token_hex(8), UNMATCHED),
        ("PROPFIND", "/wp-admin/" + secrets.token_hex(8), UNMATCHED),
        ("POST", "/service_output/", UNMATCHED),
        ("GET", "/info/x", UNMATCHED),
        # The Open Inference Protocol's routes by their template, whatever model name or version is asked for
        ("POST", "/v2/models/model/infer", "/v2/models/{model_name}/infer"),
        ("POST", "/v2/models/" + secrets.token_hex(8) + "/infer", "/v2/models/{model_name}/infer"),
        ("GET", "/v2/models/model/versions/1/ready", "/v2/models/{model_name}/versions/{model_version}/ready"),
        ("GET", "/v2/models/model", "/v2/models/{model_name}"),
        ("GET", "/v2/health/ready", "/v2/health/ready"),
        ("GET", "/v2", "/v2"),
        # A model's advertised ids may hold slashes (huggingface/Org/repo): what follows /v2/models/ is its name
        ("GET", "/v2/models/model/" + secrets.token_hex(8), "/v2/models/{model_name}"),
        (
            "POST",
            "/v2/models/huggingface/Org/repo/versions/1/infer",
            "/v2/models/{model_name}/versions/{model_version}/infer",
        ),
        ("GET", "/v2/models/model/versions", UNMATCHED),
    ],
)
def test_endpoint_label_names_the_route_or_one_value(method, path, label):
    scope = {"type": "http", "method": method, "path": path, "root_path": "", "headers": [], "app": bentoml_like_app()}
    assert endpoint_label(scope) == label


def test_each_server_process_gets_its_own_metrics_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.setattr(BentoMLContainer.bentoml_home, "get", lambda: str(tmp_path))
    try:
        directory = bentoml_fixes.own_metrics_directory()
        assert directory is not None and directory.parent == tmp_path
        assert directory != tmp_path / "prometheus_multiproc_dir"  # BentoML's shared default
        assert BentoMLContainer.prometheus_multiproc_dir.get() == str(directory)
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
        assert bentoml_fixes.own_metrics_directory() is None  # a worker keeps its server's
    finally:
        BentoMLContainer.prometheus_multiproc_dir.reset()


def metric_lines(server) -> list[str]:
    return [line for line in server.get("/metrics").text.splitlines() if not line.startswith("#")]


def counted(lines: list[str], endpoint: str, status: int | None = None) -> float:
    pattern = re.compile(r"^bentoml_service_request_total\{(.*)\} ([0-9.e+]+)$")
    total = 0.0
    for line in lines:
        found = pattern.match(line)
        if not found or 'service_name="infernet_torch_service"' not in found[1]:
            continue
        if f'endpoint="{endpoint}"' in found[1] and (status is None or f'http_response_code="{status}"' in found[1]):
            total += float(found[2])
    return total


def random_paths(server, count: int) -> None:
    for i in range(count):
        path = f"/{secrets.token_hex(6)}/{secrets.token_hex(4)}"
        response = requests.request(METHODS[i % len(METHODS)], f"{server.url}{path}", timeout=30)
        assert response.status_code == 404, (path, response.status_code)


@pytest.mark.slow
def test_unknown_paths_add_no_series_to_metrics(tmp_path):
    with serving({}, tmp_path) as server:
        assert server.post(IRIS).status_code == 200
        v2 = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": IRIS["data"]["values"][0]}]}
        assert requests.post(f"{server.url}/v2/models/model/infer", json=v2, timeout=30).status_code == 200
        assert server.get("/v2/models/model").status_code == 200
        random_paths(server, 30)
        before = metric_lines(server)
        random_paths(server, 30)
        after = metric_lines(server)
        random_paths(server, 30)
        last = metric_lines(server)

    # The first batch may add the one label's series; later batches add none, whatever the paths and methods.
    assert len(after) == len(before) == len(last), f"{len(before)} -> {len(after)} -> {len(last)} lines"
    assert counted(after, UNMATCHED, 404) - counted(before, UNMATCHED, 404) == 30
    assert counted(last, UNMATCHED, 404) == 90
    assert counted(last, "/service_output", 200) == 1
    # Open Inference Protocol traffic has labels of its own (it was counted under <unmatched> on the fast path)
    assert counted(last, "/v2/models/{model_name}/infer", 200) == 1
    assert counted(last, "/v2/models/{model_name}", 200) == 1
    endpoints = {label for line in last for label in re.findall(r'endpoint="([^"]*)"', line)}
    known = {"/service_output", "/readyz", "/livez", "/infer", "/describe", "/health", UNMATCHED}
    assert endpoints <= {*known, "/v2/models/{model_name}/infer", "/v2/models/{model_name}"}, endpoints


@pytest.mark.slow
def test_two_servers_sharing_bentoml_home_keep_their_own_metrics(tmp_path):
    home = {"BENTOML_HOME": str(tmp_path / "shared-bentoml-home")}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with serving(home, tmp_path / "a") as first:
        for _ in range(3):
            assert first.post(IRIS).status_code == 200
        with serving(home, tmp_path / "b") as second:
            for _ in range(2):
                assert first.post(IRIS).status_code == 200
            assert second.post(IRIS).status_code == 200
            first_lines, second_lines = metric_lines(first), metric_lines(second)
        assert first.post(IRIS).status_code == 200  # the second's exit leaves the first's files alone
        first_after = metric_lines(first)

    assert counted(first_lines, "/service_output", 200) == 5
    assert counted(second_lines, "/service_output", 200) == 1
    assert counted(first_after, "/service_output", 200) == 6
    assert not list((tmp_path / "shared-bentoml-home").glob("prometheus_multiproc_dir*")), "left behind at exit"
