"""The public routes as one raw ASGI app, mounted at "/" inside the BentoML service; ``POST /service_output`` from
its body to its answer, top to bottom.

A raw app keeps the request path lean (orjson, no per-response schema work; see docs/performance.md).
BentoML's routes registered before the mount (/livez, /readyz, /metrics) match first; everything else lands here,
so unknown paths and wrong methods get the contract's JSON errors too. BentoML registers its page (/, /docs.json,
/static_content/) after the mount, so those GETs are handed back to BentoML's routes (public/routes.py).

In the order a request meets them: ``PublicApp`` (route, budget and deadline, the inference route, the call to the
runner); the body (read within MAX_REQUEST_BYTES, gzip decoded, JSON depth bounded: status 400, 413, 415);
``parse_input``, the body as Infernet nodes send it (its shape, ``InfernetInput``, is the contract's vocabulary in
core/terms.py); the answer (``respond``, and ``runner_failure``: the status of a runner call that failed as a whole,
runner overloaded, unreachable or refusing). A request's own failure arrives as its ``Outcome`` (core/errors.py) with
the status the workflow's exception maps to. All of it runs on the API worker's event loop. The cold routes live
apart: /service-resources in public/resources.py, the Open Inference Protocol in public/open_inference.py, the
methods of each route and BentoML's own routes in public/routes.py.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
import orjson
from pydantic import ValidationError

from core.asgi import BodyTooLarge, ClientDisconnected, Receive, Scope, Send, ShutdownBound, read_body, shown
from core.errors import Outcome, RequestError, first_line
from core.model_call import ForModel
from core.model_ids import ModelId, ModelIdError, allowed
from core.settings import ServiceSettings
from core.tensor_values import TAKES_SENT_TENSORS, VALUES_NEEDED, sent_tensor
from core.terms import Destination, InfernetInput, Source, error_body, json_type
from public import SERVICE_NAME, __version__, auth, chain, resources, routes
from public.infernet_ml_layouts import (
    Layout,
    LayoutError,
    Reply,
    encode_chain_answer,
    format_offchain_answer,
    split_chain_request,
    split_request,
)
from public.runner_client import RunnerCall, RunnerCallBatcher

log = logging.getLogger("public.app")
T = TypeVar("T")


_CLOSE = (b"connection", b"close")
# The first ABI word of today's CHAIN data, abi.encode(int256[]): the array's offset, 0x20. With CHAIN_LAYOUT=auto
# this hex prefix keeps today's requests on today's decoder without looking further.
_INT256_HEAD = "0" * 62 + "20"
# Set in the scope once the whole body has been received. An answer sent before then closes the connection: the
# unread body (or, after `Expect: 100-continue`, the next request) would otherwise be read as what follows.
BODY_READ = "infernet.body_read"
NAMED_MODEL = "infernet.named_model"  # scope key: the per-request model id the request named
# How long a request past its deadline waits for the runner to say how far its model's download got.
PROGRESS_TIMEOUT_S = 1.0
CODINGS = "gzip, identity"  # request Content-Encodings decoded; others get 415
# Deeper bodies are refused: the hop to the runner pickles the data, and pickling ~1000 levels raises
# RecursionError, which would fail every request sent with it. Tensor values nest at most 32 levels.
MAX_JSON_DEPTH = 64
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")

_JSON = [(b"content-type", b"application/json")]


class PublicApp:
    paths = frozenset({"/service_output", "/info", "/service-resources"})  # its own fixed routes

    def endpoint_label(self, path: str) -> str | None:
        """The metrics' ``endpoint`` label of a route this app serves (a template where the path has parameters, so
        the labels stay few whatever clients send), or None."""
        if path in self.paths:
            return path
        if path == "/v2" or path.startswith("/v2/"):
            from public import open_inference  # built on this module: imported here, not above it

            return open_inference.route_template(path)
        return None

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._calls: RunnerCallBatcher | None = None
        self._describe: Callable[[], Awaitable[dict[str, Any]]] | None = None
        self._info: dict[str, Any] | None = None
        self._served: dict[str, Any] | None = None  # the default model, as /info describes it
        self._is_ready: Callable[[], Awaitable[bool]] | None = None
        self._runner_seen_ready = False  # the hot path's cached view: cleared by any failed call or probe
        self._runner_answered_once = False  # the runner has answered this worker at least once (loaded)
        self._runner_silent_since: float | None = None  # first unanswered health call or readiness probe since then
        self._in_progress = 0  # /service_output requests this worker is answering
        # Decode a default-path request's tensor here and send the array (core/tensor_values.py ``SentTensor``): once
        # the runner has said its default workflow takes one (``info``). Never unset: a request's item stays the same.
        self._sends_tensors = False
        self._bearer = settings.bearer_token.encode() if settings.bearer_token else None
        self.shutdown = ShutdownBound()  # installed by the BentoML service in each API worker

    @property
    def needs_token(self) -> bool:
        """Whether BEARER_TOKEN / BEARER_TOKEN_FILE is set (the protected routes then answer 401 without it)."""
        return self._bearer is not None

    def bind(
        self,
        infer: RunnerCall,
        describe: Callable[[], Awaitable[Any]],
        is_ready: Callable[[], Awaitable[bool]],
        health: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        """Connect to the runner; called by the BentoML service in each API worker. ``infer`` sends a list of
        requests' data to the runner and returns their ``Outcome``s in order (one call per group, RunnerCallBatcher)."""
        self._calls = RunnerCallBatcher(infer, max_items=self.settings.max_batch_size)
        # A poison's death is answered 422, not raised: the runner is restarting all the same, so probe it again.
        self._calls.crashes.on_death = self._runner_lost
        self._describe = describe
        self._is_ready = is_ready
        self._health = health

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
                from public import open_inference  # built on this module: imported here, not above it

                return await open_inference.serve(self, scope, receive, send)  # answers its own errors
            elif path == "/info":
                routes.only_get(method, path)
                status, body = 200, await self.info()
            elif path == "/service-resources":
                routes.only_get(method, path)
                status, body = 200, await resources.service_resources(self, scope)
            elif path == "/":
                routes.only_get(method, path)
                return await routes.docs_page(send)
            elif path in ("/livez", "/healthz"):  # /healthz: BentoML's other name for /livez
                routes.only_get(method, path)
                stuck = await self.stuck_model()
                if stuck is not None:
                    raise RequestError(503, stuck)
                status, body = 200, {"live": True}
            elif path == "/readyz":
                routes.only_get(method, path)
                if not await self.runner_ready(fresh=True):
                    raise RequestError(503, "the model is still loading; retry shortly")
                status, body = 200, {"ready": True}
            elif routes.bentoml_serves(path):
                routes.only_get(method, path)
                if await routes.bentoml_route(self, scope, receive, send):
                    return 200  # answered by BentoML; the status is only read for /service_output
                raise RequestError(404, f"no route {shown(path)}")
            else:
                raise RequestError(404, f"no route {shown(path)}; the inference route is POST /service_output")
        except RequestError as e:
            status, body = e.status, error_body(e.status, e.description, e.errors)
            if e.model is not None:
                body["model"] = e.model
        except Exception as e:
            log.exception("request to %s failed", shown(path))
            status, body = 500, error_body(500, f"internal error: {type(e).__name__}")
        if status == 200 and scope.get(BODY_READ):
            return await respond(send, status, body)
        return await respond(send, status, body, extra_headers(scope, status))

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
            # The deadline (asyncio.timeout's semantics), unlike wait_for, runs the request in this task instead of a
            # new one. After SIGTERM it is also SHUTDOWN_TIMEOUT_S (a JSON 503; core/asgi.py ShutdownBound).
            with self.shutdown.bounded(timeout):
                return await handler(scope, receive)
        except TimeoutError:
            if not scope.get(BODY_READ) and has_body(scope):
                raise RequestError(408, f"the body was not received within {timeout:g} s (REQUEST_TIMEOUT_S)") from None
            message = f"no answer within {timeout:g} s (REQUEST_TIMEOUT_S)"
            model = await self._model_progress(scope.get(NAMED_MODEL))
            if model is None:
                raise RequestError(504, message) from None
            raise RequestError(504, f"{message}: {_progress_text(model)}", model=model) from None
        finally:
            self._in_progress -= 1

    async def service_output(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        raw = await read_request_body(scope, receive, self.settings.max_request_bytes)
        request = parse_input(load_json(raw))
        data, reply, item = request.data, None, None
        if request.source == Source.CHAIN:
            layout = self.settings.chain_layout
            # Shorter than one word is no layout at all: today's decoder says what is wrong, as before.
            if layout == "int256" or (layout == "auto" and (len(data) < 64 or data[:64].lower() == _INT256_HEAD)):
                data = chain.decode_input(data, self.settings.max_elements)
            else:
                names_served = await self._names_served()
                split = _layout(split_chain_request, data, layout, self.settings.max_elements, names_served)
                data, reply = await self._named_model(*split)
        elif not isinstance(data.get("dtype"), str):  # not today's form: a 1.x/2.0 envelope or a 2.0 vector
            names_served = None
            if any(key in data for key in ("model_id", "model_source", "load_args")):
                names_served = await self._names_served()
            split = _layout(split_request, data, self.settings.max_elements, names_served)
            data, reply = await self._named_model(*split)
        else:  # today's form: decoded here when the runner takes it so, sparing its one process (section 27)
            if not self._runner_seen_ready:  # its first answer says whether it does (``info``)
                await self._check_runner_ready()
            if self._sends_tensors:
                item = sent_tensor(data, self.settings.max_elements)
        if type(data) is ForModel:  # a 504 then says where this model's first load stands (``limited``)
            scope[NAMED_MODEL] = data.model_id
        if item is None:
            outcome = await self.infer(data)
        else:
            outcome = await self.infer(item)
            if outcome.status == VALUES_NEEDED.status:  # the runner's refusal or cast names the values as written
                outcome = await self.infer(data)
        if outcome.status != 200:
            raise RequestError(outcome.status, outcome.description)
        if request.destination == Destination.CHAIN:
            if reply is None or reply.layout == Layout.CLASSIC:
                return 200, chain.encode_output(outcome.body)
            return 200, _answer(encode_chain_answer, outcome.body, reply)
        if reply is not None and reply.layout != Layout.CLASSIC:
            return 200, _answer(format_offchain_answer, outcome.body, reply)
        return 200, outcome.body

    async def _named_model(self, model: ModelId | None, data: Any, reply: Reply) -> tuple[Any, Reply]:
        """The runner call's item for a request's data and the model it names; refuses a model the operator did
        not allow (403, before any download). The served model, named in any form /service-resources advertises
        (public/resources.py ``supports``), is the default call whatever ALLOWED_MODELS says. On the event loop;
        raises RequestError 400 for a local id that is not the served model, 503 before the runner is ready."""
        if model is None:
            return data, reply
        if resources.supports(str(model), {"model": await self.served_model()}):
            return data, reply
        if model.source == "local":
            raise RequestError(400, f"model {model}: a request cannot name a file on the server (source local)")
        if not allowed(model, self.settings.allowed_models):
            raise RequestError(403, f"model {model} is not allowed (ALLOWED_MODELS)")
        return ForModel(str(model), data), reply

    async def _model_progress(self, model_id: str | None) -> dict[str, Any] | None:
        """On the event loop, after a request's deadline passed: where ``model_id``'s first load stands in the runner
        (/info's ``models``, runner/model_registry.py ``describe``: downloading with its bytes so far, queued, or
        loading), or None when it is not loading (or the runner cannot say within PROGRESS_TIMEOUT_S: the 504 is not
        held up)."""
        if model_id is None or self._describe is None:
            return None
        try:
            async with asyncio.timeout(PROGRESS_TIMEOUT_S):
                models = (await self._describe()).get("models") or {}
        except Exception as error:
            # One line, no traceback: INFO lines are written now (core/logs.py), and this is the runner being busy.
            log.info("could not ask the runner how far model %s got: %s", model_id, first_line(error))
            return None
        for download in models.get("downloading") or ():
            if download.get("model_id") == model_id:
                return download
        return {"model_id": model_id, "state": "loading"} if model_id in (models.get("loading") or ()) else None

    async def _names_served(self) -> Callable[[str], bool]:
        """The one check that a model id's text names the served start-up model, in any form /info, /v2/models and
        /service-resources advertise for it (public/resources.py ``supports``: its Ritual id, repository, file name,
        sha256). Every layout's parser runs it before anything that could refuse the id (a LOCAL source, say), so the
        served model is served whichever layout names it. On the event loop; raises RequestError 503 while loading."""
        return functools.partial(resources.supports, info={"model": await self.served_model()})

    async def served_model(self) -> dict[str, Any]:
        """/info's description of the default model, asked of the runner once (it never changes while it runs)."""
        if self._served is None:
            self._served = dict((await self.info()).get("model") or {})
        return self._served

    async def infer(self, data: Any) -> Outcome:
        """One request's data through the runner (with the others this worker holds now); its outcome. On the
        event loop. Raises RequestError 503 while the runner loads or is unreachable, 500 when it fails the call."""
        await self._check_runner_ready()
        try:
            outcome = await self._calls.submit(data)
        except Exception as e:
            self._runner_seen_ready = False  # probe again: /readyz must show an outage
            raise runner_failure(e) from None
        self._runner_silent_since = None  # it answers: a later silence is timed from its own start
        return outcome

    def _runner_lost(self) -> None:
        self._runner_seen_ready = False

    async def _check_runner_ready(self) -> None:
        """Until the runner has answered once, ask it first: a request must not queue behind a loading model."""
        if self._calls is None:
            raise RequestError(503, "the service is starting; the model runner is not connected yet")
        if not await self.runner_ready():
            raise RequestError(503, "the model is still loading; retry shortly")

    async def runner_ready(self, fresh: bool = False) -> bool:
        """Whether the runner answers its readiness probe within 1.5 s (BentoML's own probe can hang).

        The hot path (``fresh`` False) trusts the last answer until a call or a probe fails. The probes (/readyz,
        /v2/health/ready: ``fresh``) ask the runner every time, so every API worker answers them from the runner's
        state at that moment, not from its own last request (a worker without traffic kept saying ready while the
        runner was stopped or stuck); the answer is at most 1.5 s old. A failed probe also clears the cached view, and
        starts /livez's clock of the runner's silence (``stuck_model``) if it is not running yet."""
        if self._runner_seen_ready and not fresh:
            return True
        if self._is_ready is None:
            return False
        was_ready = self._runner_seen_ready
        try:
            self._runner_seen_ready = bool(await asyncio.wait_for(self._is_ready(), timeout=1.5))
        except Exception:
            self._runner_seen_ready = False
        if self._runner_seen_ready:
            self._runner_heard()
            if not was_ready:
                await self._send_alone_if_the_model_runs_alone()
        elif self._runner_answered_once and self._runner_silent_since is None:
            # Not answered (BentoML's probe says False for a runner silent past its 1 s, too): the silence is timed
            # from here, not from this worker's first /livez after it. A worker is chosen per connection, so the
            # liveness probes may reach this one late; a runner that answers its health call resets the clock.
            self._runner_silent_since = time.monotonic()
        return self._runner_seen_ready

    def _runner_heard(self) -> None:
        self._runner_answered_once = True
        self._runner_silent_since = None

    async def stuck_model(self) -> str | None:
        """Why the service is not alive (/livez, /healthz, /v2/health/live), or None. Either the model has spent
        more than 10 × REQUEST_TIMEOUT_S on one batch, so every request in it was answered 504 long ago and it is
        most likely hung (a forward that never returns); or the runner, having answered this worker before, has not
        answered for more than 10 × REQUEST_TIMEOUT_S, timed from the first health call or readiness probe (/readyz,
        a request's) it left unanswered (stopped with SIGSTOP, its event loop stuck in a workflow's pre- or
        post-processing, or a restart that never came back). Either would otherwise leave
        /livez green, and the service dead, for good. Before its first answer the runner is loading: None (a health
        call would hold /livez for seconds). On the API worker's event loop; waits at most 2 s."""
        if self._health is None or not self._runner_answered_once:
            return None
        limit_s = 10 * self.settings.timeout_s
        try:
            busy_for_s = float((await asyncio.wait_for(self._health(), timeout=2))["busy_for_s"])
        except Exception:
            return self._runner_silent(limit_s)
        self._runner_heard()
        if busy_for_s <= limit_s:
            return None
        reason = (
            f"the model has spent {busy_for_s:.0f} s on one batch, more than 10 x REQUEST_TIMEOUT_S ({limit_s:g} s): "
            "it is stuck; restart the service"
        )
        log.error("%s", reason)
        return reason

    def _runner_silent(self, limit_s: float) -> str | None:
        """A health call went unanswered: why the service is not alive once the silence has outlasted ``limit_s``."""
        now = time.monotonic()
        if self._runner_silent_since is None:
            self._runner_silent_since = now
        self._runner_seen_ready = False  # requests and /readyz ask again instead of queueing on a silent runner
        silent_for_s = now - self._runner_silent_since
        if silent_for_s <= limit_s:
            return None
        reason = (
            f"the model runner has not answered for {silent_for_s:.0f} s, more than 10 x REQUEST_TIMEOUT_S "
            f"({limit_s:g} s): it is stopped or stuck; restart the service"
        )
        log.error("%s", reason)
        return reason

    async def _send_alone_if_the_model_runs_alone(self) -> None:
        """Once, when the runner is first seen ready: if its model runs every request alone (batching off, by
        KW_ARGS or by the start-up check), each request goes to the runner as a call of its own. The runner answers
        a call when all its requests are done, so requests sent together would all wait for the last forward."""
        try:
            model = await asyncio.wait_for(self.served_model(), timeout=5)
        except Exception:  # grouping stays: only the answers' timing is at stake
            log.warning("could not ask the runner whether its model batches; requests are grouped", exc_info=True)
            return
        batching = model.get("batching")
        if isinstance(batching, dict) and batching.get("enabled") is False and self._calls is not None:
            self._calls.max_items = 1

    async def info(self) -> dict[str, Any]:
        # With per-request models the runner's per-model counts change: ask it each time (/info is not a hot path).
        if self._info is None or self.settings.allowed_models:
            await self._check_runner_ready()
            try:
                runner = dict(await self._describe())
            except Exception as e:
                raise runner_failure(e) from None
            # Not part of /info: whether the runner's default workflow takes requests' tensors decoded here.
            if runner.pop(TAKES_SENT_TENSORS, False) is True:
                self._sends_tensors = True
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


# The request's body: read within MAX_REQUEST_BYTES, gzip decoded, JSON depth bounded. Every refusal is a
# ``RequestError`` with the contract's status (400, 413, 415).


async def read_request_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request's body, decoded from its Content-Encoding; at most ``limit`` bytes, before and after decoding."""
    gzipped = 0
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise RequestError(413, f"body of {int(value)} bytes exceeds the limit of {limit} (MAX_REQUEST_BYTES)")
        if name == b"content-encoding":
            gzipped += gzip_layers(value)
    try:
        raw = await read_body(receive, limit)
    except ClientDisconnected:
        raise RequestError(400, "client disconnected before sending the whole body") from None
    except BodyTooLarge:
        raise RequestError(413, f"body exceeds the limit of {limit} bytes (MAX_REQUEST_BYTES)") from None
    scope[BODY_READ] = True
    for _ in range(gzipped):
        raw = gunzip(raw, limit)
    return raw


def load_json(raw: bytes) -> Any:
    """A body's JSON value; RequestError 400 for a body that is not JSON (saying so in JSON's and UTF-8's words, not
    the parser's) or is nested deeper than MAX_JSON_DEPTH."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            # orjson's words for any invalid UTF-8 speak of surrogates, which are rarely what was sent.
            byte = raw[bad.start]
            raise RequestError(400, f"body is not valid UTF-8: byte 0x{byte:02x} at offset {bad.start}") from None
        raise RequestError(400, f"body is not valid JSON: {e}") from None
    if nesting_depth(raw) > MAX_JSON_DEPTH:
        raise RequestError(400, f"body is nested deeper than {MAX_JSON_DEPTH} levels")
    return obj


def has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b"0 ")):
            return True
    return False


def nesting_depth(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text, counted at C speed. Brackets inside strings count too, so this
    may overestimate, never underestimate."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0
    brackets = np.frombuffer(raw.translate(None, _NOT_BRACKETS), np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(steps.cumsum().max())


def gzip_layers(value: bytes) -> int:
    """How many times a Content-Encoding says the body was gzipped; 415 for a coding not decoded here."""
    layers = 0
    for token in value.split(b","):
        coding = token.strip().lower()
        if coding in (b"gzip", b"x-gzip"):
            layers += 1
        elif coding not in (b"identity", b""):
            name = coding.decode("latin-1")
            raise RequestError(415, f"Content-Encoding {name!r} is not supported; send one of: {CODINGS}")
    return layers


def gunzip(data: bytes, limit: int) -> bytes:
    """Decode a gzip body (one or more members) without ever holding more than ``limit`` + 1 decoded bytes: a small
    compressed body can expand a thousandfold."""
    parts: list[bytes] = []
    size = 0
    while True:
        decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            part = decoder.decompress(data, limit + 1 - size)
        except zlib.error as e:
            raise RequestError(400, f"body is not valid gzip (Content-Encoding: gzip): {e}") from None
        size += len(part)
        if size > limit:
            raise RequestError(413, f"decompressed body exceeds the limit of {limit} bytes (MAX_REQUEST_BYTES)")
        if not decoder.eof:
            raise RequestError(400, "gzip body is truncated (Content-Encoding: gzip)")
        parts.append(part)
        data = decoder.unused_data
        if not data:
            return b"".join(parts)


# What the body holds: ``InfernetInput`` (core/terms.py), ``POST /service_output`` as Infernet nodes send it.


def parse_input(obj: Any) -> InfernetInput:
    if not isinstance(obj, dict):
        raise RequestError(400, f"body must be a JSON object, got {json_type(obj)}")
    try:
        return InfernetInput.model_validate(obj)
    except ValidationError as e:
        errors = [{"loc": list(err["loc"]), "msg": _clean(err["msg"])} for err in e.errors(include_url=False)]
        described = "; ".join(_describe(err) for err in errors[:3])
        raise RequestError(400, described, errors) from None


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(map(str, err["loc"]))
    return f"{loc}: {err['msg']}" if loc else err["msg"]


def _clean(msg: str) -> str:
    return msg.removeprefix("Value error, ")


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


# The answer.


def _progress_text(model: dict[str, Any]) -> str:
    """A 504's words for where its model's first load stands (``PublicApp._model_progress``)."""
    model_id, state = model["model_id"], model.get("state")
    if state == "loading":
        return f"model {model_id} is downloaded and still loading; retry shortly"
    if state == "queued":
        return (
            f"model {model_id} is queued behind other downloads; its download will run, so a retry finds it further "
            "along or loaded"
        )
    total = model.get("total_bytes")
    size = f" of {total}" if total is not None else ""
    return (
        f"model {model_id} is still downloading ({model.get('downloaded_bytes', 0)}{size} bytes so far); "
        "the download continues, so a retry finds it further along or loaded"
    )


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
        return RequestError(500, f"the model runner refused the call (HTTP {int(code)}); see the runner's log")
    if code is None:
        log.warning("model runner unreachable: %s: %s", type(error).__name__, error)
        return RequestError(503, f"the model runner is unreachable ({type(error).__name__}); retry later")
    return RequestError(500, f"the model runner failed (HTTP {int(code)}); see the runner's log")


def extra_headers(scope: Scope, status: int) -> list[tuple[bytes, bytes]]:
    headers = []
    if status == 405 and (methods := routes.allowed_methods(scope["path"])) is not None:
        headers.append(routes.allow(methods))
    elif status == 415:
        headers.append((b"accept-encoding", CODINGS.encode()))
    if not scope.get(BODY_READ) and has_body(scope):
        headers.append(_CLOSE)
    return headers


async def _options(scope: Scope, send: Send) -> int:
    """OPTIONS on a route: 204 with its methods in Allow; ``OPTIONS *`` names every method served."""
    path = scope["path"]
    methods = ("GET", "HEAD", "POST") if path == "*" else routes.allowed_methods(path)
    if methods is None:
        body = error_body(404, f"no route {shown(path)}; the inference route is POST /service_output")
        return await respond(send, 404, body, extra_headers(scope, 404))
    headers = [routes.allow(methods)]  # no Content-Length on a 204 (RFC 9110, 8.6)
    if has_body(scope):
        headers.append(_CLOSE)
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
    return 204
