"""Fixes for BentoML 1.4.40 that the service needs, applied once at import.

BentoML looks both classes up in their modules each time it builds an app or a dispatcher, so replacing the
module attributes is enough.

- ``TimeoutMiddleware`` schedules a timer per request and never cancels it, so every request leaves a
  TimerHandle, a Future and a Context alive for the whole timeout: ~1 KB each, which at 3k requests/s and a 70 s
  timeout holds ~200 MB per worker (docs/reliability.md, "Soak"). The replacement behaves the same (a JSON 504
  when no response has started within the timeout) and cancels its timer when the request ends.
- The batching dispatcher's ``Optimizer`` holds a lone call back for the average time past calls waited. Under
  load that average is the time calls queued behind a busy model, and each held call then feeds its own hold back
  into the average, so after one burst every lone request waits for it (c=1 p50 1.6 -> 3-5 ms, and it stays;
  docs/performance.md, section 9). Here the API workers already send what arrived together as one call, so the
  runner never holds: a call goes out as soon as the model is free, and calls that queued while it was busy go out
  together, which is the batching that pays.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bentoml._internal.marshal import dispatcher
from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse

from api.contract import error_body


class TimeoutMiddleware(traffic.TimeoutMiddleware):
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        started: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(self.timeout, self._set_timer_out, started)

        async def send_and_mark(message: Any) -> None:
            if not started.done():
                started.set_result(None)
            await send(message)

        app = asyncio.ensure_future(self.app(scope, receive, send_and_mark))
        try:
            await started
        except TimeoutError:
            if app.cancel():
                body = error_body(504, f"no response within {self.timeout:g} s")
                await JSONResponse(body, status_code=504)(scope, receive, send)
            return
        finally:
            timer.cancel()
        await app


class Optimizer(dispatcher.Optimizer):
    """The dispatcher's latency model, kept for its load shedding (MAX_LATENCY_MS), with no holding back."""

    @property
    def wait(self) -> float:
        return 0.0

    @wait.setter
    def wait(self, value: float) -> None:
        pass  # the average the dispatcher would hold calls for; see the module docstring


def apply() -> None:
    traffic.TimeoutMiddleware = TimeoutMiddleware  # type: ignore[misc]
    dispatcher.Optimizer = Optimizer  # type: ignore[misc]
