"""api/bentoml_fixes.py, against BentoML's own classes run in-process (no server needed for these two)."""

from __future__ import annotations

import asyncio

import pytest
from bentoml._internal.marshal import dispatcher

from api import bentoml_fixes

BENTOML_OPTIMIZER = bentoml_fixes.Optimizer.__mro__[1]


async def bursts(monkeypatch: pytest.MonkeyPatch, optimizer: type) -> tuple[float, list[int]]:
    """Three bursts of 40 calls, one every millisecond, through BentoML's dispatcher in front of a 5 ms model."""
    monkeypatch.setattr(dispatcher, "Optimizer", optimizer)
    cork = dispatcher.CorkDispatcher(10_000, 64, fallback=lambda: None, get_batch_size=lambda _: 1)
    batches: list[int] = []

    async def model(batch):
        batches.append(len(batch))
        await asyncio.sleep(0.005)
        return [x * 2 for x in batch]

    call = cork(model)
    try:
        for _ in range(3):  # the first calls go to the dispatcher's own warm-up and training
            calls = []
            for i in range(40):
                calls.append(asyncio.ensure_future(call(i)))
                await asyncio.sleep(0.001)
            assert await asyncio.gather(*calls) == [i * 2 for i in range(40)]
        cork.optimizer.trigger_refresh()
        return cork.optimizer.wait, batches
    finally:
        cork.shutdown()


def test_bentomls_dispatcher_learns_to_hold_lone_calls(monkeypatch):
    # What the fix is for: after a burst, the average wait (calls queued behind the busy model) is what BentoML's
    # dispatcher would hold the next lone call for.
    wait, _ = asyncio.run(bursts(monkeypatch, BENTOML_OPTIMIZER))
    assert wait > 0.001


def test_fixed_dispatcher_never_holds_and_still_batches(monkeypatch):
    wait, batches = asyncio.run(bursts(monkeypatch, bentoml_fixes.Optimizer))
    assert wait == 0.0
    assert sum(batches) == 120 and max(batches) > 1  # calls that queued while the model was busy went together


def test_apply_installs_both_fixes(monkeypatch):
    from bentoml._internal.server.http import traffic

    monkeypatch.setattr(dispatcher, "Optimizer", BENTOML_OPTIMIZER)
    monkeypatch.setattr(traffic, "TimeoutMiddleware", bentoml_fixes.TimeoutMiddleware.__mro__[1])
    bentoml_fixes.apply()
    assert dispatcher.Optimizer is bentoml_fixes.Optimizer
    assert traffic.TimeoutMiddleware is bentoml_fixes.TimeoutMiddleware


async def through_timeout_middleware(app, timeout: float, requests: int) -> tuple[list[dict], int]:
    middleware = bentoml_fixes.TimeoutMiddleware(app, timeout=timeout)
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/", "headers": []}
    for _ in range(requests):
        await middleware(scope, receive, send)
    loop = asyncio.get_running_loop()
    live_timers = sum(1 for handle in getattr(loop, "_scheduled", []) if not handle.cancelled())
    return sent, live_timers


async def quick_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def slow_app(scope, receive, send):
    await asyncio.sleep(5)


def test_timeout_middleware_leaves_no_timer_behind():
    sent, live_timers = asyncio.run(through_timeout_middleware(quick_app, timeout=60, requests=100))
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200] * 100
    assert live_timers == 0  # BentoML's own class leaves one 60 s timer per request


def test_timeout_middleware_still_answers_504():
    sent, _ = asyncio.run(through_timeout_middleware(slow_app, timeout=0.05, requests=1))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 504
    assert b'"code":"504"' in sent[1]["body"].replace(b" ", b"")
