"""Start-up: settings from the environment, the workflow class resolved, built and set up.

Every failure becomes a StartupError with one line that names what is wrong; ``exit_on_error`` prints it and
stops the process, so an operator never sees a traceback for a typo in an env file.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import inspect
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from core import server_watch
from core.errors import StartupError, StartupStopped
from core.secrets import scrub
from core.settings import BUILTIN_TORCH_WORKFLOW, ServiceSettings, TorchSettings
from core.settings import unquote_environment as _unquote_variables
from workflows import progress, sources

_FAILURE_FILE = "INFERNET_STARTUP_FAILURE_FILE"


@contextlib.contextmanager
def exit_on_error(stage: str, *, worker: bool = False) -> Iterator[None]:
    """Print one line and stop. In a worker process, also stop the whole server: a worker that cannot set up
    would otherwise be respawned forever, and the service would never become ready."""
    try:
        yield
    except StartupStopped as e:
        name = signal.Signals(e.signum).name
        print(f"start-up stopped by {name} ({stage}); no partial download kept", file=sys.stderr, flush=True)
        if worker:
            os._exit(128 + e.signum)
        sys.exit(128 + e.signum)  # the shell's status for a process ended by that signal
    except StartupError as e:
        message = scrub(str(e))  # a library's message may quote a token
        print(f"start-up failed ({stage}): {message}", file=sys.stderr, flush=True)
        if not worker:
            sys.exit(2)
        if failure_file := os.environ.get(_FAILURE_FILE):
            Path(failure_file).write_text(f"{stage}: {message}")
        if server := server_watch.server_pid():  # not init, should the server have died meanwhile
            os.kill(server, signal.SIGTERM)
        os._exit(2)  # not sys.exit: the server would log a traceback for the SystemExit


def refuse(stage: str, message: str) -> None:
    """In the server's main process: stop start-up with ``message`` as ``exit_on_error`` does (one line, status 2)."""
    with exit_on_error(stage):
        raise StartupError(message)


@contextlib.contextmanager
def stop_on_signal() -> Iterator[None]:
    """In the server's main thread, around the model download: SIGTERM and SIGINT raise ``StartupStopped`` there
    (``exit_on_error`` turns it into one line and exit status 128 + the signal), so the download's clean-up runs.
    Without it, SIGTERM ended the process where it stood (status 143, no line) and left the partial download behind.
    The previous handlers are restored after; elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise StartupStopped(signum)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def unquote_environment() -> None:
    """In the server's main process, before anything reads the environment: values wrapped in one pair of quotes
    are read without them (core/settings.py ``env_value``), with one WARNING line per variable. Its workers inherit
    the unquoted environment, so the warning is printed once."""
    for name in _unquote_variables(os.environ):
        print(
            f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} [WARNING] [startup] {name}: its value is wrapped in quotes; "
            "reading it without them, as python-dotenv does (docker/podman run --env-file keep quotes literally: "
            f"write {name}=value there)",
            file=sys.stderr,
            flush=True,
        )


def exit_nonzero_if_a_worker_fails(before_exit: Callable[[], None] = lambda: None) -> None:
    """In the server's main process: if a worker stops the server at start-up, exit with status 2, not 0.
    ``before_exit`` runs first: that ``os._exit`` skips the exit handlers registered before this one."""
    fd, path = tempfile.mkstemp(prefix="infernet-startup-")
    os.close(fd)
    os.unlink(path)
    os.environ[_FAILURE_FILE] = path  # workers inherit the main process's environment

    def check() -> None:
        if os.path.exists(path):
            os.unlink(path)
            before_exit()
            os._exit(2)

    atexit.register(check)


def resolve_class(path: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    if not module_name:
        raise StartupError(f"CLASSIC_INF_WORKFLOW_CLASS: expected module.ClassName, got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        missing = getattr(e, "name", None) or ""
        if missing and "." not in missing and (module_name + ".").startswith(missing + "."):
            hint = (
                f"; the folder that holds {missing}/ (or {missing}.py) must be on PYTHONPATH or be the repository "
                "folder, and in an image the module listed under include in bentofile.yaml"
            )
        elif missing and not (module_name + ".").startswith(missing + "."):
            hint = f"; it imports {missing!r}, which is not installed"
        else:
            hint = ""
        raise StartupError(f"CLASSIC_INF_WORKFLOW_CLASS: cannot import {module_name!r} ({e}){hint}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise StartupError(f"CLASSIC_INF_WORKFLOW_CLASS: {module_name!r} has no class {class_name!r}")
    if not callable(getattr(cls, "setup", None)) or not any(
        callable(getattr(cls, hook, None)) for hook in ("run_model", "inference")
    ):
        raise StartupError(
            f"CLASSIC_INF_WORKFLOW_CLASS: {path} is not a workflow class: it needs setup() and run_model() (or "
            "inference()); subclass workflows.base.InferenceWorkflow"
        )
    return cls


def prepare(settings: ServiceSettings) -> None:
    """Runs once, before any worker starts: a model that cannot be fetched or verified stops start-up here."""
    progress.mark_start()
    progress.emit(
        "config",
        workflow=settings.workflow_class,
        api_workers=settings.api_workers,
        max_batch_size=settings.max_batch_size,
        max_latency_ms=settings.max_latency_ms,
    )
    for note in settings.legacy_mapped:  # names only and non-secret values: none of these holds a token
        progress.emit("config", legacy=note.legacy, read_as=note.read_as, value=note.shown)
    if settings.workflow_class == BUILTIN_TORCH_WORKFLOW:
        with stop_on_signal():
            _fetch_and_verify(settings)
    else:
        with progress.stage("source", workflow=settings.workflow_class, note="the workflow fetches its own model"):
            resolve_class(settings.workflow_class)


def _fetch_and_verify(settings: ServiceSettings) -> None:
    """The built-in workflow's model fetched into the cache and verified, in the main process."""
    # Fetch without importing torch: the arbiter process would otherwise carry ~200 MB it never uses.
    with progress.stage("source") as found:
        torch_settings = TorchSettings.from_env()
        spec = sources.spec_from_kwargs(settings.workflow_kwargs, torch_settings)
        where = str(spec.path) if spec.source == "local" else spec.repo_id
        found.update(source=spec.source, repo=where, file=spec.filename, revision=spec.revision)
    with progress.stage("download", source=spec.source, file=spec.filename) as fetched:
        path = sources.fetch(spec, torch_settings)
        fetched.update(path=str(path), bytes=path.stat().st_size)
    with progress.stage("verify", file=spec.filename) as verified:
        digest = sources.model_sha256(path, spec, torch_settings, fresh=bool(spec.sha256))
        sources.check_pin_digest(digest, spec)
        verified.update(sha256=digest, pinned=bool(spec.sha256))


