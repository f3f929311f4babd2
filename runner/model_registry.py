"""The runner's models: the default workflow, and a bounded LRU of per-request models loaded on first use.

Everything here but the download and the load themselves runs on the runner's event loop (one loop, so no locks):
``get`` answers at once for a loaded model; the first request for a model starts one fetch-and-load and every
request for that model meanwhile waits on the same future (single-flight: one download, one load). The fetch runs
on one of DOWNLOAD_THREADS download threads, the load on one of LOADER_THREADS loader threads (never the model
thread, so other models keep serving): slow downloads never hold up a model whose file is on disk. A model whose
file the loader finds verified in the cache (``Loader.is_cached``) skips the download threads; its fetch (the
source is still asked whether the file moved on) runs on a loader thread. Downloads in progress, with their bytes
so far, are in ``describe()`` (what a request whose deadline passes meanwhile is told: public/app.py); at most
MAX_DOWNLOADS run or wait at once. A failed load answers every waiter with its reason and is not remembered as
loaded. Loaded models are bounded by count (MAX_LOADED_MODELS) and by the sum of their file sizes
(MAX_LOADED_MODEL_BYTES); the least recently used are evicted to make room. The default model is neither counted
nor ever evicted. A model loading
or loaded is held (workflows/sources/disk_bound.py): its cached files are not evicted to make room on disk.

Clients choose the ids, so nothing kept per id may grow with what they send: counts (and /metrics labels) have
their own entry only for ids whose file was found (loaded, or found but refused: too large, not a model, a pickle),
at most MAX_COUNTED_MODELS of them; every other id counts under OTHER. An id the source answered "not found" or
"refused" (404, 403 before any download) is remembered for MISSING_TTL_S, at most MAX_MISSING_MODELS ids, and
answered from that memory meanwhile: repeating it costs the source nothing.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from core.errors import ServiceError, first_line
from core.settings import ServiceSettings, TorchSettings
from workflows.sources import disk_bound

log = logging.getLogger("runner.model_registry")

EVENTS = ("loads", "hits", "evictions", "failures")
OTHER = "other"  # the counts' label of every id without its own (no model id has this form)
MAX_COUNTED_MODELS = 100
MAX_MISSING_MODELS = 128
MISSING_TTL_S = 60.0
# Downloads at once: each holds a connection and a partial file; more wait their turn ("queued").
DOWNLOAD_THREADS = 2
# Downloads running or queued: a queued one goes on after its callers gave up, so ids a client invents under a
# wildcard pattern must not queue without end; past this a new download is a 503 (retry later).
MAX_DOWNLOADS = 32
# Loads at once: each holds a model being built in memory and competes with the model thread for the CPUs.
LOADER_THREADS = 2


class ModelUnavailable(ServiceError):
    """A per-request model that cannot be served; ``status`` says why (404 not found, 413 too large, 403 refused
    format, 502 not verifiable / source unreachable, 503 too many downloads in flight: MAX_DOWNLOADS, 507 no room
    in the model cache); ``found``: whether the source had the file."""

    def __init__(self, status: int, description: str, found: bool = False) -> None:
        super().__init__(description)
        self.status = status
        self.found = found


@dataclass(frozen=True)
class Loaded:
    """What a loader returns: the set-up workflow and its model file's size."""

    workflow: Any
    size_bytes: int


class Loader(Protocol):
    """How the registry gets a model; each method raises ``ServiceError`` (any other exception becomes a 502)."""

    def is_cached(self, model_id: str) -> bool:
        """On a worker thread: whether ``fetch`` would most likely download nothing (a guess; never raises)."""
        ...

    def fetch(self, model_id: str, on_bytes: Callable[[int, int | None], None] | None) -> Any:
        """On a download thread (a loader thread when cached): the model's local file; ``on_bytes(received, total)``
        is told a download's progress, on this thread."""
        ...

    def load(self, model_id: str, fetched: Any) -> Loaded:
        """On a loader thread: the set-up workflow of what ``fetch`` returned."""
        ...


