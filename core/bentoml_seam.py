"""The only module that touches BentoML below its public API, written for BentoML 1.4.40; the fast path.

What it holds, each used only when the fast path is on (``fast_path()``):

- ``FastRoute``: one busy route straight to its handler, ahead of BentoML's middleware stack (the public service
  also puts ``/readyz`` on one, so that a service still loading answers the contract's JSON 503 rather than
  BentoML's plain text). BentoML wraps every
  route in ~8 ASGI layers (error handling, metrics, OpenTelemetry, access log, timeout, concurrency, exceptions,
  routing), each with its own ``send`` wrapper, and its typed endpoints add pydantic IO models on top; for the two
  routes that carry the traffic (the public ``POST /service_output``, the runner's ``POST /infer``) those layers
  cost about half of the process's CPU per request (docs/performance.md, sections 8 and 12). What the skipped
  layers did for the route is kept: the same ``bentoml_service_request_*`` series reach /metrics (recorded into
  BentoML's own metric objects, with the same labels), and the access log line when access logging is on.
- The runner's half of the fast path: ``RunnerService`` (the runner's ``service_class``) puts ``PickledCall`` on
  a ``FastRoute`` for ``POST /infer``; it speaks BentoML's pickle serde (``PickleSerde``, ``Payload``), as the
  API workers' client does (public/runner_client.py).
- ``path_item``: BentoML's OpenAPI path object, for the raw routes' documentation (public/openapi.py).
- Fixes of BentoML 1.4.40, applied by ``fast_path()``. BentoML looks the classes up in their modules each time it
  builds an app, so replacing the module attributes is enough.

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

On another BentoML version, or with ``INFERNET_FAST_PATH=0``, none of this is used: the service runs on BentoML's
public path (its typed ``@bentoml.api`` route for the runner call, the ``bentoml.depends`` client, BentoML's own
middleware), and one log line says that the fast path is off and why.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import copyreg
import errno
import io
import logging
import os
import pickle
import shutil
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from time import perf_counter, time
from typing import Any

import bentoml
import numpy as np
import orjson
from bentoml.exceptions import BentoMLException
from starlette.responses import JSONResponse
from starlette.routing import Match

from core import leftovers
from core.asgi import Receive, Scope, Send, read_body
from core.tensor_values import reduce_array
from core.terms import error_body

WRITTEN_FOR = "1.4.40"  # the BentoML version whose internals this module uses
PICKLE = "application/vnd.bentoml+pickle"  # BentoML's pickle serde's media type (PickleSerde.media_type)
log = logging.getLogger("core.bentoml_seam")

try:
    from _bentoml_impl.serde import Payload, PickleSerde  # the runner call's wire format (both sides)
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.context import server_context
    from bentoml._internal.server.http import instruments, traffic
    from bentoml._internal.server.http.instruments import RunnerTrafficMetricsMiddleware as _MetricsMiddleware
    from bentoml._internal.server.http.traffic import TimeoutMiddleware as _TimeoutMiddleware
    from bentoml._internal.service.openapi.specification import PathItem

    _IMPORT_ERROR: ImportError | None = None
except ImportError as e:  # another BentoML: fast_path() says why it is off; nothing below is used
    _IMPORT_ERROR = e
    _MetricsMiddleware = _TimeoutMiddleware = object  # type: ignore[misc,assignment]


def installed_bentoml() -> str:
    return metadata.version("bentoml")


def why_not_fast(wanted: bool, version: str) -> str | None:
    """Why the fast path cannot be on (None: it can): switched off, another BentoML version, or its internals
    missing."""
    if not wanted:
        return "INFERNET_FAST_PATH is off"
    if version != WRITTEN_FOR:
        return f"BentoML {version} is installed; the fast path is written for {WRITTEN_FOR}"
    if _IMPORT_ERROR is not None:
        return f"BentoML's internals cannot be imported ({_IMPORT_ERROR})"
    return None


def fast_path(wanted: bool) -> bool:
    """At import of service.py, in every process: whether the fast path is on. On, BentoML 1.4.40's fixes are
    applied (once per process); off, one line says why and BentoML is left as it is."""
    reason = why_not_fast(wanted, installed_bentoml())
    if reason is not None:
        log.warning("fast path off (%s): serving through BentoML's public API", reason)
        return False
    traffic.TimeoutMiddleware = TimeoutMiddleware  # type: ignore[misc]
    instruments.RunnerTrafficMetricsMiddleware = RunnerTrafficMetricsMiddleware  # type: ignore[misc]
    own_metrics_directory()
    return True


def path_item(item: dict[str, Any]) -> Any:
    """BentoML's OpenAPI path object for one path of the document."""
    return PathItem(**item)


