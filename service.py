"""Infernet torch service: POST /service_output in front of one batched copy of the model.

Two BentoML services: ``WorkflowRunner`` holds the workflow (the only process that imports torch) and batches
requests adaptively; ``InfernetService`` is the public HTTP side, reaching the runner through ``bentoml.depends``.
Configuration comes from the environment (core/settings.py, README). The request's path: docs/architecture.md.
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
from typing import Annotated, Any

import bentoml
from bentoml.validators import ContentType

from core import bentoml_seam, crash_records, logs, model_call, secrets, server_watch
from core.bentoml_seam import RunnerService
from core.settings import ServiceSettings
from core.tensor_values import TAKES_SENT_TENSORS
from public import http_protocol, routes
from public.app import PublicApp
from public.openapi import DocumentedService, FastRouteService
from public.runner_client import RunnerClient, over, through_bentoml
from runner.batch_runner import BatchRunner, Drain
from runner.model_registry import ModelRegistry
from workflows import startup
from workflows.base import takes_sent_tensors

# First: whatever any library logs from here on (BentoML's tracebacks of a failed route included) is written with
# HF_TOKEN, BEARER_TOKEN and the other secrets masked (core/secrets.py).
secrets.scrub_logs()
# BentoML's logging set-up (done before this import, in every process) drops INFO records of all but its own loggers:
# ours are written from INFO up through its handler, at most 10 a minute per line of code (core/logs.py).
logs.show_service_logs()

# OpenMP threads that spin while waiting steal the cores the API workers need; on a busy box a 2-thread forward
# then runs up to 5x slower than a 1-thread one (docs/performance.md). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Before anything reads the environment (here, in the libraries, in the workers that inherit it).
startup.unquote_environment()
with startup.exit_on_error("configuration"):
    SETTINGS = ServiceSettings.from_env()

# BentoML 1.4.40 with INFERNET_FAST_PATH on (the default): the two busy routes skip BentoML's middleware and typed
# endpoint, and BentoML's fixes apply. Otherwise BentoML's public path serves, and one log line says why.
FAST_PATH = bentoml_seam.fast_path(SETTINGS.fast_path)

# Keep-alive, request-head size and read timeouts of every uvicorn worker (public/http_protocol.py).
http_protocol.install(SETTINGS)

public_app = PublicApp(SETTINGS)
# The public app answers a request that outlives REQUEST_TIMEOUT_S with the contract's JSON 504; BentoML's own
# timeouts (plain {"error": ...} bodies) sit behind it with a margin, the runner's inside the public service's.
RUNNER_TIMEOUT_S = SETTINGS.timeout_s + 5
PUBLIC_TIMEOUT_S = SETTINGS.timeout_s + 10

# A worker whose `bentoml serve` has died stops within this (core/server_watch.py): its graceful stop, and a margin.
ORPHAN_GRACE_S = SETTINGS.shutdown_timeout_s + 5

# Requests per batch of the model thread (each API worker's call may carry several requests).
batch_size = bentoml.metrics.Histogram(
    name="infernet_batch_size",
    documentation="Requests per runner batch",
    buckets=[2**i for i in range(SETTINGS.max_batch_size.bit_length() + 1)],
)

# A fixed content type for the runner's answers: without one, BentoML rebuilds the output's JSON schema for every
# response just to pick a media type (~22% of the runner's CPU per call). Callers decode by their own serde anyway.
PICKLED = ContentType(bentoml_seam.PICKLE)


def freeze_heap() -> None:
    """Move everything built at start-up out of the garbage collector's reach.

    A full (generation 2) collection walks every object in the process: torch, BentoML and their imports make
    that 120k-250k objects and a 60-300 ms pause, which was the rare 65-105 ms stall (docs/performance.md).
    Frozen objects are never walked again; only what requests create is.
    """
    gc.collect()
    gc.freeze()


@bentoml.service(
    workers=1,  # one model copy; batches form across every API worker
    threads=1,  # for describe; the model has a thread of its own (runner/batch_runner.py)
    # BentoML 1.4.40 recycles the runner connection every 100 requests while calls are in flight,
    # failing ~15% of them under load; never recycling avoids it.
    runner_connection={"max_requests": 10**9, "max_age": 1e9},
    traffic={"timeout": RUNNER_TIMEOUT_S},
    logging={"access": {"enabled": False}},
    # Internal routes: OpenTelemetry's middleware costs ~20% of the runner's CPU per call even when nothing is sampled.
    tracing={"excluded_urls": ["/infer", "/describe", "/health"]},
    # Fast path: the API workers' calls to infer skip BentoML's middleware and typed endpoint (core/bentoml_seam.py).
    service_class=RunnerService if FAST_PATH else bentoml.Service,
)
class WorkflowRunner:
    def __init__(self) -> None:
        server_watch.exit_with_server(ORPHAN_GRACE_S)  # before the model load, which may take minutes
        with startup.exit_on_error("workflow", worker=True):
            workflow = startup.build(SETTINGS)
        # SIGTERM: keep serving until the API workers have passed on the requests they hold (graceful stop).
        self.drain = Drain(max_s=min(SETTINGS.timeout_s, SETTINGS.shutdown_timeout_s))
        self.drain.install()
        # Only when the operator allows per-request models (ALLOWED_MODELS): otherwise None, the single-model path.
        self.registry = ModelRegistry.from_settings(workflow, SETTINGS)
        self.batches = BatchRunner(
            workflow,
            SETTINGS.max_batch_size,
            SETTINGS.max_latency_ms / 1000,
            on_batch=batch_size.observe,
            registry=self.registry,
        )
        self.description = {
            "workflow": startup.qualified_name(workflow),
            "model": startup.describe(workflow),
            # Read by the API workers, not shown in /info: whether to send requests' tensors decoded (section 27).
            TAKES_SENT_TENSORS: takes_sent_tensors(workflow),
        }
        freeze_heap()

    # Batches form in the model thread, from the calls of every API worker that queue while the model is busy
    # (not BentoML's batchable API: docs/performance.md, section 11). Pre- and post-processing run here, on the
    # event loop, alongside the forward of another batch (section 15).
    @bentoml.api
    async def infer(
        self, requests: list[Any] | None = None, alone: bool = False, sealed: bytes = b""
    ) -> Annotated[list[Any], PICKLED]:
        # One Outcome per request. ``alone``: an API worker's suspect (public/runner_client.py CrashWatch), run as a
        # batch of its own. ``sealed``: the call from BentoML's public path, its requests pickled so that they keep
        # their types, answered sealed the same way (core/model_call.py seal); the fast path sends them as they are.
        with self.drain.working():
            if sealed:
                return [model_call.seal(await self._infer(model_call.unseal(sealed), alone))]
            return await self._infer(requests or [], alone)

    async def _infer(self, requests: list[Any], alone: bool) -> list[Any]:
        batches = self.batches
        if alone:
            return await batches.infer_alone(requests)
        if batches.names_models(requests):
            return await batches.infer_for_models(requests)
        return batches.postprocess(await batches.submit(batches.preprocess(requests)), requests)

    @bentoml.api
    async def health(self) -> Annotated[dict[str, Any], PICKLED]:
        """For the public /livez: how long the model has spent on its current batch (0 when idle)."""
        return {"busy_for_s": self.batches.busy_for_s()}

    @bentoml.api
    async def describe(self) -> Annotated[dict[str, Any], PICKLED]:
        if self.registry is None:
            return self.description
        # Async: the registry lives on this event loop. Live, so /info's per-model counts are current.
        return {**self.description, "models": await self.registry.report()}


@bentoml.service(
    name="infernet_torch_service",
    workers=SETTINGS.api_workers,
    traffic={"timeout": PUBLIC_TIMEOUT_S},
    # OpenTelemetry's middleware costs ~15% of CPU per request even when nothing is sampled.
    tracing={"excluded_urls": ["/service_output"]},
    # BentoML's runner probe waits on a runner that is still loading; __is_ready__ below answers at once.
    runner_probe={"enabled": False},
    # Fast path: POST /service_output skips BentoML's middleware stack; /docs.json describes the raw routes.
    service_class=FastRouteService if FAST_PATH else DocumentedService,
    # One log line per request was ~17% of an API worker's CPU under load; BentoML cannot skip one path without
    # also dropping its metrics. Re-enable with
    # BENTOML_CONFIG_OPTIONS="services.infernet_torch_service.logging.access.enabled=true".
    logging={"access": {"enabled": False}},
)
@bentoml.asgi_app(public_app, path="/")
class InfernetService:
    runner = bentoml.depends(WorkflowRunner)

    @bentoml.on_deployment
    def prepare() -> None:
        """Once, in the main process, before any worker starts (and before their environment is copied)."""
        server_watch.mark_server_process()  # its workers stop if it dies (core/server_watch.py)
        # The port in use (or not allowed): one line that says so and what to change, not circus' traceback.
        bentoml_seam.on_listen_error(functools.partial(startup.refuse, "listen"))
        with startup.exit_on_error("model"):
            startup.prepare(SETTINGS)
        # What the API workers learn of the runner's deaths, shared by this server's workers (core/crash_records.py).
        crash_records.create_for_this_server()
        atexit.register(crash_records.remove)

        def before_exit() -> None:
            crash_records.remove()
            bentoml_seam.remove_own_metrics_directory()

        startup.exit_nonzero_if_a_worker_fails(before_exit=before_exit)
        # A worker that cannot stop (SIGSTOP, a stuck event loop) must not hold the server's stop for good.
        server_watch.bound_shutdown(SETTINGS.shutdown_timeout_s, before_exit=before_exit)
        bentoml_seam.stop_on_hangup()  # SIGHUP: a graceful stop, not circus' reload of every worker (docs/deploy.md)

    def __init__(self) -> None:
        server_watch.exit_with_server(ORPHAN_GRACE_S)
        client = self.runner.to_async
        if FAST_PATH:  # the hot call skips BentoML's client (same address, same wire format): public/runner_client.py
            infer = over(RunnerClient(client.url, client.timeout))
        else:
            infer = through_bentoml(client)
        public_app.bind(
            infer=infer,
            describe=lambda: client.call("describe"),
            is_ready=lambda: client.is_ready(timeout=1),
            health=lambda: client.call("health"),
        )
        # SIGTERM: requests still running after SHUTDOWN_TIMEOUT_S get a JSON 503 (core/asgi.py ShutdownBound).
        public_app.shutdown.install(SETTINGS.shutdown_timeout_s)
        freeze_heap()

    async def __is_ready__(self) -> bool:
        return await public_app.runner_ready(fresh=True)  # every worker asks the runner: one answer for all

    async def __is_alive__(self) -> bool:  # BentoML's /livez, when the fast path is off
        return await public_app.stuck_model() is None


# /livez, /healthz and /readyz in the contract's JSON wherever BentoML's stack serves them (INFERNET_FAST_PATH off,
# CORS on, /healthz): BentoML's own answer in plain text. The fast path's own routes answer them the same way.
InfernetService.add_asgi_middleware(routes.HealthRoutes, public=public_app)
