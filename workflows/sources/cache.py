"""The model cache: verified files only.

Layout under ``TorchSettings.model_cache_dir`` (``MODEL_CACHE_DIR``)::

    .locks/<name>.lock             one lock per entry: two processes starting at once take turns
    <source>/<key>/<file>          a file that passed every check, renamed in only after it did
    <source>/<key>/verified.json   what was verified (sha256, size, who signed it, ...)
    <source>/refs/<digest>.json    which entry last satisfied a model spec (used when the network is down)

A download is written to ``<source>/<key>/.<file>.partial-*`` and removed on any failure, so a refused or
interrupted download never looks like a cached file. A cached file is trusted only while its size and
modification time match the record written with it; otherwise it is hashed again (and dropped if it changed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from core.errors import StartupError, unwritable

log = logging.getLogger("workflows.sources.cache")

RECORD = "verified.json"
PARTIAL = ".partial-"
# A process holding a lock keeps it only while it downloads (every request has a timeout); the OS frees it
# if that process dies, so this only bounds waiting behind a live but very slow download.
LOCK_TIMEOUT_S = 6 * 3600
# What start-up says after a cache path it cannot write (read-only volume, a file where a directory must be).
MODEL_CACHE_FIX = "set MODEL_CACHE_DIR to a writable directory"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_name(name: str) -> str:
    """A file name that stays inside its directory (Arweave tags and repo paths may carry slashes)."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1].strip()
    return base if base not in ("", ".", "..") else "model"


class ModelCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root).expanduser()

    def entry_dir(self, source: str, key: str) -> Path:
        return self.root / source / key

    @contextlib.contextmanager
    def locked(self, name: str, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
        locks = self.root / ".locks"
        try:
            locks.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StartupError(f"model cache {self.root} is not writable: {unwritable(e)}; {MODEL_CACHE_FIX}") from None
        lock = FileLock(str(locks / f"{name}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("another process is fetching %s; waiting for it", name)
            try:
                lock.acquire(timeout=timeout)
            except Timeout:
                raise StartupError(f"timed out after {timeout:.0f}s waiting for the model cache lock {name}") from None
        try:
            yield
        finally:
            lock.release()

    def lookup(self, source: str, key: str) -> tuple[Path, dict[str, Any]] | None:
        """The verified file of an entry and its record, or None. Call under the entry's lock."""
        directory = self.entry_dir(source, key)
        record = _read_json(directory / RECORD)
        if record is None or not isinstance(record.get("file"), str):
            return None
        path = directory / record["file"]
        try:
            stat = path.stat()
        except OSError:
            return None
        if stat.st_size != record.get("size"):
            self.drop(source, key, "its size changed")
            return None
        if stat.st_mtime_ns != record.get("mtime_ns"):
            # Touched since it was verified: believe its content only after hashing it again.
            if sha256_of(path) != record.get("sha256"):
                self.drop(source, key, "its content changed")
                return None
            record["mtime_ns"] = stat.st_mtime_ns
            _write_json(directory / RECORD, record)
        return path, record

    def is_verified(self, source: str, key: str) -> bool:
        """Whether an entry holds its verified file, unchanged since (size and mtime as recorded). Reads two small
        things and hashes nothing, changes nothing: a guess for where to fetch from (runner/model_registry.py),
        which ``lookup`` under the lock confirms."""
        record = _read_json(self.entry_dir(source, key) / RECORD)
        if record is None or not isinstance(record.get("file"), str):
            return False
        return unchanged(self.entry_dir(source, key) / record["file"], record)

    def drop(self, source: str, key: str, why: str) -> None:
        directory = self.entry_dir(source, key)
        log.warning("dropping cached model %s/%s: %s", source, key, why)
        for child in directory.glob("*"):
            with contextlib.suppress(OSError):
                child.unlink()
        with contextlib.suppress(OSError):
            directory.rmdir()

    def remove(self, source: str, key: str) -> bool:
        """Remove an entry to free its disk (workflows/sources/disk_bound.py), unless another process holds its lock
        (it is fetching or checking it): then False, and nothing is removed."""
        lock = FileLock(str(self.root / ".locks" / f"{source}-{key}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            return False
        try:
            directory = self.entry_dir(source, key)
            with contextlib.suppress(OSError):
                (directory / RECORD).unlink()  # first: a file without its record is never listed or trusted
            for child in directory.glob("*"):
                with contextlib.suppress(OSError):
                    child.unlink()
            with contextlib.suppress(OSError):
                directory.rmdir()
        finally:
            lock.release()
        return True

    def record_of(self, path: Path, source: str) -> Path:
        """The record of a model file ``source`` fetched: ``verified.json`` beside a file of this cache (Arweave),
        else the hash record of a file kept elsewhere (the Hugging Face cache), as ``file_sha256`` writes it."""
        if self.root in path.parents:
            return path.parent / RECORD
        return self._hash_record(source, path.resolve())

    def _hash_record(self, source: str, real: Path) -> Path:
        return self.root / source / "hashes" / f"{hashlib.sha256(str(real).encode()).hexdigest()[:32]}.json"

    @contextlib.contextmanager
    def partial(self, source: str, key: str, filename: str) -> Iterator[Path]:
        """A temporary path beside the entry's final place; removed on exit unless ``commit`` moved it in."""
        directory = self.entry_dir(source, key)
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob(f".*{PARTIAL}*"):  # left by a process that was killed mid-download
            with contextlib.suppress(OSError):
                stale.unlink()
        fd, name = tempfile.mkstemp(dir=directory, prefix=f".{safe_name(filename)}{PARTIAL}")
        os.close(fd)
        path = Path(name)
        try:
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def commit(self, source: str, key: str, partial: Path, filename: str, record: dict[str, Any]) -> Path:
        """Move a verified download into place; the record goes first, so a file in place always has one."""
        directory = self.entry_dir(source, key)
        final = directory / safe_name(filename)
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        stat = partial.stat()
        record = {**record, "file": final.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        record.setdefault("verified_at", int(time.time()))
        _write_json(directory / RECORD, record)
        os.replace(partial, final)
        return final

    def file_sha256(self, path: Path, source: str, fresh: bool = False) -> str:
        """sha256 of a file kept outside this cache (the Hugging Face cache), remembered by path, size and mtime
        so that a second start does not read a large model again just to hash it; ``fresh``: read it anyway (the
        record is then renewed). Size and mtime can be kept by whoever can write the file."""
        real = path.resolve()
        stat = real.stat()
        record_path = self._hash_record(source, real)
        identity = {"path": str(real), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        known = {} if fresh else _read_json(record_path) or {}
        if isinstance(known.get("sha256"), str) and all(known.get(k) == v for k, v in identity.items()):
            return known["sha256"]
        digest = sha256_of(real)
        with contextlib.suppress(OSError):  # a read-only cache only costs the next start a re-hash
            _write_json(record_path, {**identity, "sha256": digest})
        return digest

    def known_sha256(self, path: Path, source: str) -> str | None:
        """The sha256 ``file_sha256`` recorded for a file kept outside this cache, while the file is unchanged since
        (same size and mtime); None otherwise. Hashes nothing."""
        real = path.resolve()
        record = _read_json(self._hash_record(source, real)) or {}
        digest = record.get("sha256")
        if not isinstance(digest, str) or record.get("path") != str(real):
            return None
        return digest if unchanged(real, record) else None

    def set_ref(self, source: str, ref: str, key: str) -> None:
        _write_json(self._ref_path(source, ref), {"key": key, "at": int(time.time())})

    def get_ref(self, source: str, ref: str) -> str | None:
        data = _read_json(self._ref_path(source, ref))
        key = data.get("key") if data else None
        return key if isinstance(key, str) else None

    def _hash_record(self, source: str, real: Path) -> Path:
        return self.root / source / "hashes" / f"{hashlib.sha256(str(real).encode()).hexdigest()[:32]}.json"

    def _ref_path(self, source: str, ref: str) -> Path:
        return self.root / source / "refs" / f"{hashlib.sha256(ref.encode()).hexdigest()[:32]}.json"


def unchanged(path: Path, record: dict[str, Any]) -> bool:
    """Whether ``path`` still has the size and modification time ``record`` holds for it."""
    try:
        stat = path.stat()
    except OSError:
        return False
    return stat.st_size == record.get("size") and stat.st_mtime_ns == record.get("mtime_ns")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{PARTIAL}")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
