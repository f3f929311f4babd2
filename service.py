"""Infernet torch service: POST /service_output in front of one batched copy of the model.

Two BentoML services: ``WorkflowRunner`` holds the workflow (the only process that imports torch) and batches
requests adaptively; ``InfernetService`` is the public HTTP side, reaching the runner through
``bentoml.depends``. Configuration comes from the environment (see README and docs).
"""

from __future__ import annotations

import gc
import os
from typing import Annotated, Any

import bentoml
from bentoml.validators import ContentType

from api import bentoml_fixes, http_protocol
from api.app import PublicApp
from api.fast_route import FastRouteService
from api.runner_client import RunnerClient
from api.runner_route import PICKLE, RunnerService
from workflows import startup
from workflows.batching import ModelThread, finish, prepare, run_prepared
from workflows.config import ServiceSettings
from workflows.drain import Drain

# OpenMP threads that spin while waiting steal the cores the API workers need; on a busy box a 2-thread forward
# then runs up to 5x slower than a 1-thread one (docs/performance.md). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

bentoml_fixes.apply()

with startup.exit_on_error("configuration"):
    SETTINGS = ServiceSettings.from_env()

# Keep-alive, request-head size and read timeouts of every uvicorn worker (api/http_protocol.py).
http_protocol.install(SETTINGS)

public_app = PublicApp(SETTINGS)
# The public app answers a request that outlives REQUEST_TIMEOUT_S with the contract's JSON 504; BentoML's own
# timeouts (plain {"error": ...} bodies) sit behind it with a margin, the runner's inside the public service's.
RUNNER_TIMEOUT_S = SETTINGS.timeout_s + 5
PUBLIC_TIMEOUT_S = SETTINGS.timeout_s + 10

# Requests per batch of the model thread (each API worker's call may carry several requests).
batch_size = bentoml.metrics.Histogram(
    name="infernet_batch_size",
    documentation="Requests per runner batch",
    buckets=[2**i for i in range(SETTINGS.max_batch_size.bit_length() + 1)],
)

# A fixed content type for the runner's answers: without one, BentoML rebuilds the output's JSON schema for every
# response just to pick a media type (~22% of the runner's CPU per call). Callers decode by their own serde anyway.
PICKLED = ContentType(PICKLE)


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
    threads=1,  # for describe; the model has a thread of its own (ModelThread)
    # BentoML 1.4.40 recycles the runner connection every 100 requests while calls are in flight,
    # failing ~15% of them under load; never recycling avoids it.
    runner_connection={"max_requests": 10**9, "max_age": 1e9},
    traffic={"timeout": RUNNER_TIMEOUT_S},
    logging={"access": {"enabled": False}},
    # Internal routes: OpenTelemetry's middleware costs ~20% of the runner's CPU per call even when nothing is sampled.
    tracing={"excluded_urls": ["/infer", "/describe"]},
    # The API workers' calls to infer skip BentoML's middleware stack and typed endpoint (api/runner_route.py).
    service_class=RunnerService,
)
class WorkflowRunner:
    def __init__(self) -> None:
        with startup.exit_on_error("workflow", worker=True):
            self.workflow = startup.build(SETTINGS)
        # SIGTERM: keep serving until the API workers have passed on the requests they hold (graceful stop).
        self.drain = Drain(max_s=min(SETTINGS.timeout_s, SETTINGS.shutdown_timeout_s))
        self.drain.install()
        self.model_thread = ModelThread(self.process_batch, SETTINGS.max_batch_size, SETTINGS.max_latency_ms / 1000)
        self.description = {"workflow": startup.qualified_name(self.workflow), "model": self.workflow_info()}
        freeze_heap()

    def workflow_info(self) -> dict[str, Any]:
        describe = getattr(self.workflow, "describe", None)
        return describe() if callable(describe) else {}

    def process_batch(self, prepared: list[Any]) -> list[Any]:
        """On the model thread: the forward passes of every queued call's requests (workflows/batching.py)."""
        batch_size.observe(len(prepared))
        return run_prepared(self.workflow, prepared)

    # Batches form in the model thread, from the calls of every API worker that queue while the model is busy
    # (not BentoML's batchable API: docs/performance.md, section 11). Pre- and post-processing run here, on the
    # event loop, alongside the forward of another batch (section 15).
    @bentoml.api
    async def infer(self, datas: list[Any]) -> Annotated[list[Any], PICKLED]:
        with self.drain.working():
            results = await self.model_thread.submit(prepare(self.workflow, datas))
            return finish(self.workflow, results)

    @bentoml.api
    def describe(self) -> Annotated[dict[str, Any], PICKLED]:
        return self.description


@bentoml.service(
    name="infernet_torch_service",
    workers=SETTINGS.api_workers,
    traffic={"timeout": PUBLIC_TIMEOUT_S},
    # OpenTelemetry's middleware costs ~15% of CPU per request even when nothing is sampled.
    tracing={"excluded_urls": ["/service_output"]},
    # BentoML's runner probe waits on a runner that is still loading; __is_ready__ below answers at once.
    runner_probe={"enabled": False},
    # POST /service_output skips BentoML's middleware stack (api/fast_route.py); /docs.json describes the raw routes.
    service_class=FastRouteService,
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
        with startup.exit_on_error("model"):
            startup.prepare(SETTINGS)
        startup.exit_nonzero_if_a_worker_fails()

    def __init__(self) -> None:
        client = self.runner.to_async
        # The hot call skips BentoML's client (same address, same wire format): api/runner_client.py.
        runner_client = RunnerClient(client.url, client.timeout)
        public_app.bind(
            infer=lambda datas: runner_client.call("infer", datas=datas),
            describe=lambda: client.call("describe"),
            is_ready=lambda: client.is_ready(timeout=1),
        )
        # SIGTERM: requests still running after SHUTDOWN_TIMEOUT_S get a JSON 503 (api/shutdown.py).
        public_app.shutdown.install(SETTINGS.shutdown_timeout_s)
        freeze_heap()

    async def __is_ready__(self) -> bool:
        return await public_app.runner_ready()
