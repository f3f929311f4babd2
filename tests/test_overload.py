"""Overload and timeouts: beyond MAX_CONCURRENCY the service answers 503 at once (JSON, Retry-After) instead of
queueing; a request that waited past MAX_LATENCY_MS for the model gets 503 instead of running late; a request that
outlives REQUEST_TIMEOUT_S gets the contract's JSON 504, never a dropped connection."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.fixtures.server import serving
from tests.reliability_support import (
    assert_contract_error,
    env,
    figure,
    post,
    post_many,
    row,
    sleeping,
    wait_for,
)

pytestmark = pytest.mark.slow

CONCURRENCY = 4
TIMEOUT_S = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("overload")
    settings = {"API_WORKERS": "1", "MAX_CONCURRENCY": str(CONCURRENCY), "REQUEST_TIMEOUT_S": str(TIMEOUT_S)}
    with serving(env(tmp, **settings), tmp) as server:
        yield server


def test_beyond_max_concurrency_answers_503_json_at_once(server):
    # 16 requests at once, each holding the runner for 1 s: 4 are admitted, the rest are refused.
    outcomes = post_many(server, [sleeping(1)] * 16, workers=16)
    statuses = Counter(o.status for o in outcomes)
    assert set(statuses) <= {200, 503, 504}, statuses
    refused = [o for o in outcomes if o.status == 503]
    # At most 4 are admitted at a time and each holds its slot >= 1 s; leave room for slow thread start-up.
    assert len(refused) >= 16 - 2 * CONCURRENCY, statuses
    for o in refused:
        body = assert_contract_error(o.response, 503)
        assert "MAX_CONCURRENCY" in body["description"]
    admitted = [o for o in outcomes if o.status != 503]
    for o in admitted:
        if o.status == 200:
            assert o.response.json()["values"] == [[2.0, 0.0, 0.0]]
        else:
            assert_contract_error(o.response, 504)
    seconds = sorted(o.seconds for o in refused)
    figure(
        "overload",
        sent=16,
        max_concurrency=CONCURRENCY,
        statuses=dict(statuses),
        time_to_503_ms={"median": round(seconds[len(seconds) // 2] * 1000, 1), "max": round(seconds[-1] * 1000, 1)},
        admitted_s=sorted(round(o.seconds, 2) for o in admitted),
    )


def test_service_answers_again_once_load_is_gone(server):
    outcome = post(server, row(1.0, 1.0, 2.0, 3.0))
    assert outcome.status == 200
    assert outcome.response.json()["values"] == [[2.0, 4.0, 6.0]]


def test_request_past_the_timeout_gets_json_504(server):
    outcome = post(server, sleeping(TIMEOUT_S + 2), timeout=TIMEOUT_S + 30)
    body = assert_contract_error(outcome.response, 504)
    assert "REQUEST_TIMEOUT_S" in body["description"]
    figure("timeout", request_timeout_s=TIMEOUT_S, answered_after_s=round(outcome.seconds, 2))


def test_requests_queued_behind_a_slow_one_time_out_in_json_not_dropped(server):
    # The runner is busy for 5 s; the others wait past the timeout and must each get a JSON answer.
    bodies = [sleeping(TIMEOUT_S + 2)] + [row()] * 3
    outcomes = post_many(server, bodies, workers=4, timeout=TIMEOUT_S + 30)
    for o in outcomes:
        assert o.status is not None, o.error
        if o.status != 200:
            assert_contract_error(o.response, 504)
    # The runner cannot abandon a forward pass already started; once it is done the service answers again.
    wait_for(lambda: post(server, row()).status == 200, timeout=30)


def test_a_request_that_waited_past_max_latency_for_the_model_gets_json_503(tmp_path):
    # The model is held for 1.5 s; a request queued behind it waits longer than MAX_LATENCY_MS and is refused
    # by the runner's model thread instead of being run late.
    with serving(env(tmp_path, API_WORKERS="1", MAX_LATENCY_MS="300"), tmp_path) as server:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(post, server, sleeping(1.5))
            time.sleep(0.4)  # the slow request is in the model by now; the next one queues behind it
            late = post(server, row(1.0, 1.0, 2.0, 3.0))
            assert slow.result().status == 200
        body = assert_contract_error(late.response, 503)
        assert "MAX_LATENCY_MS" in body["description"]
        assert late.response.headers["retry-after"] == "1"
        assert post(server, row(1.0, 1.0, 2.0, 3.0)).status == 200  # once the model is free, requests run again
