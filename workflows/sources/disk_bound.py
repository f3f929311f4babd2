"""MAX_CACHED_MODEL_BYTES: the bound on the disk that per-request models' files take, kept by evicting the least
recently used ones before a download that would pass it.

Counted: every verified file the model cache knows (workflows/sources/cached.py ``cache_entries``: the Arweave
entries of MODEL_CACHE_DIR and the Hugging Face files it recorded as verified; nothing else in the Hugging Face
cache is counted or touched), plus the bytes of downloads under way. Never evicted: the start-up model's files
(``keep``, not counted either), the files of a model held by the runner's registry (``hold``: from the first request
for it until its load failed or it left memory, so loading and loaded models), a download under way (a partial
file, not an entry yet), and an Arweave entry another process has locked. "Least recently used": the entry's record
was modified (``touch``) when a per-request load last fetched it.

Runs in the runner process: ``reserving`` and ``touch`` on its loader threads (workflows/per_request.py), ``hold``
and ``release`` on its event loop (runner/model_registry.py). One lock orders them; the state is the process's, as
the runner is the one process that loads per-request models.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from core.errors import FetchError
from core.model_ids import ModelId, ModelIdError, parse_model_id
from workflows import progress
from workflows.sources.cache import ModelCache
from workflows.sources.cached import cache_entries

log = logging.getLogger("workflows.sources.disk_bound")

Key = tuple[str, str]  # (source, repository): every file and version of a repository, so a held model is never missed

_lock = threading.Lock()
_held: Counter[Key] = Counter()
_kept: set[Key] = set()
_reserved: dict[int, int] = {}  # id of a ``reserving`` block -> bytes of its download under way


def keep(source: str, repo: str | None) -> None:
    """Never count nor evict the files of this repository (the start-up model's; ``repo``: the Hugging Face repo id
    or the Arweave Repo-Name)."""
    if repo:
        with _lock:
            _kept.add((source, repo))


def hold(model_id: str) -> None:
    """Keep the files of ``model_id`` (canonical id text) until as many ``release`` calls."""
    key = _key_of(model_id)
    with _lock:
        _held[key] += 1


def release(model_id: str) -> None:
    key = _key_of(model_id)
    with _lock:
        _held[key] -= 1
        if _held[key] <= 0:
            del _held[key]


@contextlib.contextmanager
def reserving(root: Path, max_cached_bytes: int, model_id: str) -> Iterator[Callable[[int], None]]:
    """The sources' ``reserve`` hook for one per-request fetch of ``model_id``: ``reserve(n)``, called just before a
    download of n bytes, evicts least recently used entries until n more fit ``max_cached_bytes``, and counts the n
    bytes until the block ends (the file is then an entry of the cache). Raises FetchError: 413 when n alone is more
    than the bound, 507 when the models held (loading or loaded) leave no room (nothing is evicted then)."""
    token = object()

    def reserve(size_bytes: int) -> None:
        with _lock:
            _make_room(ModelCache(root), size_bytes, max_cached_bytes, model_id)
            _reserved[id(token)] = size_bytes

    try:
        yield reserve
    finally:
        with _lock:
            _reserved.pop(id(token), None)


def touch(root: Path, path: Path, source: str) -> None:
    """Mark the cached file ``path`` (as ``sources.fetch`` returned it) used now: the last to be evicted."""
    with contextlib.suppress(OSError):  # a read-only cache only loses the order of use
        os.utime(ModelCache(root).record_of(path, source))


def _make_room(cache: ModelCache, size_bytes: int, max_cached_bytes: int, model_id: str) -> None:
    if size_bytes > max_cached_bytes:
        raise FetchError(
            f"the file is {size_bytes} bytes, more than MAX_CACHED_MODEL_BYTES ({max_cached_bytes}) allows", 413
        )
    files = _files(cache.root)
    used = sum(entry["bytes"] for entry in files) + sum(_reserved.values())
    if used + size_bytes <= max_cached_bytes:
        return
    evictable = sorted((entry for entry in files if not entry["held"]), key=lambda entry: entry["used_at"])
    kept = used - sum(entry["bytes"] for entry in evictable)
    if kept + size_bytes > max_cached_bytes:
        raise FetchError(
            f"the model cache has no room for its {size_bytes} bytes: {kept} bytes of MAX_CACHED_MODEL_BYTES "
            f"({max_cached_bytes}) are models loaded or being loaded; retry once one has left memory, or raise "
            "MAX_CACHED_MODEL_BYTES",
            507,
        )
    for entry in evictable:
        if used + size_bytes <= max_cached_bytes:
            break
        if _evict(cache, entry):
            used -= entry["bytes"]
            # A progress line (stderr): BentoML's logging drops other loggers' INFO records.
            progress.emit(
                "evict",
                model_id=",".join(entry["model_ids"]),
                bytes=entry["bytes"],
                reason="MAX_CACHED_MODEL_BYTES",
                max_cached_model_bytes=max_cached_bytes,
                for_model_id=model_id,
            )
    if used + size_bytes > max_cached_bytes:  # another process held an entry's lock: it stays
        raise FetchError(
            f"the model cache has no room for its {size_bytes} bytes within MAX_CACHED_MODEL_BYTES "
            f"({max_cached_bytes}): entries in use by another process; retry later",
            507,
        )


def _files(root: Path) -> list[dict[str, Any]]:
    """The cache's verified files except the start-up model's, one per record (a Hugging Face blob under several
    names is one file): ``bytes``, ``used_at``, ``held``, ``model_ids``, ``source``, ``files``, ``record``."""
    files: dict[Path, dict[str, Any]] = {}
    for entry in cache_entries(root):
        model: ModelId = entry["model_id"]
        key = _key(model)
        if key in _kept or not isinstance(entry["bytes"], int):
            continue
        found = files.get(entry["record"])
        if found is None:
            try:
                used_at = entry["record"].stat().st_mtime
            except OSError:
                continue
            found = files[entry["record"]] = {**entry, "used_at": used_at, "held": False, "model_ids": []}
        found["held"] = found["held"] or key in _held
        found["model_ids"].append(str(model))
    return list(files.values())


def _evict(cache: ModelCache, entry: dict[str, Any]) -> bool:
    if entry["model_id"].source == "arweave":
        return cache.remove("arweave", entry["record"].parent.name)
    # A Hugging Face file: its record first (so it is never listed without its blob), then its links and blob.
    for path in (entry["record"], *entry["files"]):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("could not remove cached model file %s: %s", path, e.strerror or e)
    return True


def _key_of(model_id: str) -> Key:
    try:
        return _key(parse_model_id(model_id))
    except ModelIdError:  # never an id of the cache's files (the registry's own tests name models "a", "b")
        return ("", model_id)


def _key(model: ModelId) -> Key:
    return (model.source, f"{model.owner}/{model.repo}" if model.source == "huggingface" else model.repo)
