"""Start-up: settings from the environment, the workflow class resolved, built and set up.

Every failure becomes a StartupError with one line that names what is wrong; ``exit_on_error`` prints it and
stops the process, so an operator never sees a traceback for a typo in an env file.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workflows import sources
from workflows.config import BUILTIN_TORCH_WORKFLOW, ServiceSettings, TorchSettings
from workflows.errors import StartupError

log = logging.getLogger("workflows.startup")
_FAILURE_FILE = "INFERNET_STARTUP_FAILURE_FILE"


@contextlib.contextmanager
def exit_on_error(stage: str, *, worker: bool = False) -> Iterator[None]:
    """Print one line and stop. In a worker process, also stop the whole server: a worker that cannot set up
    would otherwise be respawned forever, and the service would never become ready."""
    try:
        yield
    except StartupError as e:
        print(f"start-up failed ({stage}): {e}", file=sys.stderr, flush=True)
        if not worker:
            sys.exit(2)
        if failure_file := os.environ.get(_FAILURE_FILE):
            Path(failure_file).write_text(f"{stage}: {e}")
        os.kill(os.getppid(), signal.SIGTERM)
        os._exit(2)  # not sys.exit: the server would log a traceback for the SystemExit


def exit_nonzero_if_a_worker_fails() -> None:
    """In the server's main process: if a worker stops the server at start-up, exit with status 2, not 0."""
    fd, path = tempfile.mkstemp(prefix="infernet-startup-")
    os.close(fd)
    os.unlink(path)
    os.environ[_FAILURE_FILE] = path  # workers inherit the main process's environment

    def check() -> None:
        if os.path.exists(path):
            os.unlink(path)
            os._exit(2)

    atexit.register(check)


def resolve_class(path: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise StartupError(f"CLASSIC_INF_WORKFLOW_CLASS: expected module.ClassName, got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise StartupError(f"CLASSIC_INF_WORKFLOW_CLASS: cannot import {module_name!r} ({e})") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise StartupError(f"CLASSIC_INF_WORKFLOW_CLASS: {module_name!r} has no class {class_name!r}")
    return cls


def prepare(settings: ServiceSettings) -> None:
    """Runs once, before any worker starts: a model that cannot be fetched or verified stops start-up here."""
    started = time.monotonic()
    if settings.workflow_class == BUILTIN_TORCH_WORKFLOW:
        # Fetch without importing torch: the arbiter process would otherwise carry ~200 MB it never uses.
        torch_settings = TorchSettings.from_env()
        spec = sources.spec_from_kwargs(settings.workflow_kwargs, torch_settings)
        path = sources.fetch(spec, torch_settings)
        log.info("model file ready in %.2fs: %s -> %s", time.monotonic() - started, spec.describe(), path)
    else:
        resolve_class(settings.workflow_class)


def build(settings: ServiceSettings) -> Any:
    """The workflow instance, set up and ready to serve."""
    cls = resolve_class(settings.workflow_class)
    try:
        workflow = cls(*settings.workflow_args, **settings.workflow_kwargs)
    except TypeError as e:
        raise StartupError(f"CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS / _KW_ARGS do not fit {cls.__name__}: {e}") from None
    started = time.monotonic()
    try:
        workflow.setup()
    except StartupError:
        raise
    except Exception as e:
        raise StartupError(f"{cls.__name__}.setup() failed: {type(e).__name__}: {e}") from None
    log.info("%s set up in %.2fs", cls.__name__, time.monotonic() - started)
    return workflow


def qualified_name(workflow: Any) -> str:
    cls = type(workflow)
    return f"{cls.__module__}.{cls.__qualname__}"
