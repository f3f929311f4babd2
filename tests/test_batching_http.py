"""Adaptive batching over HTTP: concurrent callers share forwards and each gets exactly its own rows."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import requests
import torch

from core.settings import EMBEDDED_MODEL

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
