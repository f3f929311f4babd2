"""Fixes for BentoML 1.4.40 that the service needs, applied once at import.

BentoML looks the classes up in their modules each time it builds an app, so replacing the module attributes is
enough.

- ``TimeoutMiddleware`` schedules a timer per request and never cancels it, so every request leaves a
  TimerHandle, a Future and a Context alive for the whole timeout: ~1 KB each, which at 3k requests/s and a 70 s
  timeout holds ~200 MB per worker (docs/reliability.md, "Soak"). The replacement behaves the same (a JSON 504
  when no response has started within the timeout) and cancels its timer when the request ends.
- ``RunnerTrafficMetricsMiddleware`` labels each request's series with its path, so every unknown path any client
  sends adds ~20 lines to /metrics for good (docs/reliability.md, "Metrics labels"). The replacement labels a
  request with the route that serves it (its template for a mount, e.g. ``/static_content``) and every path no
  route serves as one ``<unmatched>``; the app still sees the request's own path.
- ``bentoml serve`` empties ``$BENTOML_HOME/prometheus_multiproc_dir`` when it starts, so a second server on the
  same host and ``BENTOML_HOME`` deletes the metric files of the first, which from then on reports the second's
  numbers. Each server gets a directory of its own instead, removed when it exits (``own_metrics_directory``).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import socket
from pathlib import Path
from typing import Any

from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.server.http import instruments, traffic
from starlette.responses import JSONResponse
from starlette.routing import Match

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


UNMATCHED = "<unmatched>"  # the endpoint label of every request no route serves
_OWN_PATH = "infernet.own_path"  # scope key: the request's path while the metrics middleware sees its label


class RunnerTrafficMetricsMiddleware(instruments.RunnerTrafficMetricsMiddleware):
    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(_with_own_path(app), *args, **kwargs)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] != "/metrics":
            label = endpoint_label(scope)
            if label != scope["path"]:
                scope = {**scope, "path": label, _OWN_PATH: scope["path"]}
        await super().__call__(scope, receive, send)


def endpoint_label(scope: Any) -> str:
    """The route serving the request, from the app's own router: a route's path (a mount's prefix), a path that an
    app mounted at "/" declares in its ``paths``, else ``UNMATCHED``. Any method: a wrong one still names the route."""
    path = scope["path"]
    routes = getattr(getattr(scope.get("app"), "router", None), "routes", ())
    catch_all = []
    for route in routes:
        template = getattr(route, "path", "")
        if not template:  # mounted at "/": matches every path
            catch_all.append(route)
        elif route.matches(scope)[0] != Match.NONE:
            return template
    if any(path in getattr(getattr(route, "app", None), "paths", ()) for route in catch_all):
        return path
    return UNMATCHED


def _with_own_path(app: Any) -> Any:
    async def own_path(scope: Any, receive: Any, send: Any) -> None:
        if _OWN_PATH in scope:
            scope = {**scope, "path": scope[_OWN_PATH]}
            del scope[_OWN_PATH]
        await app(scope, receive, send)

    return own_path


def own_metrics_directory() -> Path | None:
    """In the ``bentoml serve`` process, before BentoML prepares the directory: point BentoML's multiprocess
    metrics directory at one of this server's own, removed at exit. Workers inherit it as PROMETHEUS_MULTIPROC_DIR
    and leave it alone. Returns the directory, or None in a worker."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None  # a worker: its server chose the directory
    # Host and pid: two servers sharing BENTOML_HOME (a volume shared by containers, too) never pick the same one.
    name = f"prometheus_multiproc_dir.{socket.gethostname()}.{os.getpid()}"
    directory = Path(BentoMLContainer.bentoml_home.get()) / name
    BentoMLContainer.prometheus_multiproc_dir.set(str(directory))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


def apply() -> None:
    traffic.TimeoutMiddleware = TimeoutMiddleware  # type: ignore[misc]
    instruments.RunnerTrafficMetricsMiddleware = RunnerTrafficMetricsMiddleware  # type: ignore[misc]
    own_metrics_directory()
