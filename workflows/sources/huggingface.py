"""A model file from a Hugging Face Hub repository, through ``huggingface_hub`` and its own cache.

``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE`` and ``HF_HUB_DISABLE_PROGRESS_BARS`` mean what
they mean to ``huggingface_hub``. A second call finds the file in that cache: one ``HEAD`` to learn whether the
revision moved, no download. Checked before use: the size (by the library), the sha256 the Hub states for LFS files,
and the operator's ``sha256`` pin. The token is handed to the library and never written anywhere by this module.

The Hub is asked first (``get_hf_file_metadata``), because ``hf_hub_download`` serves its cached copy whatever the
Hub's error: a repository deleted or made private, a revoked token or a refused gate would still be served from a
warm cache. Here an answer of the Hub that refuses (401, 403, 404 and the other 4xx) stops, cache or not; only a
Hub that cannot be reached (connection error, timeout, 408, 429, 5xx, an answer that is not the Hub's) falls back to
the cached file, with a WARNING naming the cached revision.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from core.errors import FetchError, StartupError, first_line
from core.hub import refusal
from core.settings import TorchSettings, boolean, env_value
from workflows.sources import ModelSpec, OnBytes, TooLarge, check_pin_digest
from workflows.sources.cache import ModelCache

log = logging.getLogger("workflows.sources.huggingface")

_SHA256 = re.compile(r"[0-9a-f]{64}")


def fetch(
    spec: ModelSpec,
    settings: TorchSettings,
    max_bytes: int | None = None,
    on_bytes: OnBytes | None = None,
    reserve: Callable[[int], None] | None = None,
) -> Path:
    assert spec.repo_id
    import huggingface_hub
    from huggingface_hub import constants, errors
    from huggingface_hub.utils import validate_repo_id

    try:  # the library's naming rules, before any request (hf_hub_download would raise them only after the HEAD)
        validate_repo_id(spec.repo_id)
    except errors.HFValidationError as e:
        raise FetchError(f"invalid Hugging Face repo id: {first_line(e)}", 400) from None
    # Read at call time as well: huggingface_hub reads both variables once, when it is first imported.
    endpoint = env_value(os.environ, "HF_ENDPOINT").rstrip("/") or None
    offline = constants.is_offline_mode() or boolean(os.environ, "HF_HUB_OFFLINE", False)
    hub = endpoint or constants.ENDPOINT
    commit, size, etag, unreachable = Stated() if offline else _ask_hub(spec, settings.hf_token, endpoint, hub)
    if max_bytes is not None and size is not None and size > max_bytes:
        raise TooLarge(size, max_bytes)  # the Hub's HEAD stated it: refused before a byte is downloaded
    # The Hub just named the commit: a file cached for it needs no second HEAD from hf_hub_download.
    cached = _cached(spec, commit) if commit else None
    if cached is None and on_bytes is not None:
        on_bytes(0, size)  # the size is known before the first chunk arrives (the library reports whole chunks)
    if reserve is not None and cached is None and commit:
        # A download follows; without a stated size it stops at max_bytes (the bounded bar), so that much is reserved.
        stated = size if size is not None else max_bytes
        if stated is not None:
            reserve(stated)
    try:
        path = cached or Path(
            huggingface_hub.hf_hub_download(
                spec.repo_id,
                spec.filename,
                revision=spec.revision,
                token=settings.hf_token,
                endpoint=endpoint,
                local_files_only=offline or unreachable is not None,
                tqdm_class=None if max_bytes is None and on_bytes is None else _bounded_bar(max_bytes, size, on_bytes),
            )
        )
    except Exception as e:
        if max_bytes is not None:
            # A per-request download that failed leaves nothing to resume from: no partial file of a model nobody
            # will load (or of a server that lied about its size) stays in the Hugging Face cache.
            _remove_incomplete(spec, etag)
        if isinstance(e, (TooLarge, _LongerThanStated)):
            raise
        if unreachable is not None and isinstance(e, errors.LocalEntryNotFoundError):
            raise FetchError(
                f"the Hub at {hub} cannot be reached ({unreachable}) and the file is not in the Hugging Face cache"
            ) from None
        raise refusal(e, settings.hf_token, offline, hub) from None
    served = _snapshot_commit(path, spec.filename)
    if unreachable is not None:
        log.warning(
            "the Hub at %s cannot be reached (%s); serving the cached revision %s of %s file %s",
            hub,
            unreachable,
            served,
            spec.repo_id,
            spec.filename,
        )
    elif commit and served != commit:
        # hf_hub_download asked again and got something else: the revision moved, or its own HEAD failed and it
        # fell back to an older cached copy (which it does even when the Hub refuses).
        raise StartupError(f"the Hub's answer changed during the download (commit {commit}, got {served}); try again")
    _verify(path, spec, ModelCache(settings.model_cache_dir))
    return path


class Stated(NamedTuple):
    """What the Hub's ``HEAD`` said about the file; ``unreachable``: why the Hub could not be asked (all else None)."""

    commit: str | None = None
    size_bytes: int | None = None  # X-Linked-Size, else Content-Length
    etag: str | None = None  # the blob's name in the Hugging Face cache
    unreachable: str | None = None