def build(settings: ServiceSettings) -> Any:
    """The workflow instance, set up, warmed up and ready to serve."""
    with progress.stage("load", workflow=settings.workflow_class) as loaded:
        cls = resolve_class(settings.workflow_class)  # imports torch: part of loading
        try:
            workflow = cls(*settings.workflow_args, **settings.workflow_kwargs)
        except TypeError as e:
            why = _mismatch(cls, settings.workflow_args, settings.workflow_kwargs) or str(e)
            raise StartupError(
                f"CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS / _KW_ARGS do not fit {cls.__name__}: {why}; "
                f"{_takes(cls, settings.workflow_kwargs)}"
            ) from None
        if settings.workflow_class == BUILTIN_TORCH_WORKFLOW:
            workflow = _onnx_if_onnx_file(workflow, settings)
            loaded.update(workflow=qualified_name(workflow))  # the ONNX workflow, for an .onnx file
        try:
            workflow.setup()
        except StartupError:
            raise
        except Exception as e:
            raise StartupError(f"{type(workflow).__name__}.setup() failed: {type(e).__name__}: {e}") from None
        info = _described(workflow)
        loaded.update({key: info.get(key) for key in ("format", "dtype", "device")} if isinstance(info, dict) else {})
    with progress.stage("warmup") as warmed:
        warmup = getattr(workflow, "warmup", None)
        if not (callable(warmup) and warmup()):
            warmed.update(status="skipped", reason=_no_warmup(workflow))
        info = _described(workflow)
        batching = info.get("batching") if isinstance(info, dict) else None
        if isinstance(batching, dict) and "enabled" in batching:
            # The warm-up may have found that a batch changes answers and turned batching off: say so where it happened.
            warmed.update(batching="on" if batching["enabled"] else "off", batching_reason=batching.get("reason"))
    progress.emit("ready", seconds=progress.since_start(), workflow=qualified_name(workflow))
    return workflow


def _described(workflow: Any) -> Any:
    """``workflow.describe()`` (None without one), checked to be what ``GET /info`` can send: a value that is not JSON
    (the model object, a tensor) stops start-up naming describe(), rather than failing every /info later."""
    described = getattr(workflow, "describe", None)
    if not callable(described):
        return None
    try:
        info = described()
    except Exception as e:
        raise StartupError(f"{type(workflow).__name__}.describe() failed: {type(e).__name__}: {e}") from None
    try:
        orjson.dumps(info, option=orjson.OPT_SERIALIZE_NUMPY)  # as public/app.py sends it
    except TypeError as e:
        raise StartupError(
            f"{type(workflow).__name__}.describe() returned what GET /info cannot send as JSON ({e}): return names, "
            "numbers, lists and dicts of them, e.g. {'name': 'scaler', 'features': 4}"
        ) from None
    return info


