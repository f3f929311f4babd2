"""A fix for BentoML 1.4.40 that the service needs, applied once at import.

BentoML looks the class up in its module each time it builds an app, so replacing the module attribute is enough.

- ``TimeoutMiddleware`` schedules a timer per request and never cancels it, so every request leaves a
  TimerHandle, a Future and a Context alive for the whole timeout: ~1 KB each, which at 3k requests/s and a 70 s
  timeout holds ~200 MB per worker (docs/reliability.md, "Soak"). The replacement behaves the same (a JSON 504
  when no response has started within the timeout) and cancels its timer when the request ends.
"""

from __future__ import annotations

import asyncio
from typing import Any

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


def apply() -> None:
    traffic.TimeoutMiddleware = TimeoutMiddleware  # type: ignore[misc]
