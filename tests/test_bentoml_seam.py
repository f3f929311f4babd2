"""api/bentoml_fixes.py, against BentoML's own middleware run in-process (no server needed)."""

from __future__ import annotations

import asyncio

from core import bentoml_seam as bentoml_fixes


def test_apply_installs_the_fix(monkeypatch):
    from bentoml._internal.server.http import traffic

    monkeypatch.setattr(traffic, "TimeoutMiddleware", bentoml_fixes.TimeoutMiddleware.__mro__[1])
    monkeypatch.setattr(bentoml_fixes, "own_metrics_directory", lambda: None)  # keeps this process's metrics dir
    assert bentoml_fixes.fast_path(True)
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