access_log = logging.getLogger("bentoml.access")

Handler = Callable[[Scope, Receive, Send], Awaitable[int]]  # answers the request, returns the status it sent


class RouteMetrics:
    """The series BentoML's metrics middleware writes for a request, written for the fast route."""

    def __init__(self, middleware: Any, route: str) -> None:
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
    """``route`` straight to ``handler`` (returns the status sent), every other request to ``bentoml_app``. FastRoutes
    nest: the outer one finds BentoML's metrics middleware through the inner one's ``middleware_stack``."""

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

    @property
    def middleware_stack(self) -> Any:
        return getattr(self.bentoml_app, "middleware_stack", None)

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
        if isinstance(layer, _MetricsMiddleware):
            return RouteMetrics(layer, route)
        layer = getattr(layer, "app", None)
    return None


# The runner's fast route: its ``POST /infer``, as the API workers send it, straight to the runner's ``infer``.
#
# The API workers send the call's arguments in BentoML's pickle serde, as the client of ``bentoml.depends`` does (one
# body: protocol-5 pickle plus its out-of-band buffers, and a ``buffer-lengths`` header), and read the answer the same
# way; ``public/runner_client.py`` is their side. BentoML's stack and typed endpoint around that call cost more of the
# runner's CPU than a small model's forward (docs/performance.md, section 12). ``PickledCall`` answers it in
# BentoML's pickle serde's format (``pickled_answer``: small arrays in the pickle), so BentoML's client works here
# too; a request in any other form (JSON from a person, another route) goes through BentoML as before.

CLIENT_GONE = 499  # for the metrics: the API worker went away before the answer (nginx's code); nothing is sent


def is_pickled_call(scope: Scope) -> bool:
    if scope["method"] != "POST":
        return False
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";")[0].strip().decode("latin-1") == PICKLE
    return False


class PickledCall:
    """Calls one API method of the running service instance with a pickled request's arguments."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.serde = PickleSerde()
        self._bound: Any = None  # looked up once: BentoML builds a new wrapper (with its signature) per lookup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> int:
        if self._bound is None:
            try:
                # .local: the instance's own method; the attribute itself would call this service again over HTTP.
                self._bound = getattr(bentoml.get_current_service(), self.method).local
            except BentoMLException:  # not instantiated yet; BentoML's lifespan normally rules this out
                return await _error(send, 503, "the runner is starting")
        method = self._bound
        try:
            body = await read_body(receive)
            headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
            arguments = self.serde.deserialize_value(Payload((body,), metadata=headers))
            payload = pickled_answer(await method(**arguments))
        except ConnectionError:  # ClientDisconnected, or the answer could not be sent
            return CLIENT_GONE
        except asyncio.CancelledError:
            # uvicorn cancels the calls still running when the shutdown bound is over (the runner's Drain waited
            # SHUTDOWN_TIMEOUT_S); the API worker has answered its client 503 by then. Said in one line: uvicorn
            # would log an ERROR with a traceback for each, and operators alert on those.
            log.warning("runner call %s cancelled: the server is stopping (SHUTDOWN_TIMEOUT_S)", self.method)
            try:
                return await _error(send, 503, "the runner is stopping")
            except Exception:  # the connection is closing with the server
                return CLIENT_GONE
        except Exception:
            log.exception("runner call %s failed", self.method)
            return await _error(send, 500, f"{self.method} failed; see the runner's log")
        body = b"".join(payload.data)
        headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in payload.metadata.items()]
        return await _send(send, 200, PICKLE, body, headers)


def pickled_answer(value: Any) -> Payload:
    """``value`` as BentoML's ``PickleSerde.serialize_value`` sends it (protocol 5, buffers out of band, their lengths
    in ``buffer-lengths``: BentoML's client reads it), except that a small numpy array goes in the pickle
    (core/tensor_values.py ``reduce_array``): numpy would send each answer's values as a buffer of its own."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    pickler = pickle.Pickler(stream, protocol=5, buffer_callback=buffers.append)
    # Per call, so a reducer registered with copyreg after import counts, as it does for pickle.dumps.
    pickler.dispatch_table = {**copyreg.dispatch_table, np.ndarray: reduce_array}
    pickler.dump(value)
    data: list[bytes | memoryview] = [stream.getvalue()]
    for buffer in buffers:
        data.append(buffer.raw())
        buffer.release()
    return Payload(data, {"buffer-lengths": ",".join(str(len(part)) for part in data)})