class Download:
    """One per-request model's download, queued or in progress. Its counts are written by the downloading thread
    (``on_bytes``) and read on the event loop: plain ints, each written whole."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.started: float | None = None  # time.monotonic() when a download thread took it
        self.received_bytes = 0
        self.total_bytes: int | None = None  # what the source stated, when it did

    def on_bytes(self, received_bytes: int, total_bytes: int | None) -> None:
        self.received_bytes = received_bytes
        if total_bytes is not None:
            self.total_bytes = total_bytes

    def describe(self) -> dict[str, Any]:
        """``{"model_id", "state": "queued"|"downloading", "downloaded_bytes", "total_bytes" (None: not stated),
        "seconds"}`` (seconds downloading so far, 0 while queued)."""
        return {
            "model_id": self.model_id,
            "state": "queued" if self.started is None else "downloading",
            "downloaded_bytes": self.received_bytes,
            "total_bytes": self.total_bytes,
            "seconds": 0.0 if self.started is None else round(time.monotonic() - self.started, 1),
        }


class ModelRegistry:
    """``loader`` fetches and loads a model (``Loader``); ``on_event(event, model_id)`` is told each load, hit,
    eviction and failure, on the loop."""

    def __init__(
        self,
        default: Any,
        loader: Loader,
        max_models: int,
        max_bytes: int,
        on_event: Callable[[str, str], None] | None = None,
        list_cached: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> None:
        self.default = default
        self._loader = loader
        self.max_models = max_models
        self.max_bytes = max_bytes
        self._on_event = on_event
        self._list_cached = list_cached
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Any]] = {}
        self._stats: dict[str, dict[str, int]] = {}
        self._failed: dict[str, tuple[int, str]] = {}  # ids with their own counts only (bounded with them)
        self._counted: set[str] = set()
        self._missing: OrderedDict[str, tuple[float, ModelUnavailable]] = OrderedDict()
        self._downloads: dict[str, Download] = {}
        self._downloaders = ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS, thread_name_prefix="model-download")
        self._loaders = ThreadPoolExecutor(max_workers=LOADER_THREADS, thread_name_prefix="model-loader")

    @classmethod
    def from_settings(cls, default: Any, settings: ServiceSettings) -> ModelRegistry | None:
        """The runner's registry (in its ``__init__``): per-request models loaded by workflows/per_request.py and
        counted on /metrics; None when ALLOWED_MODELS allows none, so the path stays exactly the single-model one."""
        if not settings.allowed_models:
            return None
        from runner import model_metrics  # creates the per-model counters: only when there can be such models
        from workflows.sources.cached import cached_models

        spec = getattr(default, "spec", None)  # the built-in workflows' model: its cached files are never evicted
        if spec is not None:
            disk_bound.keep(spec.source, spec.repo_id)

        return cls(
            default,
            model_metrics.PerRequestLoader(settings),
            settings.max_loaded_models,
            settings.max_loaded_model_bytes,
            on_event=model_metrics.count_model_event,
            list_cached=functools.partial(cached_models, TorchSettings.from_env().model_cache_dir),
        )

    async def get(self, model_id: str, requests: int = 1) -> Any:
        """On the event loop: the workflow of ``model_id`` (canonical id text), loading it first if needed.
        ``requests``: how many requests it serves now (counted as hits when it is already loaded or loading).
        Raises ServiceError with the load's status."""
        entry = self._loaded.get(model_id)
        if entry is not None:
            self._loaded.move_to_end(model_id)
            self._count(model_id, "hits", requests)
            return entry.workflow
        missing = self._missing.get(model_id)
        if missing is not None:
            if time.monotonic() < missing[0]:
                raise ModelUnavailable(missing[1].status, str(missing[1]))
            del self._missing[model_id]
        future = self._loading.get(model_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            disk_bound.hold(model_id)  # its cached files stay until the load fails or it leaves memory
            future.add_done_callback(_retrieve)  # nobody may be waiting any more: no "never retrieved" warning
            self._loading[model_id] = future
            asyncio.get_running_loop().create_task(self._load_into(model_id, future))
            requests -= 1  # the request that starts the load is a load, not a hit
        # shield: a waiter that gives up (timeout, disconnect) must not cancel the load the others wait on.
        workflow = await asyncio.shield(future)
        if requests > 0:  # counted once the id is known to exist, so it may have its own label
            self._count(model_id, "hits", requests)
        return workflow

    async def _load_into(self, model_id: str, future: asyncio.Future[Any]) -> None:
        loop = asyncio.get_running_loop()
        try:
            if await asyncio.to_thread(self._loader.is_cached, model_id):
                fetched = await loop.run_in_executor(self._loaders, self._loader.fetch, model_id, None)
            else:
                if len(self._downloads) >= MAX_DOWNLOADS:
                    raise ModelUnavailable(
                        503, f"model {model_id}: {MAX_DOWNLOADS} model downloads are running or queued; retry later"
                    )
                download = self._downloads[model_id] = Download(model_id)
                try:
                    fetched = await loop.run_in_executor(self._downloaders, self._fetch, download)
                finally:
                    del self._downloads[model_id]
            loaded = await loop.run_in_executor(self._loaders, self._loader.load, model_id, fetched)
            if loaded.size_bytes > self.max_bytes:
                raise ModelUnavailable(
                    413,
                    f"model {model_id} is {loaded.size_bytes} bytes, more than MAX_LOADED_MODEL_BYTES "
                    f"({self.max_bytes}) allows",
                    found=True,
                )
            self._admit(model_id, loaded)
        except Exception as e:
            error = (
                e if isinstance(e, ServiceError) else ModelUnavailable(502, f"cannot load {model_id}: {first_line(e)}")
            )
            if not isinstance(e, ServiceError):
                log.exception("loading %s failed", model_id)
            disk_bound.release(model_id)
            if getattr(error, "found", False):
                self._own_label(model_id)
            elif error.status in (403, 404):
                self._remember_missing(model_id, error)
            if model_id in self._counted:
                self._failed[model_id] = (error.status, first_line(error))
            self._count(model_id, "failures")
            future.set_exception(error)
        else:
            self._failed.pop(model_id, None)
            self._own_label(model_id)
            self._count(model_id, "loads")
            future.set_result(loaded.workflow)
        finally:
            self._loading.pop(model_id, None)

    def _fetch(self, download: Download) -> Any:
        """On a download thread."""
        download.started = time.monotonic()
        return self._loader.fetch(download.model_id, download.on_bytes)

    def _admit(self, model_id: str, loaded: Loaded) -> None:
        used = sum(entry.size_bytes for entry in self._loaded.values())
        while self._loaded and (len(self._loaded) >= self.max_models or used + loaded.size_bytes > self.max_bytes):
            victim, entry = self._loaded.popitem(last=False)
            used -= entry.size_bytes
            self._count(victim, "evictions")
            disk_bound.release(victim)
            log.info("evicted %s (%d bytes) to make room for %s", victim, entry.size_bytes, model_id)
        self._loaded[model_id] = loaded

    def _own_label(self, model_id: str) -> None:
        if len(self._counted) < MAX_COUNTED_MODELS:
            self._counted.add(model_id)

    def _remember_missing(self, model_id: str, error: Any) -> None:
        unavailable = error if isinstance(error, ModelUnavailable) else ModelUnavailable(error.status, str(error))
        self._missing[model_id] = (time.monotonic() + MISSING_TTL_S, unavailable)
        self._missing.move_to_end(model_id)
        while len(self._missing) > MAX_MISSING_MODELS:
            self._missing.popitem(last=False)

    def _count(self, model_id: str, event: str, n: int = 1) -> None:
        label = model_id if model_id in self._counted else OTHER
        stats = self._stats.setdefault(label, dict.fromkeys(EVENTS, 0))
        stats[event] += n
        if self._on_event is not None:
            for _ in range(n):
                self._on_event(event, label)

    def loaded(self) -> list[str]:
        """Loaded per-request models, least recently used first."""
        return list(self._loaded)

    def failure(self, model_id: str) -> tuple[int, str] | None:
        """The status and reason of the last failed load of ``model_id``, if its last load failed (and it is still
        remembered: an id with its own counts, or a missing one within MISSING_TTL_S)."""
        missing = self._missing.get(model_id)
        if missing is not None and time.monotonic() < missing[0]:
            return missing[1].status, first_line(missing[1])
        return self._failed.get(model_id)

    def describe(self) -> dict[str, Any]:
        """What /info reports: the bounds, the loaded models (least recently used first), the models loading and the
        downloads among them (``Download.describe``), per-model counts (OTHER for ids without their own) and the
        failures remembered (bounded: see the module docstring)."""
        now = time.monotonic()
        failed = {key: (e.status, first_line(e)) for key, (until, e) in self._missing.items() if now < until}
        failed.update(self._failed)
        return {
            "max_loaded_models": self.max_models,
            "max_loaded_model_bytes": self.max_bytes,
            "loaded": [
                {"model_id": key, "bytes": entry.size_bytes, **_batching(entry.workflow)}
                for key, entry in self._loaded.items()
            ],
            "loading": list(self._loading),
            "downloading": [download.describe() for download in self._downloads.values()],
            "counts": {key: dict(stats) for key, stats in self._stats.items()},
            "failed": {key: {"status": status, "reason": reason} for key, (status, reason) in failed.items()},
        }

    async def report(self) -> dict[str, Any]:
        """On the event loop: ``describe()`` plus ``cached``, the verified files in the model cache that a load
        would reuse without downloading (``list_cached``, bounded; read on a worker thread, as it reads the disk).
        A cache that cannot be read lists nothing rather than failing /info."""
        report = self.describe()
        if self._list_cached is not None:
            try:
                report["cached"] = await asyncio.to_thread(self._list_cached)
            except Exception:
                log.exception("listing the model cache failed")
                report["cached"] = []
        return report


def _batching(workflow: Any) -> dict[str, Any]:
    """A loaded model's batching state for /info (whether its first request's check has run, and what it found)."""
    info = getattr(workflow, "info", None)
    batching = info.get("batching") if isinstance(info, dict) else None
    return {"batching": batching} if batching else {}


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
