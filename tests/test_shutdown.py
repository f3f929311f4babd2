"""Graceful shutdown: SIGTERM to ``bentoml serve`` lets the requests in flight finish, refuses new ones without
running them, and every process is gone within a bound."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from tests.fixtures.server import serving
from tests.reliability_support import Outcome, assert_contract_error, env, figure, post, processes, sleeping

pytestmark = pytest.mark.slow

SLOW_S = 3.0
EXIT_BOUND_S = 30  # BentoML's process manager gives workers this long before it kills them


def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(tmp_path):
    with serving(env(tmp_path, REQUEST_TIMEOUT_S="20"), tmp_path) as server:
        every_pid = [p.pid for group in processes(server).values() for p in group]
        in_flight: list[Outcome] = []
        callers = [
            threading.Thread(target=lambda: in_flight.append(post(server, sleeping(SLOW_S), timeout=60)))
            for _ in range(4)
        ]
        for caller in callers:
            caller.start()
        time.sleep(1.0)  # the requests have reached the service (each holds the model SLOW_S)
        os.kill(server.process.pid, signal.SIGTERM)
        terminated = time.monotonic()
        time.sleep(0.3)
        late = [post(server, sleeping(0.0), timeout=30) for _ in range(3)]
        for caller in callers:
            caller.join(60)
        server.process.wait(EXIT_BOUND_S)
        exited_after = time.monotonic() - terminated

    assert len(in_flight) == 4
    for outcome in in_flight:
        assert outcome.status == 200, outcome.error or outcome.response.text
        assert outcome.response.json()["values"] == [[2 * SLOW_S, 0.0, 0.0]]
    for outcome in late:
        # Refused cleanly: the connection is refused or reset before the request is read, or a JSON 503.
        if outcome.status is not None:
            assert_contract_error(outcome.response, 503)
        else:
            assert "Connection" in outcome.error, outcome.error
    assert server.process.returncode == 0
    left = [pid for pid in every_pid if _alive(pid)]
    assert not left, f"processes left after shutdown: {left}"
    figure(
        "shutdown",
        in_flight=[(o.status, round(o.seconds, 2)) for o in in_flight],
        late=[o.status or o.error.split(":")[0] for o in late],
        exited_after_s=round(exited_after, 2),
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
