"""The environment, read once at start-up into typed settings. Errors name the variable and what was expected."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import legacy_env, secrets
from core.errors import StartupError
from core.terms import json_type

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = REPO_ROOT / "models" / "iris" / "model.torch"
# The README's iris row: warms the embedded model up and checks that batching it keeps its answers.
EMBEDDED_WARMUP_INPUT = {"dtype": "double", "values": [[1.0380048, 0.5586108, 1.1037828, 1.712096]]}
BUILTIN_TORCH_WORKFLOW = "workflows.torch_workflow.TorchInferenceWorkflow"
# Upper bounds of counts that start processes or threads: a typo (an extra digit or ten) must not try to start them.
MAX_PROCESSES = 256
MAX_THREADS = 1024
# Class paths of the original infernet-ml library; an old env file keeps working without it.
LEGACY_CLASS_PATHS = {
    "infernet_ml.workflows.inference.torch_inference_workflow.TorchInferenceWorkflow": BUILTIN_TORCH_WORKFLOW,
    "infernet_ml.workflows.inference.onnx_inference_workflow.ONNXInferenceWorkflow": (
        "workflows.onnx_workflow.ONNXInferenceWorkflow"
    ),
}
MiB = 1024 * 1024
# Every variable the service reads: its own (below), and the Hugging Face library's that it honours
# (workflows/sources/huggingface.py). Test servers clear them all, so a developer's shell cannot leak into them;
# tests/test_config.py checks that the list is complete.
VARIABLES = (
    "CLASSIC_INF_WORKFLOW_CLASS", "CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS", "CLASSIC_INF_WORKFLOW_KW_ARGS",
    "MAX_BATCH_SIZE", "MAX_LATENCY_MS", "MAX_REQUEST_BYTES", "MAX_REQUEST_ELEMENTS", "API_WORKERS",
    "REQUEST_TIMEOUT_S", "MAX_CONCURRENCY", "SHUTDOWN_TIMEOUT_S", "BEARER_TOKEN", "BEARER_TOKEN_FILE", "MODEL_NAME",
    "KEEP_ALIVE_TIMEOUT_S", "BODY_TIMEOUT_S", "MAX_HEADER_BYTES", "INFERNET_FAST_PATH",
    "TORCH_MODEL_FILE_NAME", "USE_JIT", "USE_ARWEAVE", "ALLOWED_ARWEAVE_OWNERS", "ARWEAVE_GATEWAY", "MODEL_CACHE_DIR",
    "TORCH_NUM_THREADS", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
    "HF_ENDPOINT", "HF_HUB_OFFLINE",
    "ALLOWED_MODELS", "MAX_LOADED_MODELS", "MAX_LOADED_MODEL_BYTES", "MAX_CACHED_MODEL_BYTES", "ALLOW_PICKLED_MODELS",
    "CHAIN_LAYOUT",
    *legacy_env.LEGACY_VARIABLES,  # the newer Infernet services' names, read as the ones above (core/legacy_env.py)
)  # fmt: skip
GiB = 1024 * MiB
# CHAIN_LAYOUT: how CHAIN data is read (public/infernet_ml_layouts.py); auto tells the layouts apart by the first word.
CHAIN_LAYOUTS = ("auto", "int256", "v1", "v2")


@dataclass(frozen=True)
class ServiceSettings:
    """How the service runs: which workflow, batching, limits, processes."""

    workflow_class: str = BUILTIN_TORCH_WORKFLOW
    workflow_args: list[Any] = field(default_factory=list)
    workflow_kwargs: dict[str, Any] = field(default_factory=lambda: {"model_path": str(EMBEDDED_MODEL)})
    max_batch_size: int = 64
    max_latency_ms: int = 10_000
    max_request_bytes: int = 32 * MiB
    max_elements: int = 4_000_000
    api_workers: int = 2
    timeout_s: float = 60.0
    # Requests in progress across the service before new ones get 503; split evenly over the API workers.
    max_concurrency: int = 256
    # After SIGTERM, requests still running get a JSON 503 this long after it; the processes exit shortly after.
    # Below Kubernetes' terminationGracePeriodSeconds (30 s by default), so nothing is killed mid-answer.
    shutdown_timeout_s: float = 20.0
    # BEARER_TOKEN / BEARER_TOKEN_FILE: when set, the inference and information routes need it (api/auth.py).
    bearer_token: str | None = field(default=None, repr=False)
    # The model's name in the Open Inference Protocol's routes (/v2/models/NAME/...).
    model_name: str = "model"
    # Idle keep-alive connections live longer than the clients' pools (aiohttp 15 s, load balancers 60 s): a request
    # sent on a connection the server is closing at that moment is lost (docs/reliability.md, "HTTP edges").
    keep_alive_timeout_s: float = 75.0
    # Time to receive a request's head, and then its body; a slower client gets 408 and its connection is closed.
    body_timeout_s: float = 30.0
    max_header_bytes: int = 64 * 1024
    # INFERNET_FAST_PATH: the busy routes skip BentoML's middleware (core/bentoml_seam.py); off, BentoML's public
    # path serves (slower; for another BentoML version, it is off by itself).
    fast_path: bool = True
    # Many models (README "Many models"): per-request model ids the operator allows (nothing by default), and the
    # bounds of the runner's LRU of per-request models (the default model is never counted nor evicted).
    allowed_models: tuple[str, ...] = ()
    max_loaded_models: int = 4
    max_loaded_model_bytes: int = 2 * GiB
    # The disk the per-request models' cached files may take (workflows/sources/disk_bound.py); by default four
    # times MAX_LOADED_MODEL_BYTES: the loaded models' files and as many again stay cached.
    max_cached_model_bytes: int = 4 * max_loaded_model_bytes
    # Hugging Face per-request models that are pickles run the uploader's code when loaded: refused unless set.
    allow_pickled_models: bool = False
    chain_layout: str = "auto"
    # The newer Infernet services' variables that were read as this service's (printed once, at start-up).
    legacy_mapped: tuple[legacy_env.Mapped, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ServiceSettings:
        env, mapped = legacy_env.translate(env)
        class_path = env_value(env, "CLASSIC_INF_WORKFLOW_CLASS") or BUILTIN_TORCH_WORKFLOW
        workflow_class = LEGACY_CLASS_PATHS.get(class_path, class_path)
        # No model named for the built-in torch workflow (the class unset, or set to its default by either path):
        # serve the example model shipped in the repository, so that naming the default class changes nothing.
        embedded = "CLASSIC_INF_WORKFLOW_KW_ARGS" not in env and workflow_class == BUILTIN_TORCH_WORKFLOW
        max_loaded = integer(env, "MAX_LOADED_MODEL_BYTES", cls.max_loaded_model_bytes, minimum=1)
        return cls(
            workflow_class=workflow_class,
            workflow_args=json_value(env, "CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS", [], list),
            workflow_kwargs={"model_path": str(EMBEDDED_MODEL)}
            if embedded
            else json_value(env, "CLASSIC_INF_WORKFLOW_KW_ARGS", {}, dict),
            max_batch_size=integer(
                env,
                "MAX_BATCH_SIZE",
                cls.max_batch_size,
                minimum=2,
                hint="; to run every request alone, set batching to false in CLASSIC_INF_WORKFLOW_KW_ARGS",
            ),
            max_latency_ms=integer(env, "MAX_LATENCY_MS", cls.max_latency_ms, minimum=1),
            max_request_bytes=integer(env, "MAX_REQUEST_BYTES", cls.max_request_bytes, minimum=64),
            max_elements=integer(env, "MAX_REQUEST_ELEMENTS", cls.max_elements, minimum=1),
            api_workers=integer(env, "API_WORKERS", cls.api_workers, minimum=1, maximum=MAX_PROCESSES),
            timeout_s=number(env, "REQUEST_TIMEOUT_S", cls.timeout_s, minimum=0.1),
            max_concurrency=integer(env, "MAX_CONCURRENCY", cls.max_concurrency, minimum=1),
            shutdown_timeout_s=number(env, "SHUTDOWN_TIMEOUT_S", cls.shutdown_timeout_s, minimum=0.1),
            bearer_token=bearer_token(env),
            model_name=url_name(env, "MODEL_NAME", cls.model_name),
            keep_alive_timeout_s=number(env, "KEEP_ALIVE_TIMEOUT_S", cls.keep_alive_timeout_s, minimum=1),
            body_timeout_s=number(env, "BODY_TIMEOUT_S", cls.body_timeout_s, minimum=0.1),
            max_header_bytes=integer(env, "MAX_HEADER_BYTES", cls.max_header_bytes, minimum=1024),
            fast_path=boolean(env, "INFERNET_FAST_PATH", cls.fast_path),
            allowed_models=allowed_models(env),
            max_loaded_models=integer(env, "MAX_LOADED_MODELS", cls.max_loaded_models, minimum=1),
            max_loaded_model_bytes=max_loaded,
            max_cached_model_bytes=integer(
                env,
                "MAX_CACHED_MODEL_BYTES",
                4 * max_loaded,
                minimum=max_loaded,
                hint="; it holds the loaded models' files, so at least MAX_LOADED_MODEL_BYTES: raise it or lower that",
            ),
            allow_pickled_models=boolean(env, "ALLOW_PICKLED_MODELS", cls.allow_pickled_models),
            chain_layout=chain_layout(env),
            legacy_mapped=mapped,
        )

    @property
    def max_concurrency_per_worker(self) -> int:
        return -(-self.max_concurrency // self.api_workers)


@dataclass(frozen=True)
class TorchSettings:
    """What the built-in torch workflow reads from the environment (the original service's variables)."""

    model_file_name: str = "model.torch"
    use_jit: bool = False
    use_arweave: bool = False
    allowed_arweave_owners: tuple[str, ...] = ()
    arweave_gateway: str = "https://arweave.net"
    model_cache_dir: Path = Path.home() / ".cache" / "infernet-torch-service"
    hf_token: str | None = field(default=None, repr=False)
    num_threads: int | None = None
    max_elements: int = ServiceSettings.max_elements  # MAX_REQUEST_ELEMENTS, enforced where values are decoded
    # MAX_LOADED_MODEL_BYTES, also the bound on what a model's zip archive may declare (model_formats.check_archive)
    max_loaded_model_bytes: int = ServiceSettings.max_loaded_model_bytes

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> TorchSettings:
        env, _ = legacy_env.translate(env)
        use_arweave = boolean(env, "USE_ARWEAVE", False)
        owners = owner_list(env, "ALLOWED_ARWEAVE_OWNERS")
        if use_arweave and not owners:
            raise StartupError(
                "ALLOWED_ARWEAVE_OWNERS: required when USE_ARWEAVE is true "
                "(a JSON list or comma-separated wallet addresses whose uploads may be loaded)"
            )
        cache_root = Path(env_value(env, "XDG_CACHE_HOME") or Path.home() / ".cache")
        threads = env_value(env, "TORCH_NUM_THREADS")
        return cls(
            model_file_name=env_value(env, "TORCH_MODEL_FILE_NAME") or cls.model_file_name,
            use_jit=original_boolean(env, "USE_JIT"),
            use_arweave=use_arweave,
            allowed_arweave_owners=owners,
            arweave_gateway=(env_value(env, "ARWEAVE_GATEWAY") or cls.arweave_gateway).rstrip("/"),
            model_cache_dir=Path(env_value(env, "MODEL_CACHE_DIR") or cache_root / "infernet-torch-service"),
            hf_token=hf_token(env),
            num_threads=integer(env, "TORCH_NUM_THREADS", 0, minimum=1, maximum=MAX_THREADS)
            if threads
            else model_threads(),
            max_elements=integer(env, "MAX_REQUEST_ELEMENTS", cls.max_elements, minimum=1),
            max_loaded_model_bytes=integer(env, "MAX_LOADED_MODEL_BYTES", cls.max_loaded_model_bytes, minimum=1),
        )


def model_threads() -> int:
    """TORCH_NUM_THREADS by default: one fewer than the CPUs this process may use, at least 1.

    The spare core is for the HTTP side (API workers, the runner's event loop). When the forward's threads and those
    processes together want more cores than there are, the forward's threads wait on each other: on 2 cores, 1
    thread served the heavy benchmark model 14-24 % faster at c=64 than 2 (docs/performance.md, section 13).
    """
    return max(1, available_cpus() - 1)


CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD"


def available_cpus() -> int:
    """CPUs this process may use: its affinity, capped by a container's CPU limit (cgroup v2) when there is one."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        if quota != "max":
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


# Variables the libraries read for the service (huggingface_hub, the cache folders): unquoted like the service's own.
LIBRARY_VARIABLES = ("XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_DISABLE_PROGRESS_BARS")
_QUOTES = ("'", '"')


def env_value(env: Mapping[str, str], name: str) -> str:
    """``env[name]`` as the service reads every variable: surrounding whitespace removed, and one matching pair of
    surrounding quotes removed as python-dotenv (``quart -e file.env``) does, since ``docker/podman run --env-file``
    keep them literally. "" when unset. Raises nothing."""
    raw = env.get(name, "").strip()
    if len(raw) >= 2 and raw[0] in _QUOTES and raw[-1] == raw[0]:
        return raw[1:-1].strip()
    return raw


def unquote_environment(environ: dict[str, str] | Any = os.environ) -> list[str]:
    """Replace, in ``environ``, every quoted value of the service's and its libraries' variables by what ``env_value``
    reads, so that libraries reading the environment themselves and the worker processes (which inherit it) see
    the same; the names of those replaced. Run once, in the server's main process, before its workers start."""
    quoted = []
    for name in (*VARIABLES, *LIBRARY_VARIABLES):
        raw = environ.get(name)
        if raw is not None and env_value(environ, name) != raw.strip():
            environ[name] = env_value(environ, name)
            quoted.append(name)
    return quoted


def json_value(env: Mapping[str, str], name: str, default: Any, kind: type) -> Any:
    raw = env_value(env, name)
    if not raw:
        return default
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise StartupError(f"{name}: expected a JSON {_kind(kind)}, got malformed JSON ({e.msg} at {e.pos})") from None
    if not isinstance(value, kind):
        raise StartupError(f"{name}: expected a JSON {_kind(kind)}, got {json_type(value)}")
    return value


_URL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def url_name(env: Mapping[str, str], name: str, default: str) -> str:
    """A name that stands as one URL path segment as it is (no quoting by clients)."""
    raw = env_value(env, name)
    if not raw:
        return default
    if not _URL_NAME.match(raw):
        raise StartupError(
            f"{name}: expected up to 128 letters, digits, '_', '.' or '-' starting with a letter or digit, got {raw!r}"
        )
    return raw


def boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env_value(env, name).lower()
    if not raw:
        return default
    if raw in ("1", "true", "t", "yes", "on"):
        return True
    if raw in ("0", "false", "f", "no", "off"):
        return False
    raise StartupError(f"{name}: expected true or false, got {raw!r}")


def original_boolean(env: Mapping[str, str], name: str) -> bool:
    """A variable the original service read itself, parsed as it did (``os.getenv(name, "False").lower() in
    ("true", "1", "t")``): an existing env file keeps its meaning, so any other value, ``yes`` included, is false.
    Raises nothing."""
    return env_value(env, name).lower() in ("true", "1", "t")


def integer(
    env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int | None = None, hint: str = ""
) -> int:
    """``env[name]`` as an integer in [minimum, maximum], else ``default`` when unset. Raises StartupError naming the
    variable, the range and, with ``hint``, what to do instead."""
    raw = env_value(env, name)
    if not raw:
        return default
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer from {minimum} to {maximum}"
    try:
        value = int(raw)
    except ValueError:
        raise StartupError(f"{name}: expected {expected}, got {raw!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise StartupError(f"{name}: expected {expected}, got {shown}{hint}")
    return value


def number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env_value(env, name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise StartupError(f"{name}: expected a number >= {minimum}, got {raw!r}") from None
    if not value >= minimum:
        raise StartupError(f"{name}: expected a number >= {minimum}, got {raw!r}")
    return value


def bearer_token(env: Mapping[str, str]) -> str | None:
    """BEARER_TOKEN, or the content of the file BEARER_TOKEN_FILE names (a mounted Kubernetes Secret); None when
    neither is set. Errors name the variable and never include the token."""
    value, file_name = env_value(env, "BEARER_TOKEN"), env_value(env, "BEARER_TOKEN_FILE")
    if value and file_name:
        raise StartupError("BEARER_TOKEN and BEARER_TOKEN_FILE: set one of them, not both")
    name = "BEARER_TOKEN"
    if file_name:
        name = "BEARER_TOKEN_FILE"
        try:
            value = Path(file_name).read_text(encoding="utf-8").strip()  # files end with a newline more often than not
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
            raise StartupError(f"BEARER_TOKEN_FILE: cannot read {file_name}: {reason}") from None
        if not value:
            raise StartupError(f"BEARER_TOKEN_FILE: {file_name} is empty")
    if not value:
        return None
    # A token a client cannot put into an HTTP header would lock every client out.
    return secret(name, value)


def hf_token(env: Mapping[str, str]) -> str | None:
    """HF_TOKEN, else HUGGING_FACE_HUB_TOKEN (huggingface_hub's order); None when neither is set. Both are checked
    when set: a token with a line break would make the HTTP library raise an error that quotes it."""
    tokens = [
        secret(name, env_value(env, name)) for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN") if env_value(env, name)
    ]
    return tokens[0] if tokens else None


def secret(name: str, raw: str) -> str:
    """``raw`` checked for an HTTP header (core/secrets.py); StartupError names ``name`` and the fault, never the
    value."""
    try:
        return secrets.check(name, raw)
    except ValueError as e:
        raise StartupError(str(e)) from None


def owner_list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    raw = env_value(env, name)
    if not raw:
        return ()
    if raw.startswith("["):
        owners = json_value(env, name, [], list)
        if not all(isinstance(o, str) for o in owners):
            raise StartupError(f"{name}: expected a JSON list of wallet addresses (strings)")
    else:
        owners = raw.split(",")
    return tuple(o.strip() for o in owners if o.strip())


def allowed_models(env: Mapping[str, str]) -> tuple[str, ...]:
    # Imported here: core.model_ids brings eth_abi (and with it pydantic), which scripts/gpu_check.py's machines lack.
    from core.model_ids import AllowListError, parse_allowed_models

    try:
        return parse_allowed_models(env_value(env, "ALLOWED_MODELS") or None)
    except AllowListError as e:
        raise StartupError(str(e)) from None


def chain_layout(env: Mapping[str, str]) -> str:
    raw = env_value(env, "CHAIN_LAYOUT").lower() or "auto"
    if raw not in CHAIN_LAYOUTS:
        raise StartupError(f"CHAIN_LAYOUT: expected one of {', '.join(CHAIN_LAYOUTS)}, got {raw!r}")
    return raw


def _kind(kind: type) -> str:
    return {list: "list", dict: "object"}.get(kind, kind.__name__)
