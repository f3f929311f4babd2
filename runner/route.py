"""The runner's ``POST /infer``, as the API workers send it, straight to the runner's ``infer`` (via ``FastRoute``).

The API workers send the call's arguments in BentoML's pickle serde, as the client of ``bentoml.depends`` does (one
body: protocol-5 pickle plus its out-of-band buffers, and a ``buffer-lengths`` header), and read the answer the same
way; ``public/runner_client.py`` is their side. BentoML's stack and typed endpoint around that call cost more of the
runner's CPU than a small model's forward (docs/performance.md, section 12). ``PickledCall`` answers it with
BentoML's own ``PickleSerde``, so BentoML's client works here too; a request in any other form (JSON from a
person, another route) goes through BentoML as before.
"""

from __future__ import annotations

import logging
from typing import Any

import bentoml
import orjson
from bentoml.exceptions import BentoMLException

from core import bentoml_seam
from core.asgi import Receive, Scope, Send, read_body
from core.bentoml_seam import PICKLE, FastRoute, access_log_enabled

CLIENT_GONE = 499  # for the metrics: the API worker went away before the answer (nginx's code); nothing is sent
log = logging.getLogger("runner.route")


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
        self.serde = bentoml_seam.PickleSerde()
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
            arguments = self.serde.deserialize_value(bentoml_seam.Payload((body,), metadata=headers))
            payload = self.serde.serialize_value(await method(**arguments))
        except ConnectionError:  # ClientDisconnected, or the answer could not be sent
            return CLIENT_GONE
        except Exception:
            log.exception("runner call %s failed", self.method)
            return await _error(send, 500, f"{self.method} failed; see the runner's log")
        body = b"".join(payload.data)
        headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in payload.metadata.items()]
        return await _send(send, 200, PICKLE, body, headers)


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
