"""The methods each public route serves (a 405 names them in Allow, OPTIONS answers with them), and BentoML's own
routes that the public app hands back to BentoML. On the API worker's event loop; cold: only for GETs of BentoML's
page, wrong methods and OPTIONS.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.routing import Match

from core.asgi import Receive, Scope, Send
from core.errors import RequestError

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
                raise RequestError(e.status_code, f"no file {scope['path']}") from None
            return True
    return False


def only_get(method: str, path: str) -> None:
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


def allow(methods: tuple[str, ...]) -> tuple[bytes, bytes]:
    return b"allow", ", ".join((*methods, "OPTIONS")).encode()
