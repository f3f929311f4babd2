"""The public routes as one raw ASGI app, mounted at "/" inside the BentoML service.

A raw app keeps the request path lean (orjson, no per-response schema work; see docs/performance.md).
BentoML's routes registered before the mount (/livez, /readyz, /metrics) match first; everything else lands here,
so unknown paths and wrong methods get the contract's JSON errors too. BentoML registers its page (/, /docs.json,
/static_content/) after the mount, so those GETs are handed back to BentoML's routes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote

import orjson
from starlette.exceptions import HTTPException
from starlette.routing import Match

from core.asgi import Receive, Scope, Send
from core.errors import Outcome, RequestError
from core.model_call import ForModel
from core.model_ids import ModelId, ModelIdError, allowed, parse_model_id
from core.settings import ServiceSettings
from core.terms import Destination, Source, error_body
from public import SERVICE_NAME, __version__, auth, chain, open_inference, request_body, resources
from public.answers import respond, runner_failure
from public.infernet_ml_layouts import (
    Layout,
    LayoutError,
    Reply,
    encode_chain_answer,
    format_offchain_answer,
    split_chain_request,
    split_request,
)
from public.infernet_request import parse_input
from public.request_body import BODY_READ, CODINGS, MAX_JSON_DEPTH, has_body, nesting_depth
from public.runner_client import RunnerCall, RunnerCallBatcher
from public.shutdown import ShutdownBound

log = logging.getLogger("public.app")
T = TypeVar("T")


_BENTOML_GET_ROUTES = {"/", "/livez", "/readyz", "/healthz", "/metrics", "/docs.json", "/schema.json"}
_BENTOML_STATIC = "/static_content/"
_GET = ("GET", "HEAD")
# Every route served and its methods: a 405 names them in Allow, OPTIONS answers with them (RFC 9110, 15.5.6).
ROUTE_METHODS: dict[str, tuple[str, ...]] = {
    "/service_output": ("POST",),
    "/info": _GET,
    "/service-resources": _GET,
    **dict.fromkeys(_BENTOML_GET_ROUTES, _GET),
}
_CLOSE = (b"connection", b"close")
# The first ABI word of today's CHAIN data, abi.encode(int256[]): the array's offset, 0x20. With CHAIN_LAYOUT=auto
# this hex prefix keeps today's requests on today's decoder without looking further.
_INT256_HEAD = "0" * 62 + "20"


class PublicApp:
    paths = frozenset({"/service_output", "/info", "/service-resources"})  # its own routes (metrics label them)

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._calls: RunnerCallBatcher | None = None
        self._describe: Callable[[], Awaitable[dict[str, Any]]] | None = None
        self._info: dict[str, Any] | None = None
        self._is_ready: Callable[[], Awaitable[bool]] | None = None
        self._runner_seen_ready = False
        self._in_progress = 0  # /service_output requests this worker is answering
        self._bearer = settings.bearer_token.encode() if settings.bearer_token else None
        self.shutdown = ShutdownBound()  # installed by the BentoML service in each API worker

    def bind(
        self,
        infer: RunnerCall,
        describe: Callable[[], Awaitable[Any]],
        is_ready: Callable[[], Awaitable[bool]],
    ) -> None:
        """Connect to the runner; called by the BentoML service in each API worker. ``infer`` sends a list of
        requests' data to the runner and returns their ``Outcome``s in order (one call per group, RunnerCallBatcher)."""
        self._calls = RunnerCallBatcher(infer, max_items=self.settings.max_batch_size)
        self._describe = describe
        self._is_ready = is_ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.serve(scope, receive, send)

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> int:
        """Answer one HTTP request; returns the status sent."""
        path, method = scope["path"], scope["method"]
        if method == "OPTIONS":
            return await _options(scope, send)
        if self._bearer is not None and auth.protects(path):
            refused = auth.refusal(scope, self._bearer)
            if refused is not None:
                return await auth.refuse(send, *refused)
        try:
            if path == "/service_output":
                if method != "POST":
                    raise RequestError(405, "use POST for /service_output")
                status, body = await self.limited_service_output(scope, receive)
            elif path == "/v2" or path.startswith("/v2/"):
                return await open_inference.serve(self, scope, receive, send)  # answers its own errors
            elif path == "/info":
                _only_get(method, path)
                status, body = 200, await self.info()
            elif path == "/service-resources":
                _only_get(method, path)
                status, body = 200, await self.service_resources(scope)
            elif path in _BENTOML_GET_ROUTES or path.startswith(_BENTOML_STATIC):
                _only_get(method, path)
                if await self._bentoml_route(scope, receive, send):
                    return 200  # answered by BentoML; the status is only read for /service_output
                raise RequestError(404, f"no route {path}")
            else:
                raise RequestError(404, f"no route {path}; the inference route is POST /service_output")
        except RequestError as e:
            status, body = e.status, error_body(e.status, e.description, e.errors)
        except Exception as e:
            log.exception("request to %s failed", path)
            status, body = 500, error_body(500, f"internal error: {type(e).__name__}")
        if status == 200 and scope.get(BODY_READ):
            return await respond(send, status, body)
        return await respond(send, status, body, extra_headers(scope, status))

    async def _bentoml_route(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Serve the request with the first of BentoML's own routes (other than this mount) that matches it."""
        router = getattr(scope.get("app"), "router", None)
        for route in getattr(router, "routes", ()):
            if getattr(route, "app", None) is self:
                continue
            match, child_scope = route.matches(scope)
            if match == Match.FULL:
                try:
                    await route.handle({**scope, **child_scope}, receive, send)
                except HTTPException as e:  # StaticFiles: no such file
                    raise RequestError(e.status_code, f"no file {scope['path']}") from None
                return True
        return False

    async def limited_service_output(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        return await self.limited(scope, receive, self.service_output)

    async def limited(self, scope: Scope, receive: Receive, handler: Callable[[Scope, Receive], Awaitable[T]]) -> T:
        """Run an inference request's ``handler`` within this worker's budget (MAX_CONCURRENCY) and deadline
        (REQUEST_TIMEOUT_S, or SHUTDOWN_TIMEOUT_S after SIGTERM). On the API worker's event loop. Raises
        RequestError: 503 overloaded, 408 body not received in time, 504 no answer in time."""
        # Refuse at once rather than queue: a queued request would only time out later, holding its body in memory.
        # Checked before the body is read, so an overloaded worker spends almost nothing on the refusal.
        limit = self.settings.max_concurrency_per_worker
        if self._in_progress >= limit:
            raise RequestError(503, f"overloaded: {limit} requests in progress in this worker (MAX_CONCURRENCY); retry")
        self._in_progress += 1
        timeout = self.settings.timeout_s
        try:
            # BentoML's own timeouts are set longer (service.py), so this JSON answer is the one a client sees.
            # asyncio.timeout, unlike wait_for, runs the request in this task instead of a new one. After SIGTERM
            # the deadline is also SHUTDOWN_TIMEOUT_S (a JSON 503; api/shutdown.py).
            async with self.shutdown.bounded(timeout):
                return await handler(scope, receive)
        except TimeoutError:
            if not scope.get(BODY_READ) and has_body(scope):
                raise RequestError(408, f"the body was not received within {timeout:g} s (REQUEST_TIMEOUT_S)") from None
            raise RequestError(504, f"no answer within {timeout:g} s (REQUEST_TIMEOUT_S)") from None
        finally:
            self._in_progress -= 1

    async def service_output(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        raw = await request_body.read(scope, receive, self.settings.max_request_bytes)
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise RequestError(400, f"body is not valid JSON: {e}") from None
        if nesting_depth(raw) > MAX_JSON_DEPTH:
            raise RequestError(400, f"body is nested deeper than {MAX_JSON_DEPTH} levels")
        request = parse_input(obj)
        data, reply = request.data, None
        if request.source == Source.CHAIN:
            layout = self.settings.chain_layout
            # Shorter than one word is no layout at all: today's decoder says what is wrong, as before.
            if layout == "int256" or (layout == "auto" and (len(data) < 64 or data[:64].lower() == _INT256_HEAD)):
                data = chain.decode_input(data)
            else:
                data, reply = self._named_model(*_layout(split_chain_request, data, layout, self.settings.max_elements))
        elif not isinstance(data.get("dtype"), str):  # not today's form: a 1.x/2.0 envelope or a 2.0 vector
            data, reply = self._named_model(*_layout(split_request, data, self.settings.max_elements))
        outcome = await self.infer(data)
        if outcome.status != 200:
            raise RequestError(outcome.status, outcome.description)
        if request.destination == Destination.CHAIN:
            if reply is None or reply.layout == Layout.CLASSIC:
                return 200, chain.encode_output(outcome.body)
            return 200, _answer(encode_chain_answer, outcome.body, reply)
        if reply is not None and reply.layout == Layout.V2:
            return 200, _answer(format_offchain_answer, outcome.body, reply)
        return 200, outcome.body

    def _named_model(self, model: ModelId | None, data: Any, reply: Reply) -> tuple[Any, Reply]:
        """The runner call's item for a request's data and the model it names; refuses a model the operator did
        not allow (403, before any download). On the event loop."""
        if model is None:
            return data, reply
        if not allowed(model, self.settings.allowed_models):
            raise RequestError(403, f"model {model} is not allowed (ALLOWED_MODELS)")
        return ForModel(str(model), data), reply

    async def infer(self, data: Any) -> Outcome:
        """One request's data through the runner (with the others this worker holds now); its outcome. On the
        event loop. Raises RequestError 503 while the runner loads or is unreachable, 500 when it fails the call."""
        await self._check_runner_ready()
        try:
            return await self._calls.submit(data)
        except Exception as e:
            self._runner_seen_ready = False  # probe again: /readyz must show an outage
            raise runner_failure(e) from None

    async def _check_runner_ready(self) -> None:
        """Until the runner has answered once, ask it first: a request must not queue behind a loading model."""
        if self._calls is None:
            raise RequestError(503, "the service is starting; the model runner is not connected yet")
        if not await self.runner_ready():
            raise RequestError(503, "the model is still loading; retry shortly")

    async def runner_ready(self) -> bool:
        """Whether the runner answers its readiness probe within a second (BentoML's own probe can hang)."""
        if self._runner_seen_ready:
            return True
        if self._is_ready is None:
            return False
        try:
            self._runner_seen_ready = bool(await asyncio.wait_for(self._is_ready(), timeout=1.5))
        except Exception:
            self._runner_seen_ready = False
        return self._runner_seen_ready

    async def info(self) -> dict[str, Any]:
        # With per-request models the runner's per-model counts change: ask it each time (/info is not a hot path).
        if self._info is None or self.settings.allowed_models:
            await self._check_runner_ready()
            try:
                runner = await self._describe()
            except Exception as e:
                raise runner_failure(e) from None
            self._info = {
                "service": SERVICE_NAME,
                "version": __version__,
                **runner,
                "batching": {
                    "max_batch_size": self.settings.max_batch_size,
                    "max_latency_ms": self.settings.max_latency_ms,
                },
                "limits": {
                    "max_request_bytes": self.settings.max_request_bytes,
                    "max_request_elements": self.settings.max_elements,
                    "request_timeout_s": self.settings.timeout_s,
                    "max_concurrency": self.settings.max_concurrency,
                },
            }
        return self._info

    async def service_resources(self, scope: Scope) -> dict[str, Any]:
        info = await self.info()
        query = scope.get("query_string", b"").decode("latin-1")
        asked = dict(part.split("=", 1) for part in query.split("&") if "=" in part).get("model_id")
        if asked:
            return self._supports(unquote(asked), info)
        cache = (info.get("model") or {}).get("cache_dir")
        # Disk usage and nvidia-smi block; keep them off the event loop.
        listing = await asyncio.to_thread(resources.resources, SERVICE_NAME, info, Path(cache) if cache else None)
        if "models" in info:
            models = info["models"]
            # The runner lists what its cache holds; only what a request may name would be served from it.
            patterns = self.settings.allowed_models
            cached = [e for e in models.get("cached") or () if allowed(parse_model_id(e["model_id"]), patterns)]
            resources.with_per_request_models(listing, models["loaded"], cached)
            listing["models"] = {"loaded": models["loaded"], "cached": cached, "allowed": list(patterns)}
        return listing

    def _supports(self, asked: str, info: dict[str, Any]) -> dict[str, Any]:
        """``/service-resources?model_id=``: whether a request naming ``asked`` would be served, and (the node's
        ``ModelSupport``) in ``error`` why not: not allowed, not found, or the last failed load's reason."""
        if resources.supports(asked, info):
            return {"supported": True}
        try:
            model = str(parse_model_id(asked))
        except ModelIdError as e:
            return {"supported": False, "error": f"malformed model id: {e}"}
        if not allowed(parse_model_id(model), self.settings.allowed_models):
            return {"supported": False, "error": "not allowed"}
        models = info.get("models") or {}
        if any(entry["model_id"] == model for entry in models.get("loaded", ())):
            return {"supported": True}
        failed = (models.get("failed") or {}).get(model)
        if failed is not None:
            reason = "not found" if failed["status"] == 404 else failed["reason"]
            return {"supported": False, "error": reason}
        return {"supported": True}  # allowed; loaded on its first request


def _layout(split: Callable[..., tuple[ModelId | None, Any, Reply]], *args: Any) -> tuple[ModelId | None, Any, Reply]:
    """A request's layout split (public/infernet_ml_layouts.py); a malformed request or model id is a 400."""
    try:
        return split(*args)
    except (LayoutError, ModelIdError) as e:
        raise RequestError(400, str(e)) from None


def _answer(encode: Callable[[Any, Reply], Any], body: Any, reply: Reply) -> Any:
    """The answer in the request's layout; an answer that the layout cannot hold is a 422."""
    try:
        return encode(body, reply)
    except LayoutError as e:
        raise RequestError(422, f"the answer does not fit the request's layout: {e}") from None


def _only_get(method: str, path: str) -> None:
    if method not in _GET:
        raise RequestError(405, f"use GET for {path}")


def allowed_methods(path: str) -> tuple[str, ...] | None:
    """The methods served on a path (OPTIONS aside); None for a path with no route."""
    methods = ROUTE_METHODS.get(path)
    if methods is None and path.startswith(_BENTOML_STATIC):
        return _GET
    if methods is None and (path == "/v2" or path.startswith("/v2/")):  # the Open Inference Protocol's routes
        return ("POST",) if path.endswith("/infer") else _GET
    return methods


def _allow(methods: tuple[str, ...]) -> tuple[bytes, bytes]:
    return b"allow", ", ".join((*methods, "OPTIONS")).encode()


def extra_headers(scope: Scope, status: int) -> list[tuple[bytes, bytes]]:
    headers = []
    if status == 405 and (methods := allowed_methods(scope["path"])) is not None:
        headers.append(_allow(methods))
    elif status == 415:
        headers.append((b"accept-encoding", CODINGS.encode()))
    if not scope.get(BODY_READ) and has_body(scope):
        headers.append(_CLOSE)
    return headers


async def _options(scope: Scope, send: Send) -> int:
    """OPTIONS on a route: 204 with its methods in Allow; ``OPTIONS *`` names every method served."""
    path = scope["path"]
    methods = ("GET", "HEAD", "POST") if path == "*" else allowed_methods(path)
    if methods is None:
        body = error_body(404, f"no route {path}; the inference route is POST /service_output")
        return await respond(send, 404, body, extra_headers(scope, 404))
    headers = [_allow(methods)]  # no Content-Length on a 204 (RFC 9110, 8.6)
    if has_body(scope):
        headers.append(_CLOSE)
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
    return 204
