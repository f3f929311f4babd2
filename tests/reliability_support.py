"""Shared by the reliability tests: torch models that misbehave on request, and what a user checks on answers.

The first feature of each row picks the behaviour, so one server covers every failure mode and a test can mix
good and bad rows in one batch. Saved whole with ``torch.save`` (a pickle): the runner imports this module by
name to load it, as it would any operator's own model class.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import psutil
import requests
import torch

from tests.fixtures.server import Server

RAISE, NAN, WRONG_BATCH, SLEEP, EXIT = -1.0, -2.0, -3.0, -4.0, -5.0
FEATURES = 4


class Hostile(torch.nn.Module):
    """``y = 2 * x[:, 1:]`` for good rows; a row starting with a marker raises, gives NaN, a wrong batch, sleeps, or
    kills the runner's process (``EXIT``: after sleeping its second feature's seconds, ``os._exit(3)``, as a
    segfaulting extension would: no exception, no answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != FEATURES:
            raise ValueError(f"expected rows of {FEATURES} features, got shape {tuple(x.shape)}")
        marker = x[:, 0]
        if (marker == RAISE).any():
            raise RuntimeError("hostile model: asked to raise")
        if (marker == EXIT).any():
            time.sleep(float(x[marker == EXIT, 1].max()))
            os._exit(3)
        if (marker == SLEEP).any():
            time.sleep(float(x[marker == SLEEP, 1].max()))
        y = self.scale * x[:, 1:]
        y[marker == NAN] = float("nan")
        if (marker == WRONG_BATCH).any():
            y = torch.cat([y, y[:1]])  # one row too many
        return y


def save(directory: Path) -> Path:
    path = directory / "hostile.torch"
    torch.save(Hostile(), path)
    return path


def env(directory: Path, **extra: str) -> dict[str, str]:
    """Server environment that serves the hostile model."""
    return {"CLASSIC_INF_WORKFLOW_KW_ARGS": f'{{"model_path": "{save(directory)}"}}', **extra}


def row(marker: float = 1.0, a: float = 1.0, b: float = 2.0, c: float = 3.0) -> dict:
    return {"source": 1, "data": {"dtype": "float", "values": [[marker, a, b, c]]}}


def sleeping(seconds: float) -> dict:
    return row(SLEEP, seconds, 0.0, 0.0)


# --- what a user checks on every answer -------------------------------------------------------------------


def assert_contract_error(response: requests.Response, status: int | None = None) -> dict:
    """The contract's error: JSON object, ``code`` = the status line as a string, a name and a description."""
    if status is not None:
        assert response.status_code == status, response.text[:300]
    assert response.status_code >= 400, response.text[:300]
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict), body
    assert body["code"] == str(response.status_code), body
    assert body["name"] == HTTPStatus(response.status_code).phrase, body
    assert isinstance(body["description"], str) and body["description"], body
    if response.status_code == 503:
        assert response.headers.get("retry-after", "").isdigit(), response.headers
    return body


# --- the server's processes ---------------------------------------------------------------------------------


def processes(server: Server) -> dict[str, list[psutil.Process]]:
    """The arbiter, the runner worker and the API workers of one ``bentoml serve``, found by command line."""
    arbiter = psutil.Process(server.process.pid)
    found: dict[str, list[psutil.Process]] = {"arbiter": [arbiter], "runner": [], "api": []}
    for child in arbiter.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            line = " ".join(child.cmdline())
            if "--service-name WorkflowRunner" in line:
                found["runner"].append(child)
            elif "_bentoml_impl.worker.service" in line:
                found["api"].append(child)
    return found


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> float:
    """Seconds until ``predicate()`` is truthy; AssertionError after ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(requests.RequestException, psutil.Error):
            if predicate():
                return time.monotonic() - started
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def ready_status(server: Server) -> int:
    return requests.get(f"{server.url}/readyz", timeout=5).status_code


@dataclass
class Outcome:
    status: int | None  # None: no HTTP answer (the connection failed)
    seconds: float
    response: requests.Response | None = None
    error: str = ""


def post(server: Server, body: object, timeout: float = 30) -> Outcome:
    started = time.monotonic()
    try:
        response = requests.post(f"{server.url}/service_output", json=body, timeout=timeout)
    except requests.RequestException as e:
        return Outcome(None, time.monotonic() - started, error=f"{type(e).__name__}: {e}")
    return Outcome(response.status_code, time.monotonic() - started, response)


def post_many(server: Server, bodies: list[object], workers: int, timeout: float = 30) -> list[Outcome]:
    """POST every body, ``workers`` at a time; outcomes in the order of ``bodies``."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda body: post(server, body, timeout), bodies))


def figure(name: str, **values: object) -> None:
    """A measured figure for docs/reliability.md; shown with ``pytest -s`` (no test asserts on timing)."""
    print(f"FIGURE {name}: {json.dumps(values, default=str)}", flush=True)
