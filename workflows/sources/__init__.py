"""Where model files come from. Each source is one module with ``fetch(spec, settings) -> verified local path``;
the workflow never knows which one produced its file."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.errors import FetchError, StartupError
from core.settings import TorchSettings
from core.terms import json_text
from workflows.sources.cache import ModelCache

SourceName = Literal["local", "huggingface", "arweave"]
# Told of a download's progress, on the thread that downloads: (bytes received so far, the file's size or None).
OnBytes = Callable[[int, int | None], None]
_SOURCE_ALIASES = {
    "local": "local",
    "huggingface": "huggingface",
    "huggingface_hub": "huggingface",
    "hf": "huggingface",
    "arweave": "arweave",
}


@dataclass(frozen=True)
class ModelSpec:
    """One model file, named by the operator."""

    source: SourceName
    filename: str
    repo_id: str | None = None  # Hugging Face repo id, or the Arweave repo name
    path: Path | None = None  # local file
    revision: str | None = None  # Hugging Face revision, or Arweave File-Version
    owners: tuple[str, ...] = ()  # Arweave uploaders whose files may be loaded
    sha256: str | None = None  # pin: the file must hash to this

    def describe(self) -> str:
        where = str(self.path) if self.source == "local" else self.repo_id
        revision = f" revision {self.revision}" if self.revision else ""
        return f"source={self.source} repo={where} file={self.filename}{revision}"


def spec_from_kwargs(kwargs: dict[str, Any], settings: TorchSettings) -> ModelSpec:
    """The three KW_ARGS forms of the contract -> one ModelSpec. Raises StartupError naming the key for a value of
    the wrong JSON type, and for more than one form (they would name different models)."""
    _strings(kwargs, ("model_path", "model_name", "revision", "sha256"), "")
    args = kwargs.get("model_args")
    if isinstance(args, dict):
        _strings(args, ("repo_id", "filename", "version", "revision", "model_path", "path"), "model_args.")
        owners = args.get("owners")
        if owners is not None and not (isinstance(owners, list) and all(isinstance(o, str) for o in owners)):
            got = json_text(owners)
            raise StartupError(
                f"CLASSIC_INF_WORKFLOW_KW_ARGS: model_args.owners: expected an array of strings, got {got}"
            )
    forms = [key for key in ("model_path", "model_name", "model_source") if kwargs.get(key) not in (None, "")]
    if len(forms) > 1:
        raise StartupError(f"CLASSIC_INF_WORKFLOW_KW_ARGS: {' and '.join(forms)} both name a model; keep one of them")
    sha256 = _sha256_pin(kwargs.get("sha256"))
    revision = kwargs.get("revision")
    if kwargs.get("model_path"):
        path = Path(kwargs["model_path"]).expanduser()
        return ModelSpec("local", path.name, path=path, sha256=sha256)
    if kwargs.get("model_source") is not None:
        source = _source_name(kwargs["model_source"])
        args = kwargs.get("model_args") or {}
        if not isinstance(args, dict):
            raise StartupError("CLASSIC_INF_WORKFLOW_KW_ARGS: model_args must be an object")
        if source == "local":
            local = args.get("model_path") or args.get("path") or args.get("repo_id")
            if not local:
                raise StartupError("CLASSIC_INF_WORKFLOW_KW_ARGS: model_args.model_path is required for a local model")
            path = Path(local).expanduser()
            return ModelSpec("local", path.name, path=path, sha256=sha256)
        repo_id = args.get("repo_id")
        if not repo_id:
            raise StartupError(f"CLASSIC_INF_WORKFLOW_KW_ARGS: model_args.repo_id is required for {source}")
        owners = tuple(args.get("owners") or settings.allowed_arweave_owners)
        return ModelSpec(
            source,
            filename=args.get("filename") or settings.model_file_name,
            repo_id=repo_id,
            revision=args.get("version") or args.get("revision") or revision,
            owners=owners if source == "arweave" else (),
            sha256=sha256,
        )
    if kwargs.get("model_name"):
        source = "arweave" if settings.use_arweave else "huggingface"
        return ModelSpec(
            source,
            filename=settings.model_file_name,
            repo_id=kwargs["model_name"],
            revision=revision,
            owners=settings.allowed_arweave_owners if source == "arweave" else (),
            sha256=sha256,
        )
    raise StartupError(
        "CLASSIC_INF_WORKFLOW_KW_ARGS: name a model with model_name, model_source + model_args, or model_path"
    )


class TooLarge(StartupError):
    """The model file is larger than the caller's ``max_bytes``: known from the source's signed or stated size before
    a byte was downloaded, or found when the stream ran past the bound (nothing of it is left in any cache)."""

    def __init__(self, size_bytes: int | None, max_bytes: int) -> None:
        self.size_bytes = size_bytes
        self.max_bytes = max_bytes
        size = f"{size_bytes} bytes" if size_bytes is not None else "larger than that"
        super().__init__(f"the file is {size}, more than MAX_LOADED_MODEL_BYTES ({max_bytes}) allows")


def fetch(
    spec: ModelSpec,
    settings: TorchSettings,
    max_bytes: int | None = None,
    on_bytes: OnBytes | None = None,
    reserve: Callable[[int], None] | None = None,
) -> Path:
    """A local path to the verified model file, downloading it if needed. ``max_bytes``: the largest file the caller
    will load (per-request models); a larger one is refused before its download, or as soon as its stream passes the
    bound, and nothing of it stays cached. ``on_bytes``: told of a download's progress (per-request models: the
    runner reports it). ``reserve(n)``: called just before a download of at most n bytes, never
    for a file already cached (per-request models: workflows/sources/disk_bound.py makes room in the cache, or raises
    FetchError). Raises StartupError, TooLarge, or
    FetchError (which keeps the source's status: 400, 403, 404 or 502) when the source refused or failed."""
    source = _module(spec)
    try:
        path = source.fetch(spec, settings, max_bytes, on_bytes, reserve)
    except TooLarge:
        raise
    except FetchError as e:
        raise FetchError(f"model {spec.describe()}: {e}", e.status) from None
    except StartupError as e:
        raise StartupError(f"model {spec.describe()}: {e}") from None
    except OSError as e:  # a full disk or an unreadable cache: one line too, not a traceback
        raise StartupError(f"model {spec.describe()}: {e.strerror or e}") from None
    if max_bytes is not None and (size := path.stat().st_size) > max_bytes:  # a local file, or a cache hit
        raise TooLarge(size, max_bytes)
    return path


def is_cached(spec: ModelSpec, settings: TorchSettings) -> bool:
    """Whether ``fetch`` would most likely find the file verified in a cache and download nothing: no network, no
    hashing (size and mtime as recorded when it was verified). A guess, never a promise: the source is still asked
    whether the file moved on (a Hub revision, a newer Arweave upload) when ``fetch`` runs. Never raises."""
    try:
        return bool(_module(spec).is_cached(spec, settings))
    except Exception:
        return False


def _module(spec: ModelSpec) -> Any:
    if spec.source == "local":
        from workflows.sources import local as source
    elif spec.source == "huggingface":
        from workflows.sources import huggingface as source
    else:
        from workflows.sources import arweave as source
    return source


def model_sha256(path: Path, spec: ModelSpec, settings: TorchSettings, fresh: bool = False) -> str:
    """sha256 of a fetched model file, remembered by path, size and mtime in the model cache, so that the runner's
    /info does not read a large model again. ``fresh`` reads the file whatever the record says: the pin check does,
    since a file changed in place can keep its size and mtime."""
    return ModelCache(settings.model_cache_dir).file_sha256(path, spec.source, fresh=fresh)


def check_pin_digest(actual: str, spec: ModelSpec) -> None:
    """The operator's ``sha256`` pin, checked whatever the source."""
    if spec.sha256 and actual != spec.sha256:
        raise StartupError(f"sha256 mismatch: the file hashes to {actual}, the pin says {spec.sha256}")


def _strings(kwargs: dict[str, Any], keys: tuple[str, ...], prefix: str) -> None:
    for key in keys:
        value = kwargs.get(key)
        if value is not None and not isinstance(value, str):
            raise StartupError(
                f"CLASSIC_INF_WORKFLOW_KW_ARGS: {prefix}{key}: expected a string, got {json_text(value)}"
            )


def _source_name(value: Any) -> SourceName:
    name = _SOURCE_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise StartupError(
            f"CLASSIC_INF_WORKFLOW_KW_ARGS: unknown model_source {value!r}; expected huggingface_hub, arweave or local"
        )
    return name  # type: ignore[return-value]


def _sha256_pin(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise StartupError("CLASSIC_INF_WORKFLOW_KW_ARGS: sha256 must be 64 hex digits")
    return text
