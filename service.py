"""Infernet torch service: POST /service_output in front of one batched copy of the model.

Two BentoML services: ``WorkflowRunner`` holds the workflow (the only process that imports torch) and batches
requests adaptively; ``InfernetService`` is the public HTTP side, reaching the runner through
``bentoml.depends``. Configuration comes from the environment (see README and docs).
"""

from __future__ import annotations

from typing import Any

import bentoml

from api.app import PublicApp
from workflows import startup
from workflows.batching import run_batch
from workflows.config import ServiceSettings

with startup.exit_on_error("configuration"):
    SETTINGS = ServiceSettings.from_env()

public_app = PublicApp(SETTINGS)


@bentoml.service(
    workers=1,  # one model copy; batches form across every API worker
    threads=1,
    # BentoML 1.4.40 recycles the runner connection every 100 requests while calls are in flight,
    # failing ~15% of them under load; never recycling avoids it.
    runner_connection={"max_requests": 10**9, "max_age": 1e9},
    traffic={"timeout": SETTINGS.timeout_s},
    logging={"access": {"enabled": False}},
)
class WorkflowRunner:
    @bentoml.on_deployment
    def prepare() -> None:
        with startup.exit_on_error("model"):
            startup.prepare(SETTINGS)

    def __init__(self) -> None:
        with startup.exit_on_error("workflow"):
            self.workflow = startup.build(SETTINGS)
        self.description = {"workflow": startup.qualified_name(self.workflow), "model": self.workflow_info()}

    def workflow_info(self) -> dict[str, Any]:
        describe = getattr(self.workflow, "describe", None)
        return describe() if callable(describe) else {}

    @bentoml.api(batchable=True, max_batch_size=SETTINGS.max_batch_size, max_latency_ms=SETTINGS.max_latency_ms)
    def infer(self, datas: list[Any]) -> list[Any]:
        return run_batch(self.workflow, datas)

    @bentoml.api
    def describe(self) -> dict[str, Any]:
        return self.description


@bentoml.service(
    name="infernet_torch_service",
    workers=SETTINGS.api_workers,
    traffic={"timeout": SETTINGS.timeout_s},
    # OpenTelemetry's middleware costs ~15% of CPU per request even when nothing is sampled.
    tracing={"excluded_urls": ["/service_output"]},
)
@bentoml.asgi_app(public_app, path="/")
class InfernetService:
    runner = bentoml.depends(WorkflowRunner)

    def __init__(self) -> None:
        client = self.runner.to_async
        public_app.bind(lambda datas: client.call("infer", datas), lambda: client.call("describe"))
