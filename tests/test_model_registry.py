"""runner/model_registry.py in-process, with fake loaders (plain functions standing for a download and a load: the
real ones are exercised over HTTP in tests/test_many_models_http.py): LRU by count and by bytes, single-flight,
a failed load answered to every waiter and not cached, the default never evicted."""

from __future__ import annotations

import asyncio
import threading

import pytest

from core.errors import ServiceError
from runner.model_registry import MAX_DOWNLOADS, Loaded, ModelRegistry, ModelUnavailable

DEFAULT = object()


class FakeLoader:
    """The registry's Loader: ``fetch`` (the download) waits for ``gate`` unless the id is in ``cached``, reports
    ``received`` bytes of ``total`` first, and fails as ``fail`` says; ``load`` answers at once."""

    def __init__(
        self,
        sizes: dict[str, int] | None = None,
        fail: dict[str, ServiceError | Exception] | None = None,
        cached: frozenset[str] = frozenset(),
    ):
        self.sizes = sizes or {}
        self.fail = fail or {}
        self.cached = cached
        self.calls: list[str] = []
        self.threads: dict[str, str] = {}  # model id -> the name of the thread that fetched it
        self.gate = threading.Event()
        self.gate.set()
        self.lock = threading.Lock()

    def is_cached(self, model_id: str) -> bool:
        return model_id in self.cached

    def fetch(self, model_id: str, on_bytes) -> str:
        with self.lock:
            self.calls.append(model_id)
            self.threads[model_id] = threading.current_thread().name
        if model_id not in self.cached:
            assert on_bytes is not None
            on_bytes(3, 7)
            assert self.gate.wait(10)
        if model_id in self.fail:
            raise self.fail[model_id]
        return f"file:{model_id}"

    def load(self, model_id: str, fetched: str) -> Loaded:
        assert fetched == f"file:{model_id}"
        return Loaded(f"workflow:{model_id}", self.sizes.get(model_id, 10))


def registry(loader: FakeLoader, max_models: int = 2, max_bytes: int = 100) -> tuple[ModelRegistry, list]:
    events: list[tuple[str, str]] = []
    reg = ModelRegistry(DEFAULT, loader, max_models, max_bytes, on_event=lambda e, m: events.append((e, m)))
    return reg, events


def test_lru_by_count_evicts_least_recently_used():
    async def scenario():
        loader = FakeLoader()
        reg, events = registry(loader, max_models=2)
        assert await reg.get("a") == "workflow:a"
        await reg.get("b")
        await reg.get("a")  # a is now the most recently used
        await reg.get("c")  # evicts b
        assert reg.loaded() == ["a", "c"]
        assert ("evictions", "b") in events and ("evictions", "a") not in events
        await reg.get("b")  # loaded again
        assert loader.calls == ["a", "b", "c", "b"]
        assert reg.describe()["counts"]["a"] == {"loads": 1, "hits": 1, "evictions": 1, "failures": 0}
        assert reg.default is DEFAULT

    asyncio.run(scenario())


def test_lru_by_bytes_and_a_model_bigger_than_the_bound_is_refused():
    async def scenario():
        loader = FakeLoader(sizes={"a": 60, "b": 50, "huge": 101})
        reg, _ = registry(loader, max_models=10, max_bytes=100)
        await reg.get("a")
        await reg.get("b")  # 60 + 50 > 100: a goes
        assert reg.loaded() == ["b"]
        with pytest.raises(ModelUnavailable) as refused:
            await reg.get("huge")
        assert refused.value.status == 413 and "MAX_LOADED_MODEL_BYTES" in str(refused.value)
        assert reg.loaded() == ["b"]

    asyncio.run(scenario())


def test_concurrent_first_requests_share_one_load():
    async def scenario():
        loader = FakeLoader()
        loader.gate.clear()
        reg, events = registry(loader)
        waiters = [asyncio.ensure_future(reg.get("a")) for _ in range(10)]
        await asyncio.sleep(0.05)
        loader.gate.set()
        assert await asyncio.gather(*waiters) == ["workflow:a"] * 10
        assert loader.calls == ["a"]
        assert events.count(("loads", "a")) == 1 and events.count(("hits", "a")) == 9

    asyncio.run(scenario())


def test_failed_load_answers_every_waiter_and_is_not_cached():
    async def scenario():
        gone = ModelUnavailable(502, "model gone: the source cannot be reached")
        loader = FakeLoader(fail={"gone": gone, "bug": KeyError("x")})
        loader.gate.clear()
        reg, _ = registry(loader)
        waiters = [asyncio.ensure_future(reg.get("gone")) for _ in range(5)]
        await asyncio.sleep(0.05)
        loader.gate.set()
        results = await asyncio.gather(*waiters, return_exceptions=True)
        assert all(isinstance(r, ModelUnavailable) and r.status == 502 for r in results)
        assert reg.loaded() == []
        with pytest.raises(ServiceError):
            await reg.get("gone")  # tried again (a source that cannot be reached may be back), not remembered as loaded
        assert loader.calls == ["gone", "gone"]
        with pytest.raises(ModelUnavailable) as unexpected:
            await reg.get("bug")
        assert unexpected.value.status == 502  # never a 500

    asyncio.run(scenario())