def _ask_hub(spec: ModelSpec, token: str | None, endpoint: str | None, hub: str) -> Stated:
    """Asks the Hub for the file's metadata (one ``HEAD``): its commit, size and etag when the Hub answered that the
    file is there, or only ``unreachable`` when the Hub cannot be reached (the cache may then serve). Raises
    StartupError when the Hub refuses (the file, the repository, the revision or the token), whatever the cache
    holds."""
    from huggingface_hub import errors, get_hf_file_metadata, hf_hub_url

    assert spec.repo_id
    url = hf_hub_url(spec.repo_id, spec.filename, revision=spec.revision, endpoint=endpoint)
    try:
        metadata = get_hf_file_metadata(url, token=token, endpoint=endpoint)
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status is None or status >= 500 or status in (408, 429):
            return Stated(unreachable=f"HTTP {status}" if status else first_line(e))
        raise refusal(e, token, False, hub) from None
    except errors.HTTPError as e:  # no HTTP answer at all: refused connection, timeout, DNS, proxy
        return Stated(unreachable=f"{type(e).__name__}: {first_line(e)}")  # first_line masks the token
    if metadata.commit_hash is None:
        # What the library itself treats as "not the Hub" (a proxy or captive portal answering in its place).
        return Stated(unreachable="the answer has no X-Repo-Commit header: not a Hugging Face Hub")
    return Stated(metadata.commit_hash, metadata.size, metadata.etag)


class _LongerThanStated(StartupError):
    pass


def _bounded_bar(max_bytes: int | None, stated_bytes: int | None, on_bytes: OnBytes | None = None) -> type:
    """A progress bar class for ``hf_hub_download`` that stops the download when its stream passes ``max_bytes``
    (TooLarge) or the size the Hub stated (a server that lies about the size): the library counts each chunk on the
    bar before it writes it, so no byte past the bound reaches the disk. ``on_bytes`` is told each count."""
    from huggingface_hub.utils import tqdm

    class Bounded(tqdm):
        received = 0

        def update(self, n: float | None = 1) -> bool | None:
            self.received += int(n or 0)  # negative when the library restarts a download from byte 0
            if on_bytes is not None:
                on_bytes(max(self.received, 0), stated_bytes)
            if max_bytes is not None and self.received > max_bytes:
                raise TooLarge(None if stated_bytes is None else self.received, max_bytes)
            if stated_bytes is not None and self.received > stated_bytes:
                raise _LongerThanStated(
                    f"the download is longer than the {stated_bytes} bytes the Hub stated for it; refused"
                )
            return super().update(n)

    return Bounded


def _remove_incomplete(spec: ModelSpec, etag: str | None) -> None:
    """Remove what ``hf_hub_download`` left of a failed download of this file (``blobs/<etag>.incomplete``)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    assert spec.repo_id
    blobs = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=spec.repo_id, repo_type="model") / "blobs"
    # Without the etag (the Hub could not be asked), every partial of the repository goes: a resumed download costs
    # time, a partial nobody cleans costs disk for ever.
    _remove(blobs.glob(f"{etag}.incomplete" if etag else "*.incomplete"), "partial download")


def is_cached(spec: ModelSpec, settings: TorchSettings) -> bool:
    """Whether the Hugging Face cache holds the file for the revision its refs name (``main`` by default), hashed and
    recorded by ``_verify`` and unchanged since. No network, no hashing (``sources.is_cached``)."""
    found = _cached(spec, spec.revision or "main")
    if found is None:
        return False
    digest = ModelCache(settings.model_cache_dir).known_sha256(found, "huggingface")
    return digest is not None and (spec.sha256 is None or digest == spec.sha256)


def _cached(spec: ModelSpec, commit: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    assert spec.repo_id
    found = try_to_load_from_cache(spec.repo_id, spec.filename, revision=commit)
    return Path(found) if isinstance(found, str) else None


def _snapshot_commit(path: Path, filename: str) -> str:
    """The commit of a snapshot path ``.../snapshots/<commit>/<filename>``."""
    return path.parents[filename.count("/")].name


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
    _remove((path, path.resolve()), "refused file")


def _remove(paths: Iterable[Path], what: str) -> None:
    """Unlink each of ``paths``; one already gone is fine, one that cannot be removed is a WARNING naming ``what``."""
    for victim in paths:
        try:
            victim.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove %s %s: %s", what, victim, e.strerror or e)
