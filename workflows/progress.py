"""Start-up progress: one line per stage, in one fixed form that reads well and greps well.

    2026-11-24T21:30:54+0000 [INFO] [startup] stage=load status=ok seconds=0.214 format=torchscript device=cpu

Stages, in order: config, source, download, verify, load, warmup, ready (``seconds`` on ``ready`` counts from the
start). ``grep '\\[startup\\]'`` shows the start-up, ``grep 'status=failed'`` the stage that stopped it (downloads
show their own progress bar). A per-request model a client named that cannot be served (a 4xx) is logged as
``status=refused`` with its ``http_status`` at INFO: the client's fault, not the operator's. The operator's own
start-up lines go to stderr directly, in this one form; the refusals go through the ``workflows.progress`` logger
instead, in BentoML's format with ``[startup]`` at the head of the message, because any client can cause them at
will (a new model id per request): core/logs.py bounds them at 10 lines a minute per process, then one count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

from core.errors import StartupStopped

STARTED = "INFERNET_STARTUP_STARTED"  # set in the main process; workers inherit it


def mark_start() -> None:
    os.environ.setdefault(STARTED, str(time.time()))


def since_start() -> float:
    try:
        return time.time() - float(os.environ[STARTED])
    except (KeyError, ValueError):
        return time.monotonic() - _IMPORTED


def line(stage: str, status: str, seconds: float | None = None, **fields: Any) -> str:
    # "refused": a per-request model the client named cannot be served (a 4xx): the client's fault, not the
    # operator's, so INFO: any client could otherwise fill the operator's error log.
    level = "ERROR" if status == "failed" else "INFO"
    return f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} [{level}] [startup] {_fields(stage, status, seconds, fields)}"


def _fields(stage: str, status: str, seconds: float | None, fields: dict[str, Any]) -> str:
    parts = [f"stage={stage}", f"status={status}"]
    if seconds is not None:
        parts.append(f"seconds={seconds:.3f}")
    parts += [f"{key}={_value(value)}" for key, value in fields.items() if value is not None]
    return " ".join(parts)


_refusals = logging.getLogger("workflows.progress")


def emit(stage: str, status: str = "ok", seconds: float | None = None, **fields: Any) -> None:
    if status == "refused":
        # One line of code for every refusal: core/logs.py's bound per line of code is the bound on all of them.
        _refusals.info("[startup] %s", _fields(stage, status, seconds, fields))
        return
    print(line(stage, status, seconds, **fields), file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(name: str, client_chosen: bool = False, **fields: Any) -> Iterator[dict[str, Any]]:
    """Time the block and print its line; the block may add or replace fields (and ``status``) in the yielded
    dict. ``client_chosen``: a request named the model (workflows/per_request.py), so a failure with a 4xx
    ``status`` is the client's and prints ``status=refused`` at INFO instead of ``status=failed`` at ERROR."""
    started = time.monotonic()
    extra: dict[str, Any] = {}
    try:
        yield extra
    except StartupStopped:
        raise  # the operator stopped it: exit_on_error prints the one line
    except BaseException as e:
        # What the block found before it failed (the workflow that serves) names the failure too.
        found = {k: v for k, v in {**fields, **extra}.items() if k != "status"}
        status = getattr(e, "status", None) if client_chosen else None
        outcome = "refused" if isinstance(status, int) and 400 <= status < 500 else "failed"
        emit(name, outcome, time.monotonic() - started, **found, error=type(e).__name__, http_status=status)
        raise
    status = extra.pop("status", "ok")
    emit(name, status, time.monotonic() - started, **{**fields, **extra})  # the block's fields win


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if not text or any(c in text for c in ' "=\n'):
        return json.dumps(text)
    return text


_IMPORTED = time.monotonic()