async def _error(send: Send, status: int, message: str) -> int:
    # The client reads an error's body as text (BentoML's own errors are {"error": ...} JSON).
    return await _send(send, status, "application/json", orjson.dumps({"error": message}))


async def _send(send: Send, status: int, media_type: str, body: bytes, headers: list | None = None) -> int:
    start = [(b"content-type", media_type.encode()), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": start})
    await send({"type": "http.response.body", "body": body})
    return status


class RunnerService(bentoml.Service):
    """The runner's class (``service_class`` of ``@bentoml.service``): ``POST /infer`` in BentoML's pickle serde
    goes to ``PickledCall`` (fast path only); with middleware added to the service, every request goes through BentoML's
    stack.

    Only as a dependency: like BentoML's own endpoint, a service that faces clients (``is_main``) never unpickles
    what it is sent, since unpickling runs code of the sender's choosing."""

    def to_asgi(self, is_main: bool = True) -> Any:
        app = super().to_asgi(is_main)
        if is_main or self.middlewares:
            return app
        return FastRoute(app, "/infer", PickledCall("infer"), access_log_enabled(), accepts=is_pickled_call)


def cors_enabled() -> bool:
    """Whether BentoML's CORS middleware is switched on (then every request must go through BentoML's stack)."""
    return bool(BentoMLContainer.http.cors.enabled.get())


def access_log_enabled() -> bool:
    """The service's ``logging.access.enabled``; valid once BentoML has applied the service's configuration."""
    return bool(BentoMLContainer.api_server_config.logging.access.enabled.get())


class TimeoutMiddleware(_TimeoutMiddleware):
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


class RunnerTrafficMetricsMiddleware(_MetricsMiddleware):
    def __init__(self, app: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(_with_own_path(app), *args, **kwargs)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] != "/metrics":
            label = endpoint_label(scope)
            if label != scope["path"]:
                scope = {**scope, "path": label, _OWN_PATH: scope["path"]}
        await super().__call__(scope, receive, send)


def endpoint_label(scope: Any) -> str:
    """The route serving the request, from the app's own router: a route's path (a mount's prefix), the route an app
    mounted at "/" names with its ``endpoint_label(path)`` (a template for routes with parameters), else
    ``UNMATCHED``. Any method: a wrong one still names the route."""
    path = scope["path"]
    routes = getattr(getattr(scope.get("app"), "router", None), "routes", ())
    catch_all = []
    for route in routes:
        template = getattr(route, "path", "")
        if not template:  # mounted at "/": matches every path
            catch_all.append(route)
        elif route.matches(scope)[0] != Match.NONE:
            return template
    for route in catch_all:
        label = getattr(getattr(route, "app", None), "endpoint_label", None)
        named = label(path) if callable(label) else None
        if named:
            return named
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
    home = Path(BentoMLContainer.bentoml_home.get())
    leftovers.remove_dead(home, _METRICS_PREFIX)  # those of servers killed before their exit handlers ran
    directory = home / f"{_METRICS_PREFIX}{leftovers.owner_tag()}"
    BentoMLContainer.prometheus_multiproc_dir.set(str(directory))
    global _own_metrics_directory
    _own_metrics_directory = directory
    atexit.register(remove_own_metrics_directory)
    return directory


_own_metrics_directory: Path | None = None
_METRICS_PREFIX = "prometheus_multiproc_dir."


def remove_own_metrics_directory() -> None:
    """In the ``bentoml serve`` process, at exit: remove the directory ``own_metrics_directory`` chose (nothing when
    it chose none). Also called by an exit that skips the exit handlers (a start-up stopped by a worker). Raises
    nothing."""
    if _own_metrics_directory is not None:
        shutil.rmtree(_own_metrics_directory, ignore_errors=True)


# --- BentoML's process manager (circus), in ``bentoml serve``'s main process ---------------------------------------

RUNNER_SERVICE = "WorkflowRunner"  # service.py's runner class: BentoML names its worker's command line after it


def on_process_manager_stop(callback: Callable[[], None]) -> bool:
    """Call ``callback`` (in the main thread's signal handler: it must not block) whenever BentoML's process
    manager starts a stop: circus routes SIGTERM, SIGINT and SIGQUIT to its ``SysHandler.quit``. Replaces that
    class attribute: the handler looks it up when the signal arrives, so this works before or after the arbiter
    started. False when circus is not the one this was written for (nothing replaced)."""
    try:
        from circus.sighandler import SysHandler
    except ImportError:
        return False
    quit_ = getattr(SysHandler, "quit", None)
    if not callable(quit_):
        return False

    def quit_and_call(self: Any) -> None:
        callback()
        quit_(self)

    SysHandler.quit = quit_and_call
    return True


def stop_on_hangup() -> bool:
    """In ``bentoml serve``'s main process: SIGHUP stops the server as SIGTERM does (graceful, bounded), where
    circus would reload every worker: a reload re-reads nothing (the workers inherit the environment read once at
    start-up), so it only reloads the model and answers 503 meanwhile; and a hang-up (the terminal that ran the
    server closed) is an end, not a reason to restart. False when circus is not the one this was written for."""
    try:
        from circus.sighandler import SysHandler
    except ImportError:
        return False
    if not callable(getattr(SysHandler, "handle_hup", None)) or not callable(getattr(SysHandler, "quit", None)):
        return False

    def handle_hup(self: Any) -> None:
        log.warning("SIGHUP: stopping as on SIGTERM (configuration is read only at start-up: start the server again)")
        self.quit()

    SysHandler.handle_hup = handle_hup
    return True


def is_runner_command(cmdline: list[str]) -> bool:
    """Whether a worker's command line is the model runner's (BentoML passes ``--service-name <class>``)."""
    return f"--service-name {RUNNER_SERVICE}" in " ".join(cmdline)


class _ListenError(OSError):
    """A socket of the server could not be bound; the message says which and what to change."""


def on_listen_error(callback: Callable[[str], None]) -> bool:
    """In ``bentoml serve``'s main process, before its process manager starts: when the manager cannot bind one of
    the server's sockets (the public port already in use, a port below 1024 without the privilege, a host that is not
    this machine's), ``callback`` gets one line naming the address and the fix, instead of circus' traceback; it is
    expected to exit. False (nothing replaced) when circus or BentoML's arbiter is not the one this was written for."""
    try:
        from bentoml._internal.utils.circus import Arbiter
        from circus.sockets import CircusSocket
    except ImportError:
        return False
    bind_and_listen, start = CircusSocket.bind_and_listen, Arbiter.start

    def bind_or_explain(self: Any) -> None:
        try:
            bind_and_listen(self)
        except OSError as e:
            raise _ListenError(_listen_failure(self.location, e)) from None

    def start_or_report(self: Any, cb: Any = None) -> None:
        try:
            start(self, cb)
        except _ListenError as e:
            with contextlib.suppress(Exception):
                self.exit_stack.__exit__(None, None, None)  # what stop() would clean up (BentoML's socket folder)
            callback(str(e))
            raise

    CircusSocket.bind_and_listen = bind_or_explain
    Arbiter.start = start_or_report
    # circus logs "Could not bind <address>" (twice, through BentoML's handlers) before raising: the line above says it.
    logging.getLogger("circus").addFilter(lambda record: not str(record.msg).startswith("Could not bind"))
    return True


def _listen_failure(location: str, error: OSError) -> str:
    fix = {
        errno.EADDRINUSE: "another process listens there: stop it, or choose another port",
        errno.EACCES: "ports below 1024 need privileges: choose a port of 1024 or above",
        errno.EADDRNOTAVAIL: "the host is not an address of this machine: choose another --host (0.0.0.0: all)",
    }.get(error.errno, "choose another port or host")
    # make serve always passes --port $(PORT) --host $(HOST): there BENTOML_PORT changes nothing.
    where = "bentoml serve --port / --host, or BENTOML_PORT; make serve PORT=... HOST=..."
    return f"cannot listen on {location} ({error.strerror or error}); {fix} ({where})"
