"""A model file from a Hugging Face Hub repository, through ``huggingface_hub`` and its own cache.

``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_DISABLE_PROGRESS_BARS`` mean what
they mean to ``huggingface_hub``. A second call finds the file in that cache: one ``HEAD`` to learn whether the
revision moved, no download. Checked before use: the size (by the library), the sha256 the Hub states for LFS files,
and the operator's ``sha256`` pin. The token is handed to the library and never written anywhere by this module.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from core.errors import StartupError, first_line
from core.settings import TorchSettings, boolean
from workflows.sources import ModelSpec, check_pin_digest
from workflows.sources.cache import ModelCache

log = logging.getLogger("workflows.sources.huggingface")

_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOKEN_VARS = "HF_TOKEN / HUGGING_FACE_HUB_TOKEN"


def fetch(spec: ModelSpec, settings: TorchSettings) -> Path:
    assert spec.repo_id
    import huggingface_hub
    from huggingface_hub import constants

    # Read at call time as well: huggingface_hub reads both variables once, when it is first imported.
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or None
    offline = constants.is_offline_mode() or boolean(os.environ, "HF_HUB_OFFLINE", False)
    try:
        path = Path(
            huggingface_hub.hf_hub_download(
                spec.repo_id,
                spec.filename,
                revision=spec.revision,
                token=settings.hf_token,
                endpoint=endpoint,
                local_files_only=offline,
            )
        )
    except Exception as e:
        raise StartupError(_reason(e, settings.hf_token, offline, endpoint or constants.ENDPOINT)) from None
    _verify(path, spec, ModelCache(settings.model_cache_dir))
    return path


def _verify(path: Path, spec: ModelSpec, cache: ModelCache) -> None:
    try:
        digest = cache.file_sha256(path, "huggingface")
    except OSError as e:
        raise StartupError(f"cannot read the downloaded file ({e.strerror or e})") from None
    # An LFS file's cache name is the sha256 the Hub states for it (the library itself checks only the size).
    stated = path.resolve().name
    try:
        if _SHA256.fullmatch(stated) and digest != stated:
            raise StartupError(f"sha256 mismatch: the download hashes to {digest}, the Hub states {stated}")
        check_pin_digest(digest, spec)
    except StartupError:
        _evict(path)
        raise


def _evict(path: Path) -> None:
    """Remove a refused file from the Hugging Face cache (its snapshot link and its blob), so that nothing the
    service refused stays there looking usable."""
    blob = path.resolve()
    for victim in (path, blob):
        try:
            victim.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove refused file %s: %s", victim, e.strerror or e)


def _reason(error: Exception, token: str | None, offline: bool, endpoint: str) -> str:
    from huggingface_hub import errors

    have_token = "a token is set" if token else f"no token is set ({_TOKEN_VARS})"
    if isinstance(error, errors.GatedRepoError):
        return f"gated repository: access has not been granted to this token ({have_token})"
    if isinstance(error, errors.RepositoryNotFoundError):
        return f"repository not found, or private and not visible to this token ({have_token})"
    if isinstance(error, errors.RevisionNotFoundError):
        return "revision not found in the repository"
    if isinstance(error, errors.LocalEntryNotFoundError):
        if offline:
            return "HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache"
        return f"the Hub at {endpoint} cannot be reached and the file is not in the Hugging Face cache"
    if isinstance(error, errors.EntryNotFoundError):
        return "file not found in the repository"
    if isinstance(error, errors.HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            return f"the Hub refused the token: invalid credentials ({_TOKEN_VARS})"
        if status == 403:
            return f"access denied by the Hub (HTTP 403; {have_token})"
        return f"the Hub answered HTTP {status}"
    return _redact(f"{type(error).__name__}: {first_line(error)}", token)


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text
