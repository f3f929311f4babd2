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


def test_another_bentoml_version_turns_the_fast_path_off():
    assert bentoml_fixes.why_not_fast(True, bentoml_fixes.WRITTEN_FOR) is None
    reason = bentoml_fixes.why_not_fast(True, "1.5.0")
    assert reason == "BentoML 1.5.0 is installed; the fast path is written for 1.4.40"
    assert bentoml_fixes.why_not_fast(False, bentoml_fixes.WRITTEN_FOR) == "INFERNET_FAST_PATH is off"


def test_fast_path_off_applies_no_fix(monkeypatch, caplog):
    from bentoml._internal.server.http import traffic

    original = traffic.TimeoutMiddleware
    monkeypatch.setattr(bentoml_fixes, "installed_bentoml", lambda: "9.9.9")
    with caplog.at_level("WARNING", logger="core.bentoml_seam"):
        assert bentoml_fixes.fast_path(True) is False
    assert traffic.TimeoutMiddleware is original
    assert [r.getMessage() for r in caplog.records] == [
        "fast path off (BentoML 9.9.9 is installed; the fast path is written for 1.4.40): "
        "serving through BentoML's public API"
    ]
