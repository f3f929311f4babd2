"""The methods each public route serves (a 405 names them in Allow, OPTIONS answers with them), BentoML's own
routes that the public app hands back to BentoML, and the page at ``/``. On the API worker's event loop; cold: only
for GETs of these pages, wrong methods and OPTIONS.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.routing import Match

from core.asgi import Receive, Scope, Send, shown
from core.errors import RequestError
from core.terms import error_body

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


class HealthRoutes:
    """ASGI middleware for BentoML's stack (the public service's ``add_asgi_middleware``): ``/livez``, ``/healthz``
    and ``/readyz`` answered by the public app (``public``, a ``PublicApp``), as the fast path's own routes answer
    them. BentoML's routes for them match before the mount and answer in plain text: a service still loading or
    stuck gets a 503 naming BentoML's internals (``.__is_ready__() returns False``), a healthy one an empty line.
    Whatever reaches BentoML's stack passes here: every request with INFERNET_FAST_PATH off or CORS on, /healthz
    on the fast path. On the API worker's event loop; raises nothing of its own."""

    paths = frozenset({"/livez", "/healthz", "/readyz"})

    def __init__(self, app: Any, public: Any) -> None:
        self.app = app
        self.public = public

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.paths:
            await self.public.serve(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def bentoml_serves(path: str) -> bool:
    """Whether ``path`` is one of BentoML's own routes, which the public app hands back to BentoML."""
    return path in _BENTOML_GET_ROUTES or path.startswith(_BENTOML_STATIC)


async def bentoml_route(app: Any, scope: Scope, receive: Receive, send: Send) -> bool:
    """Serve the request with the first of BentoML's own routes (other than this mount) that matches it."""
    router = getattr(scope.get("app"), "router", None)
    for route in getattr(router, "routes", ()):
        if getattr(route, "app", None) is app:
            continue
        match, child_scope = route.matches(scope)
        if match == Match.FULL:
            try:
                await route.handle({**scope, **child_scope}, receive, send)
            except HTTPException as e:  # StaticFiles: no such file
                raise RequestError(e.status_code, f"no file {shown(scope['path'])}") from None
            return True
    return False


# Swagger UI on /docs.json, from the files BentoML serves under /static_content/. BentoML's own page at / also loads
# Google Tag Manager, which would report every visit to a third party: a node's page must not call out.
DOCS_PAGE = b"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="UTF-8">
  <title>Infernet torch service</title>
  <link rel="stylesheet" type="text/css" href="./static_content/swagger-ui.css">
  <link rel="stylesheet" type="text/css" href="./static_content/index.css">
  <link rel="icon" type="image/png" href="./static_content/favicon-light-32x32.png" sizes="32x32">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="./static_content/swagger-ui-bundle.js" charset="UTF-8"></script>
  <script src="./static_content/swagger-ui-standalone-preset.js" charset="UTF-8"></script>
  <script src="./static_content/swagger-initializer.js" charset="UTF-8"></script>
</body>
</html>
"""


async def docs_page(send: Send) -> int:
    headers = [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(DOCS_PAGE)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": DOCS_PAGE})
    return 200


def only_get(method: str, path: str) -> None:
    if method not in _GET:
        raise RequestError(405, f"use GET for {shown(path)}")


def allowed_methods(path: str) -> tuple[str, ...] | None:
    """The methods served on a path (OPTIONS aside); None for a path with no route."""
    methods = ROUTE_METHODS.get(path)
    if methods is None and path.startswith(_BENTOML_STATIC):
        return _GET
    if methods is None and is_protocol_path(path):  # the Open Inference Protocol's routes
        return ("POST",) if path.endswith("/infer") else _GET
    return methods


def allow(methods: tuple[str, ...]) -> tuple[bytes, bytes]:
    return b"allow", ", ".join((*methods, "OPTIONS")).encode()


def is_protocol_path(path: str) -> bool:
    """Whether ``path`` is under ``/v2``, the Open Inference Protocol, whose errors are its ``{"error": ...}``."""
    return path == "/v2" or path.startswith("/v2/")


def error_for(path: str, status: int, description: str) -> dict[str, Any]:
    """The JSON error body for an answer on ``path``: the protocol's under /v2, the contract's everywhere else."""
    return {"error": description} if is_protocol_path(path) else error_body(status, description)


def is_own_error(path: str, status: int, body: Any) -> bool:
    """Whether an error answer's decoded JSON ``body`` is already in ``path``'s error shape (``error_for``)."""
    if not isinstance(body, dict):
        return False
    if is_protocol_path(path):
        return isinstance(body.get("error"), str)
    return body.get("code") == str(status) and isinstance(body.get("description"), str)
