"""Per-request models: a model id a request named (and the operator allowed) -> a set-up workflow.

Two steps, each on a thread of the runner's registry (runner/model_registry.py), never on the model thread, so the
models already loaded keep serving: ``fetch_model`` (on a download thread, or on a loader thread when ``is_cached``
says the file is already verified in the cache) and ``load_model`` (on a loader thread). The model comes from the
same sources, cache and verification as the default model (workflows/sources), and its workflow is the default's
class and keyword arguments with the model replaced: the built-in torch workflow, or the ONNX workflow when the file
is an ONNX model. Every failure is a ``ServiceError`` whose status the client sees (never 500): 404 not found, 403
refused (a pickle from an untrusted source, no access, a Hugging Face version that is neither a branch nor a tag nor
the commit of one while no ALLOWED_MODELS pattern spells it out), 413 too large for MAX_LOADED_MODEL_BYTES or
MAX_CACHED_MODEL_BYTES (or a zip archive that declares more), 422 a file that does not load as a model, 502 a source
that cannot be reached (also when the Hub cannot be asked whether such a version is published) or a file that fails
verification, 507 no room in the model cache while the models in use fill MAX_CACHED_MODEL_BYTES
(workflows/sources/disk_bound.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from core import hub
from core.errors import FetchError, ServiceError, StartupError, first_line
from core.model_ids import ModelId, parse_model_id, pickle_refused, pickles_trusted
from core.settings import BUILTIN_TORCH_WORKFLOW, ServiceSettings, TorchSettings
from workflows import progress, sources
from workflows.sources import ModelSpec, disk_bound

log = logging.getLogger("workflows.per_request")

ONNX_WORKFLOW = "workflows.onnx_workflow.ONNXInferenceWorkflow"
# KW_ARGS that name the default model (or are tied to it); a per-request model replaces them all.
_MODEL_KWARGS = ("model_path", "model_name", "model_source", "model_args", "load_args", "revision", "sha256")
# The default model's own tuning, chosen by the operator for that model: a per-request model runs with the defaults.
_MODEL_ONLY_KWARGS = ("warmup_input", "output_names", "precision", "cast_inputs")
_TORCH_ONLY_KWARGS = ("use_jit", "device", "precision", "cast_inputs")
_ONNX_ONLY_KWARGS = ("output_names", "providers")
PENDING_CHECK = (
    "not checked yet: the first request of rank >= 2 runs alone and in a batch with variants of it before any "
    "requests share a forward"
)


class ModelLoadError(ServiceError):
    """``found``: the source had the file (the runner's registry gives only such ids their own counts)."""

    def __init__(self, status: int, description: str, found: bool = False) -> None:
        super().__init__(description)
        self.status = status
        self.found = found


def check_version_published(model_id: str, allowed_models: tuple[str, ...] | list[str], hf_token: str | None) -> None:
    """core/hub.py ``check_version_published``, its refusal as the ModelLoadError a request gets (same status and
    words). On a runner download or loader thread."""
    try:
        hub.check_version_published(model_id, allowed_models, hf_token)
    except FetchError as e:
        raise ModelLoadError(e.status, str(e)) from None


def spec_of(settings: ServiceSettings, model_id: str) -> tuple[ModelId, ModelSpec, TorchSettings]:
    """The parsed id, the file it names and the settings its fetch and load use. Raises ModelLoadError 422 when the
    served workflow is not one a per-request model can use."""
    if settings.workflow_class not in (BUILTIN_TORCH_WORKFLOW, ONNX_WORKFLOW):
        raise ModelLoadError(
            422,
            f"model {model_id}: per-request models need the built-in torch or ONNX workflow "
            f"(CLASSIC_INF_WORKFLOW_CLASS is {settings.workflow_class})",
        )
    model = parse_model_id(model_id)
    torch_settings = TorchSettings.from_env()
    spec = ModelSpec(
        model.source,  # type: ignore[arg-type]
        filename=model.filename or torch_settings.model_file_name,
        # Hugging Face: the repo id; Arweave: the Repo-Name (or Model-Id) tag, signed by the owner the id names.
        repo_id=model.repo_id if model.source == "huggingface" else model.repo,
        revision=model.version,
        owners=(model.owner,) if model.source == "arweave" else (),
    )
    return model, spec, torch_settings


def is_cached(settings: ServiceSettings, model_id: str) -> bool:
    """Whether ``model_id``'s file is most likely verified in the cache already (``sources.is_cached``: no network,
    no hashing), so that fetching it downloads nothing. On the runner, off its event loop. Never raises."""
    try:
        _, spec, torch_settings = spec_of(settings, model_id)
    except Exception:
        return False
    return sources.is_cached(spec, torch_settings)


def fetch_model(
    settings: ServiceSettings, model_id: str, max_bytes: int, on_bytes: sources.OnBytes | None = None
) -> Path:
    """The verified local file of ``model_id`` (canonical id text, already allowed), downloaded if needed;
    ``on_bytes`` is told the download's progress. On a runner download (or, when cached, loader) thread; prints the
    start-up style ``download`` line naming the model. Raises ModelLoadError (see the module docstring)."""
    _, spec, torch_settings = spec_of(settings, model_id)
    check_version_published(model_id, settings.allowed_models, torch_settings.hf_token)
    with progress.stage(
        "download", client_chosen=True, model_id=model_id, source=spec.source, file=spec.filename
    ) as fetched:
        try:
            cache_dir, max_cached = torch_settings.model_cache_dir, settings.max_cached_model_bytes
            with disk_bound.reserving(cache_dir, max_cached, model_id) as room:
                path = sources.fetch(spec, torch_settings, max_bytes, on_bytes, room)
        except sources.TooLarge as e:
            raise ModelLoadError(413, _too_large(model_id, e.size_bytes, max_bytes), True) from None
        except StartupError as e:
            # The operator's log keeps the source's address (an internal mirror's, a gateway's); the client does not.
            # A model that is not there or refused is the client's choice (INFO: clients must not be able to fill
            # the operator's log with warnings); a source that cannot be reached is the operator's (WARNING).
            status = getattr(e, "status", 502)  # a source's refusal carries its status (FetchError); else its fault
            log.log(logging.INFO if status < 500 else logging.WARNING, "model %s: %s", model_id, first_line(e))
            reason = hub.without_addresses(first_line(e))
            raise ModelLoadError(status, f"model {model_id}: {reason}") from None
        fetched.update(bytes=path.stat().st_size)
        disk_bound.touch(torch_settings.model_cache_dir, path, spec.source)
    return path


def load_model(settings: ServiceSettings, model_id: str, path: Path, max_bytes: int) -> tuple[Any, int]:
    """(set-up workflow, model file size in bytes) for ``model_id``'s fetched file ``path`` (``fetch_model``).

    On a runner loader thread; prints the start-up style ``load`` line naming the model.
    Raises ModelLoadError (see the module docstring for the statuses)."""
    model, spec, torch_settings = spec_of(settings, model_id)
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelLoadError(413, _too_large(model_id, size, max_bytes), True)
    from workflows import model_formats
    from workflows.onnx_workflow import ONNXInferenceWorkflow, is_onnx

    kwargs = {k: v for k, v in settings.workflow_kwargs.items() if k not in (*_MODEL_KWARGS, *_MODEL_ONLY_KWARGS)}
    if is_onnx(path):
        cls: type = ONNXInferenceWorkflow
        kwargs = {k: v for k, v in kwargs.items() if k not in _TORCH_ONLY_KWARGS}
    else:
        trusted = pickles_trusted(model, settings.allow_pickled_models, torch_settings.allowed_arweave_owners)
        try:
            kind = model_formats.detect(path, spec.filename)
        except model_formats.ArchiveTooLarge as e:  # stated before its directory is parsed
            raise ModelLoadError(413, f"model {model_id}: {e}", True) from None
        if model_formats.problem(kind):
            raise ModelLoadError(422, f"model {model_id} does not load: {model_formats.problem(kind)}", True)
        pickled = None if trusted else model_formats.pickled(path, kind)
        if pickled:
            raise ModelLoadError(403, pickle_refused(model_id, pickled), True)
        from workflows.torch_workflow import TorchInferenceWorkflow

        cls = TorchInferenceWorkflow
        kwargs = {k: v for k, v in kwargs.items() if k not in _ONNX_ONLY_KWARGS}
    with progress.stage("load", client_chosen=True, model_id=model_id, workflow=cls.__name__):
        try:
            workflow = cls(model_path=str(path), settings=torch_settings, **kwargs)
            workflow.setup()
        except Exception as e:
            reason = _client_reason(e, path, spec.filename)
            if isinstance(e.__cause__, model_formats.ArchiveTooLarge):  # a zip bomb, refused before torch opened it
                raise ModelLoadError(413, f"model {model_id}: {reason}", True) from None
            raise ModelLoadError(422, f"model {model_id} does not load: {reason}", True) from None
    info = getattr(workflow, "info", None)
    if isinstance(info, dict):  # the file was fetched here; /info names where it came from
        info.update(model_id=model_id, source=model.source, repo=spec.repo_id, revision=model.version)
    if workflow.batching:
        # No warm-up input here, and a client chose the model: the model thread checks the first request that could
        # share a forward (alone vs. in a batch with variants of it) before any do (workflows/base.py
        # check_on_first_request); until then each runs alone.
        workflow.batching_check_pending = True
        if isinstance(info, dict):
            info["batching"] = {"enabled": True, "checked": False, "reason": PENDING_CHECK}
    return workflow, size


def _too_large(model_id: str, size_bytes: int | None, max_bytes: int) -> str:
    size = f"is {size_bytes} bytes" if size_bytes is not None else "is larger"
    return f"model {model_id} {size}, more than MAX_LOADED_MODEL_BYTES ({max_bytes}) allows"


def _client_reason(error: Exception, path: Path, filename: str) -> str:
    """The reason a per-request model does not load, as its (possibly anonymous) client may read it: the workflow's
    start-up line names the file's place on this server (``model source=local repo=/...``) and its cache blob's hash;
    the loader's own reason (chained by the torch workflow) does not, and any path left is replaced by the name."""
    cause = error.__cause__ if isinstance(error.__cause__, StartupError) else error
    text = first_line(cause)
    resolved = path.resolve()
    for shown in (str(resolved), str(path), str(resolved.parent), str(path.parent), resolved.name):
        text = text.replace(shown, filename)
    return text
