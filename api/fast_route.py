"""One busy route straight to its handler, ahead of BentoML's middleware stack.

BentoML wraps every route in ~8 ASGI layers (error handling, metrics, OpenTelemetry, access log, timeout,
concurrency, exceptions, routing), each with its own ``send`` wrapper, and its typed endpoints add pydantic IO
models on top. For the two routes that carry the traffic those layers cost about half of the process's CPU per
request (docs/performance.md, sections 8 and 12). ``FastRoute`` sits outside the stack and hands one route to its
handler directly; every other request goes through BentoML unchanged. It is used twice:

- the public service's ``POST /service_output`` goes to ``PublicApp``, which answers its own errors, timeouts (504)
  and overload (503);
- the runner's ``POST /infer``, as the API workers send it (``api/runner_client.py``), goes to the runner's own
  ``infer`` method (``api/runner_route.py``).

What the skipped layers did for the route is kept: the same ``bentoml_service_request_*`` series reach /metrics
(recorded into BentoML's own metric objects, with the same labels), and the access log line is written when the
service's ``logging.access.enabled`` is switched on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from time import perf_counter, time
from typing import Any

from bentoml._internal.configuration.containers import BentoMLContainer
from bentoml._internal.context import server_context
from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware

from api.app import PublicApp, Receive, Scope, Send
from api.openapi import DocumentedService

ROUTE = "/service_output"
access_log = logging.getLogger("bentoml.access")

Handler = Callable[[Scope, Receive, Send], Awaitable[int]]  # answers the request, returns the status it sent


class RouteMetrics:
    """The series BentoML's metrics middleware writes for a request, written for the fast route."""

    def __init__(self, middleware: RunnerTrafficMetricsMiddleware, route: str) -> None:
        if not middleware._is_setup:
            middleware._setup()
        self._middleware = middleware
        self._service = {
            "service_name": server_context.bento_name,
            "service_version": server_context.bento_version,
            "runner_name": server_context.service_name,
        }
        self._route = route
        labels = {"endpoint": route, **self._service}
        self.in_progress = middleware.metrics_request_in_progress.labels(**labels)
        self._last_request = middleware.metrics_last_request_timestamp.labels(**self._service)
        self._by_status: dict[int, tuple[Any, Any]] = {}  # labels() costs more than the update itself

    def started(self) -> None:
        self._last_request.set(time())

    def finished(self, status: int, seconds: float) -> None:
        series = self._by_status.get(status)
        if series is None:
            labels = {"endpoint": self._route, "http_response_code": status, **self._service}
            m = self._middleware
            series = self._by_status[status] = (
                m.metrics_request_total.labels(**labels),
                m.metrics_request_duration.labels(**labels),
            )
        total, duration = series
        total.inc()
        duration.observe(seconds)


class FastRoute:
    def __init__(
        self,
        bentoml_app: Any,
        route: str,
        handler: Handler,
        access_log_enabled: bool,
        accepts: Callable[[Scope], bool] = lambda scope: True,
    ) -> None:
        self.bentoml_app = bentoml_app
        self.route = route
        self.handler = handler
        self.access_log_enabled = access_log_enabled
        self.accepts = accepts  # requests on the route that the handler does not take go through BentoML
        self._metrics: RouteMetrics | None = None
        self._metrics_found = False  # looked up at the first request: Starlette builds its stack lazily

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.route or not self.accepts(scope):
            return await self.bentoml_app(scope, receive, send)
        metrics = self.metrics()
        started = perf_counter()
        if metrics is None:
            status = await self.handler(scope, receive, send)
        else:
            metrics.started()
            with metrics.in_progress.track_inprogress():
                status = await self.handler(scope, receive, send)
            metrics.finished(status, perf_counter() - started)
        if self.access_log_enabled:
            client = scope.get("client") or ("-", 0)
            access_log.info(
                "%s:%s (method=%s,path=%s) (status=%s) %.3fms",
                *client,
                scope["method"],
                self.route,
                status,
                (perf_counter() - started) * 1000,
            )

    def metrics(self) -> RouteMetrics | None:
        if not self._metrics_found:
            stack = getattr(self.bentoml_app, "middleware_stack", None)
            if stack is None:  # built at the app's first call (the lifespan); not yet
                return None
            self._metrics, self._metrics_found = _find_metrics(stack, self.route), True
        return self._metrics


def _find_metrics(layer: Any, route: str) -> RouteMetrics | None:
    """BentoML's metrics middleware in the built stack; None when metrics are switched off."""
    while layer is not None:
        if isinstance(layer, RunnerTrafficMetricsMiddleware):
            return RouteMetrics(layer, route)
        layer = getattr(layer, "app", None)
    return None


class FastRouteService(DocumentedService):
    """The public service's class (``service_class`` of ``@bentoml.service``): its ASGI app is ``FastRoute`` in
    front of BentoML's, and its OpenAPI document covers the raw routes (``DocumentedService``)."""

    def to_asgi(self, is_main: bool = True) -> Any:
        app = super().to_asgi(is_main)  # also applies this service's configuration to BentoML's container
        public = next((mounted for mounted, *_ in self.mount_apps if isinstance(mounted, PublicApp)), None)
        # CORS and middleware added to the service must see every request: then BentoML's stack serves them all.
        if public is None or self.middlewares or BentoMLContainer.http.cors.enabled.get():
            return app
        return FastRoute(app, ROUTE, public.serve, access_log_enabled=access_log_enabled())


def access_log_enabled() -> bool:
    """The service's ``logging.access.enabled``; valid once BentoML has applied the service's configuration."""
    return bool(BentoMLContainer.api_server_config.logging.access.enabled.get())
