"""Adaptive batching over HTTP: concurrent callers share forwards and each gets exactly its own rows."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from core.settings import EMBEDDED_MODEL
from tests.fixtures.server import serving
from tests.models import Sleepy, save

CALLERS = 40


def batch_histogram(server) -> dict[str, float]:
    """Cumulative bucket counts of requests per runner batch, summed over label sets."""
    buckets: dict[str, float] = {}
    for line in server.get("/metrics").text.splitlines():
        match = re.match(r'infernet_batch_size_bucket\{.*le="([^"]+)".*\} (\S+)', line)
        if match:
            buckets[match[1]] = buckets.get(match[1], 0.0) + float(match[2])
    return buckets


def batches_larger_than_one(before: dict[str, float], after: dict[str, float]) -> float:
    total = after["+Inf"] - before.get("+Inf", 0.0)
    size_one = after["1.0"] - before.get("1.0", 0.0)
    return total - size_one


def rows_for(caller: int) -> list[list[float]]:
    # Distinct rows, and distinct row counts, so a mix-up between callers cannot go unnoticed.
    return [[caller / 10, -caller / 20, (caller % 7) / 3, row / 5] for row in range(1 + caller % 3)]


def fire_together(server, bodies) -> list[requests.Response]:
    barrier = threading.Barrier(len(bodies))
    session_local = threading.local()

    def call(body):
        session = getattr(session_local, "session", None) or requests.Session()
        session_local.session = session
        barrier.wait(timeout=30)
        return session.post(f"{server.url}/service_output", json=body, timeout=60)

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(call, bodies))


def expected(rows):
    model = torch.jit.load(str(EMBEDDED_MODEL))
    with torch.inference_mode():
        return model(torch.tensor(rows, dtype=torch.float32))


def test_concurrent_callers_are_batched_and_get_their_own_rows(iris_server):
    before = batch_histogram(iris_server)
    bodies = [{"source": 1, "data": {"dtype": "float", "values": rows_for(i)}} for i in range(CALLERS)]
    responses = fire_together(iris_server, bodies)
    for caller, response in enumerate(responses):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["shape"] == [len(rows_for(caller)), 3]
        assert torch.allclose(torch.tensor(body["values"]), expected(rows_for(caller)), atol=1e-6)
    assert batches_larger_than_one(before, batch_histogram(iris_server)) >= 1


def test_one_malformed_request_fails_alone(iris_server):
    before = batch_histogram(iris_server)
    bodies = [{"source": 1, "data": {"dtype": "float", "values": rows_for(i)}} for i in range(CALLERS)]
    bad = 17
    bodies[bad] = {"source": 1, "data": {"dtype": "float", "values": [[1.0, 2.0, 3.0]]}}  # 3 features: model raises
    responses = fire_together(iris_server, bodies)
    for caller, response in enumerate(responses):
        if caller == bad:
            assert response.status_code == 422, response.text
            assert response.json()["code"] == "422"
            continue
        assert response.status_code == 200, response.text
        assert torch.allclose(torch.tensor(response.json()["values"]), expected(rows_for(caller)), atol=1e-6)
    assert batches_larger_than_one(before, batch_histogram(iris_server)) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("how", ["batching-off", "rank-1"])
def test_a_request_that_runs_alone_is_answered_when_its_own_forward_ends(tmp_path, how):
    # Requests that ran alone were answered together, after the last of their forwards (explorer N4): with 0.8 s
    # forwards, 8 concurrent callers all waited 6.4 s and timed out at REQUEST_TIMEOUT_S=5 although theirs had run.
    forwards = tmp_path / "forwards.log"
    path = save(Sleepy(0.6, str(forwards)), tmp_path / "sleepy.pt", "pickle", torch.zeros(1, 2))
    kw_args = {"model_path": str(path), **({"batching": False} if how == "batching-off" else {})}
    env = {"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps(kw_args), "ALLOW_PICKLED_MODELS": "true", "API_WORKERS": "1"}
    body = {"source": 1, "data": {"dtype": "float", "values": [[1.0, 2.0]] if how == "batching-off" else [1.0, 2.0]}}
    with serving(env, tmp_path) as server:
        assert server.post(body).status_code == 200
        forwards.write_text("")
        answered: list[float] = []

        def call(_: int) -> requests.Response:
            response = requests.post(f"{server.url}/service_output", json=body, timeout=60)
            answered.append(time.time())
            return response

        with ThreadPoolExecutor(5) as pool:
            blocker = pool.submit(call, 0)
            time.sleep(0.25)  # the next four queue behind the blocker's forward: before, they became one batch
            responses = [blocker.result(), *pool.map(call, range(4))]
    assert all(response.status_code == 200 for response in responses), [r.text for r in responses]
    runs = sorted(tuple(map(float, line.split())) for line in forwards.read_text().split("\n") if line)
    assert len(runs) == 5, runs
    # Causal, not a time limit: before, the requests that queued together came back together, after the last forward
    # started. With batching off each request is a call of its own, so three answers are back before it; rank-1
    # requests that reach an API worker in one turn of its loop still share a call, so only the first is sure to be.
    back_before_the_last = 3 if how == "batching-off" else 2
    assert sorted(answered)[back_before_the_last - 1] < runs[4][0], (answered, runs)