def test_ids_clients_invent_neither_grow_the_counts_nor_ask_the_source_again():
    """Explorer F-c: every distinct id a client named kept its own counts (and /metrics label) for ever, and each
    repeat of a missing id asked the source again."""

    async def scenario():
        missing = {f"huggingface/org/r{i}:m.pt": ModelUnavailable(404, f"model r{i}: not found") for i in range(300)}
        broken = ModelUnavailable(422, "model broken: not a model", found=True)
        loader = FakeLoader(fail={**missing, "huggingface/org/broken:m.pt": broken})
        reg, events = registry(loader)
        for model_id in [*missing, *list(missing)[-100:]]:  # the latest 100 again: within the bounded memory
            with pytest.raises(ModelUnavailable) as refused:
                await reg.get(model_id)
            assert refused.value.status == 404 and "not found" in str(refused.value)
        assert len(loader.calls) == 300  # the repeats were answered without asking the source
        assert await reg.get("a") == "workflow:a"
        with pytest.raises(ModelUnavailable):
            await reg.get("huggingface/org/broken:m.pt")
        report = reg.describe()
        assert set(report["counts"]) == {"other", "a", "huggingface/org/broken:m.pt"}  # found ids only, + "other"
        assert report["counts"]["other"]["failures"] == 300  # loads that failed; the repeats loaded nothing
        assert {label for _, label in events} == {"other", "a", "huggingface/org/broken:m.pt"}
        assert len(report["failed"]) <= 200 and report["failed"]["huggingface/org/broken:m.pt"]["status"] == 422
        last = "huggingface/org/r299:m.pt"
        assert reg.failure(last) == (404, "model r299: not found")  # /service-resources can still say "not found"

    asyncio.run(scenario())


def test_a_waiter_that_gives_up_does_not_cancel_the_load():
    async def scenario():
        loader = FakeLoader()
        loader.gate.clear()
        reg, _ = registry(loader)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reg.get("a"), 0.05)
        loader.gate.set()
        assert await reg.get("a") == "workflow:a"
        assert loader.calls == ["a"]

    asyncio.run(scenario())


def test_from_settings_only_with_an_allow_list(tmp_path):
    from core.settings import ServiceSettings

    assert ModelRegistry.from_settings(DEFAULT, ServiceSettings.from_env({})) is None
    settings = ServiceSettings.from_env({"ALLOWED_MODELS": "huggingface/Org/*", "MAX_LOADED_MODELS": "3"})
    reg = ModelRegistry.from_settings(DEFAULT, settings)
    assert reg is not None and reg.default is DEFAULT and reg.max_models == 3


def test_report_adds_the_cached_listing_read_off_the_loop():
    loop_threads: list[bool] = []

    def list_cached() -> list[dict]:
        loop_threads.append(threading.current_thread() is threading.main_thread())
        return [{"model_id": "huggingface/Org/m:m.pt", "bytes": 3, "sha256": None}]

    def broken() -> list[dict]:
        raise OSError("unreadable cache")

    async def scenario():
        reg = ModelRegistry(DEFAULT, FakeLoader(), 2, 100, list_cached=list_cached)
        await reg.get("a")
        report = await reg.report()
        assert report["cached"] == [{"model_id": "huggingface/Org/m:m.pt", "bytes": 3, "sha256": None}]
        assert report["loaded"] == [{"model_id": "a", "bytes": 10}]
        assert (await ModelRegistry(DEFAULT, FakeLoader(), 2, 100, list_cached=broken).report())["cached"] == []
        assert "cached" not in await ModelRegistry(DEFAULT, FakeLoader(), 2, 100).report()

    asyncio.run(scenario())
    assert loop_threads == [False]


def test_slow_downloads_do_not_hold_up_a_cached_model_and_report_their_bytes():
    """Finding F5: two loader threads each downloaded then loaded, so two slow downloads held up every first load,
    even of a model already on disk, and nothing said how far a download had got."""

    async def scenario():
        loader = FakeLoader(cached=frozenset({"cached"}))
        loader.gate.clear()  # the downloads hang until the gate opens
        reg, _ = registry(loader, max_models=5)
        slow = [asyncio.ensure_future(reg.get(m)) for m in ("slow-1", "slow-2", "slow-3")]
        slow.append(asyncio.ensure_future(reg.get("slow-1")))  # the same model again: one download
        for _ in range(100):
            await asyncio.sleep(0.02)
            if len(loader.calls) == 2:
                break
        assert await asyncio.wait_for(reg.get("cached"), 5) == "workflow:cached"
        assert loader.threads["cached"].startswith("model-loader")
        downloading = {d["model_id"]: d for d in reg.describe()["downloading"]}
        assert list(downloading) == ["slow-1", "slow-2", "slow-3"]
        assert downloading["slow-1"] == {
            "model_id": "slow-1",
            "state": "downloading",
            "downloaded_bytes": 3,
            "total_bytes": 7,
            "seconds": downloading["slow-1"]["seconds"],
        }
        assert downloading["slow-3"]["state"] == "queued"  # DOWNLOAD_THREADS (2) downloads at once
        loader.gate.set()
        assert await asyncio.gather(*slow) == [
            "workflow:slow-1",
            "workflow:slow-2",
            "workflow:slow-3",
            "workflow:slow-1",
        ]
        assert sorted(loader.calls) == ["cached", "slow-1", "slow-2", "slow-3"]
        assert all(loader.threads[m].startswith("model-download") for m in ("slow-1", "slow-2", "slow-3"))
        assert reg.describe()["downloading"] == []

    asyncio.run(scenario())


def test_downloads_in_flight_are_bounded():
    async def scenario():
        loader = FakeLoader()
        loader.gate.clear()
        reg, _ = registry(loader, max_models=100)
        waiting = [asyncio.ensure_future(reg.get(f"m{i}")) for i in range(MAX_DOWNLOADS)]
        await asyncio.sleep(0.1)
        with pytest.raises(ModelUnavailable) as refused:
            await reg.get("one-more")
        assert refused.value.status == 503 and "retry later" in str(refused.value)
        loader.gate.set()
        assert len(await asyncio.gather(*waiting)) == MAX_DOWNLOADS
        assert await reg.get("one-more") == "workflow:one-more"  # not remembered as missing

    asyncio.run(scenario())