def _parameters(cls: type) -> list[inspect.Parameter] | None:
    """The parameters ``cls(...)`` takes (self left out); None when they cannot be read (a C extension's class)."""
    if cls.__init__ is object.__init__:
        return []
    try:
        return list(inspect.signature(cls.__init__, eval_str=True).parameters.values())[1:]
    except NameError:  # an annotation that names what only a type checker imports
        return list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return None


def _takes(cls: type, kwargs: dict[str, Any] | None = None) -> str:
    """What ``cls`` accepts, for the start-up line when the arguments do not fit: the fix is in it. A class without
    ``__init__`` given ``warmup_input`` (the built-in workflows' argument) is told where its own warm-up goes."""
    parameters = _parameters(cls)
    if parameters is None:
        return f"see {cls.__name__}.__init__ for the arguments it takes"
    warmup = ""
    if "warmup_input" in (kwargs or {}) and not any(p.name == "warmup_input" for p in parameters):
        warmup = (
            f"; warmup_input is the built-in workflows' argument: {cls.__name__} warms up in its own warmup() "
            "hook (README, custom workflows)"
        )
    if not parameters:
        return (
            f"it defines no __init__: unset CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS and _KW_ARGS, or give "
            f"{cls.__name__} an __init__(self, ...) that takes them{warmup}"
        )
    return f"{cls.__name__} takes {inspect.Signature(parameters)}{warmup}"


def _mismatch(cls: type, args: list[Any], kwargs: dict[str, Any]) -> str | None:
    """Why ``args`` do not fit ``cls``'s parameters when there are too many, counted as the operator wrote them:
    Python's own TypeError counts ``self`` ("takes from 2 to 3 positional arguments but 4 were given" for two
    parameters and three arguments). None for any other mismatch (Python's words name the argument and count nothing)
    or parameters that cannot be read."""
    parameters = _parameters(cls)
    if parameters is None:
        return None
    if not parameters:
        return f"{cls.__name__}() takes no arguments" if args or kwargs else None
    kind = inspect.Parameter
    positional = [p.name for p in parameters if p.kind in (kind.POSITIONAL_ONLY, kind.POSITIONAL_OR_KEYWORD)]
    if len(args) <= len(positional) or any(p.kind is kind.VAR_POSITIONAL for p in parameters):
        return None
    takes = "no positional arguments"
    if positional:
        plural = "s" if len(positional) > 1 else ""
        takes = f"at most {len(positional)} positional argument{plural} ({', '.join(positional)})"
    return f"{cls.__name__} takes {takes}; CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS gave {len(args)}"


def _no_warmup(workflow: Any) -> str:
    """Why the warm-up ran nothing, pointing at what the operator can change: KW_ARGS warmup_input for a workflow
    that takes one (the built-in ones), else the class's own warmup()."""
    parameters = _parameters(type(workflow)) or []
    if any(p.name == "warmup_input" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return "no warm-up input (KW_ARGS warmup_input)"
    return f"{type(workflow).__name__}.warmup() ran no sample (define warmup() to run one)"


# Keyword arguments only the torch workflow reads; the ONNX workflow is handed the rest.
_TORCH_ONLY_KWARGS = ("use_jit", "device", "precision", "cast_inputs")


def _onnx_if_onnx_file(workflow: Any, settings: ServiceSettings) -> Any:
    """The built-in torch workflow hands an ONNX model file to the ONNX workflow (same model selection, same
    source and verification; the file is already fetched by ``prepare``, so ``fetch`` only finds it)."""
    from workflows.onnx_workflow import ONNXInferenceWorkflow, is_onnx

    if not is_onnx(workflow.fetch()):
        return workflow
    kwargs = {k: v for k, v in settings.workflow_kwargs.items() if k not in _TORCH_ONLY_KWARGS}
    try:
        return ONNXInferenceWorkflow(*settings.workflow_args, **kwargs)
    except TypeError as e:
        why = _mismatch(ONNXInferenceWorkflow, settings.workflow_args, kwargs) or str(e)
        raise StartupError(
            f"CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS / _KW_ARGS do not fit the ONNX workflow (an ONNX file): {why}"
        ) from None


def qualified_name(workflow: Any) -> str:
    cls = type(workflow)
    return f"{cls.__module__}.{cls.__qualname__}"


def describe(workflow: Any) -> dict[str, Any]:
    """What ``GET /info`` reports about the workflow's model: its ``describe()``, if it has one."""
    describe = getattr(workflow, "describe", None)
    return describe() if callable(describe) else {}
