"""What the API worker sends back: the JSON answer, and the status of a runner call that failed as a whole.

A request's own failure arrives as its ``Outcome`` (core/errors.py) with the status the workflow's exception maps
to; the failures here are of the hop itself (runner overloaded, unreachable, refusing). On the event loop.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from core.asgi import Send
from core.errors import RequestError
from core.terms import error_body

log = logging.getLogger("public.answers")
_JSON = [(b"content-type", b"application/json")]


async def respond(send: Send, status: int, body: Any, extra: list[tuple[bytes, bytes]] | None = None) -> int:
    """Send ``body`` as JSON with ``status`` (a 500 when it is not JSON-serialisable); returns the status sent."""
    try:
        payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as e:
        status, payload = 500, orjson.dumps(error_body(500, f"the workflow's output is not JSON-serialisable: {e}"))
    headers = [*_JSON, (b"content-length", str(len(payload)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    if extra:
        headers += extra
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
    return status


def runner_failure(error: Exception) -> RequestError:
    """The answer to a request whose call to the runner failed (``error_code``: the runner's HTTP status)."""
    code = getattr(error, "error_code", None)
    if code is not None and int(code) == 503:
        return RequestError(503, "the model runner is overloaded; retry later")
    if code is not None and int(code) < 500:
        return RequestError(500, f"the model runner refused the call ({int(code)})")
    if code is None:
        log.warning("model runner unreachable: %s: %s", type(error).__name__, error)
        return RequestError(503, f"the model runner is unreachable ({type(error).__name__}); retry later")
    return RequestError(500, f"the model runner failed ({int(code)})")
