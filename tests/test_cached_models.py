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
