"""The model cache's listing for /service-resources (workflows/sources/cached.py): real cache entries written the way
the sources write them (ModelCache.commit for Arweave; the Hub cache's blob and snapshot link plus the hash record for
Hugging Face), read back as the model ids a request would name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workflows.sources.cache import ModelCache, sha256_of
from workflows.sources.cached import cached_models

OWNER = "A" * 43


def arweave_entry(cache: ModelCache, tx_id: str, repo: str, filename: str, content: bytes) -> Path:
    with cache.partial("arweave", tx_id, filename) as partial:
        partial.write_bytes(content)
        record = {"owner": OWNER, "sha256": "ab" * 32, "tags": {"Repo-Name": repo, "File-Name": filename}}
        return cache.commit("arweave", tx_id, partial, filename, record)


def hub_entry(cache: ModelCache, hf_home: Path, repo_id: str, filename: str, content: bytes) -> Path:
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    blob = repo_dir / "blobs" / "b1"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(content)
    link = repo_dir / "snapshots" / ("c" * 40) / filename
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    cache.file_sha256(link, "huggingface")  # what huggingface.fetch records after verifying
    return blob


def test_lists_verified_entries_as_model_ids(tmp_path):
    cache = ModelCache(tmp_path / "cache")
    arweave_entry(cache, "t" * 43, "housing", "housing.pt", b"housing")
    blob = hub_entry(cache, tmp_path / "hf", "Org/iris", "iris.onnx", b"onnx bytes")
    listed = cached_models(cache.root)
    assert listed == [
        {"model_id": f"arweave/{OWNER}/housing:housing.pt", "bytes": 7, "sha256": "ab" * 32},
        {"model_id": "huggingface/Org/iris:iris.onnx", "bytes": 10, "sha256": sha256_of(blob)},
    ]


def test_skips_changed_and_partial_files(tmp_path):
    cache = ModelCache(tmp_path / "cache")
    path = arweave_entry(cache, "t" * 43, "housing", "housing.pt", b"housing")
    path.write_bytes(b"tampered!")  # no longer what was verified: a load would hash it again
    with cache.partial("arweave", "u" * 43, "other.pt") as partial:
        partial.write_bytes(b"half")  # an interrupted download, never committed
        assert cached_models(cache.root) == []
    assert cached_models(tmp_path / "missing") == []


def test_listing_is_bounded(tmp_path):
    cache = ModelCache(tmp_path / "cache")
    for i in range(5):
        arweave_entry(cache, f"{i}" * 43, f"repo{i}", "m.pt", b"x")
    assert len(cached_models(cache.root, limit=3)) == 3
    assert len(cached_models(cache.root)) == 5


def test_tags_that_make_no_round_trip_id_are_not_listed(tmp_path, caplog: pytest.LogCaptureFixture):
    """A Repo-Name holding "/" (signed tags are free text) made the id ``arweave/<owner>/team/housing:m.pt``, which a
    request reads as repo "team", version "housing": a 404 for a model the listing offered (S4)."""
    cache = ModelCache(tmp_path / "cache")
    arweave_entry(cache, "t" * 43, "team/housing", "m.pt", b"x")
    arweave_entry(cache, "u" * 43, "housing", "m.pt", b"y")
    caplog.set_level("INFO", logger="workflows.sources.cached")
    assert [m["model_id"] for m in cached_models(cache.root)] == [f"arweave/{OWNER}/housing:m.pt"]
    assert f"arweave/{OWNER}/team/housing:m.pt" in caplog.text and "names another model" in caplog.text


def test_disk_bound_evicts_the_least_recently_used_never_held_or_kept(tmp_path, monkeypatch, capsys):
    """S2b: MAX_CACHED_MODEL_BYTES (workflows/sources/disk_bound.py) on real cache entries: the oldest file not held
    (loading or loaded) and not the start-up model's goes first; 507 when the held ones alone leave no room (nothing
    evicted), 413 for a file larger than the bound itself."""
    from core.errors import FetchError
    from workflows.sources import disk_bound

    monkeypatch.setattr(disk_bound, "_kept", set())
    monkeypatch.setattr(disk_bound, "_held", disk_bound.Counter())
    cache = ModelCache(tmp_path / "cache")
    default = hub_entry(cache, tmp_path / "hf", "Org/default", "d.pt", b"d" * 100)  # oldest, and never counted
    paths = {}
    for age, (tx, repo) in enumerate((("a" * 43, "old"), ("b" * 43, "held"), ("c" * 43, "new"))):
        paths[repo] = arweave_entry(cache, tx, repo, "m.pt", bytes(100))
        os.utime(paths[repo].parent / "verified.json", (1_000_000 + age, 1_000_000 + age))  # its last use
    disk_bound.keep("huggingface", "Org/default")
    disk_bound.hold(f"arweave/{OWNER}/held:m.pt")
    with disk_bound.reserving(cache.root, 300, "huggingface/Org/next:n.pt") as reserve:
        reserve(100)  # 300 cached + 100 > 300: the oldest unheld one goes
    assert not paths["old"].exists() and paths["held"].exists() and paths["new"].exists() and default.exists()
    assert [m["model_id"] for m in cached_models(cache.root)] == [
        f"arweave/{OWNER}/held:m.pt",
        f"arweave/{OWNER}/new:m.pt",
        "huggingface/Org/default:d.pt",
    ]
    err = capsys.readouterr().err
    assert err.count("stage=evict") == 1 and f"model_id=arweave/{OWNER}/old:m.pt bytes=100 " in err
    with disk_bound.reserving(cache.root, 300, "huggingface/Org/next:n.pt") as reserve:
        with pytest.raises(FetchError) as full:
            reserve(250)  # the held 100 + 250 > 300, whatever is evicted
        with pytest.raises(FetchError) as too_large:
            reserve(301)
    assert full.value.status == 507 and "100 bytes of MAX_CACHED_MODEL_BYTES (300)" in str(full.value)
    assert paths["new"].exists()  # nothing evicted for a download that cannot fit anyway
    assert too_large.value.status == 413 and "301 bytes, more than MAX_CACHED_MODEL_BYTES (300)" in str(too_large.value)
    disk_bound.release(f"arweave/{OWNER}/held:m.pt")
    with disk_bound.reserving(cache.root, 300, "huggingface/Org/next:n.pt") as reserve:
        reserve(250)  # released: now it may go, oldest first
    assert not paths["held"].exists() and not paths["new"].exists() and default.exists()
