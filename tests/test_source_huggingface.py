"""The Hugging Face source: the unmodified huggingface_hub client against the loopback Hub stand-in, in-process."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import socket
from pathlib import Path

import pytest
from huggingface_hub import constants

from core.errors import StartupError
from core.settings import TorchSettings
from tests.fixtures.hub import IRIS, TOKEN
from tests.hubserver import Hub, Repo
from workflows import sources

IRIS_SHA = hashlib.sha256(IRIS).hexdigest()


@pytest.fixture
def hf(hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Path:
    """This test's own Hugging Face cache; the Hub is the stand-in. (huggingface_hub reads HF_ENDPOINT and its cache
    location once, at import, so the module constants are set too.)"""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    caplog.set_level(logging.DEBUG)
    return cache


def settings_for(tmp_path: Path, token: str | None = None) -> TorchSettings:
    return TorchSettings(hf_token=token, model_cache_dir=tmp_path / "model-cache")


def fetch(tmp_path: Path, repo: str, token: str | None = None, file: str = "model.torch", **kwargs) -> Path:
    settings = settings_for(tmp_path, token)
    spec = sources.ModelSpec("huggingface", file, repo_id=repo, **kwargs)
    return sources.fetch(spec, settings)


def refusal(tmp_path: Path, hf_cache: Path, repo: str, token: str | None = None, file="model.torch", **kwargs) -> str:
    before = blobs(hf_cache)
    with pytest.raises(StartupError) as caught:
        fetch(tmp_path, repo, token, file, **kwargs)
    message = str(caught.value)
    assert message.startswith(f"model source=huggingface repo={repo} file={file}"), message
    assert "\n" not in message and TOKEN not in message
    assert blobs(hf_cache) <= before, "a refused file stayed in the Hugging Face cache"
    return message


def blobs(hf_cache: Path) -> set[Path]:
    return {p for p in hf_cache.rglob("*") if p.is_file() and "blobs" in p.parts}


def test_public_repo(hf: Path, hub: Hub, tmp_path: Path):
    before = hub.downloads("model.torch")
    path = fetch(tmp_path, "testorg/iris")
    assert path.read_bytes() == IRIS
    assert hf in path.parents  # the library's own cache
    assert path.resolve().name == IRIS_SHA  # stored under the sha256 the Hub stated, which was checked
    assert hub.downloads("model.torch") == before + 1


def test_second_fetch_is_a_cache_hit(hf: Path, hub: Hub, tmp_path: Path):
    first = fetch(tmp_path, "testorg/iris")
    before, requests = hub.downloads("model.torch"), len(hub.log)
    assert fetch(tmp_path, "testorg/iris") == first
    assert hub.downloads("model.torch") == before
    assert [r.method for r in hub.log[requests:]] == ["HEAD"]  # only: has the revision moved?


def test_revision_tag_and_missing_revision(hf: Path, tmp_path: Path):
    assert fetch(tmp_path, "testorg/iris", revision="v1").read_bytes() == IRIS
    message = refusal(tmp_path, hf, "testorg/iris", revision="no-such-branch")
    assert message.endswith("revision no-such-branch: revision not found in the repository")


def test_private_repo_with_token(hf: Path, hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = fetch(tmp_path, "testorg/private-iris", token=TOKEN)
    assert path.read_bytes() == IRIS
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(settings_for(tmp_path, TOKEN))
    cdn = [r for r in hub.log if r.method == "GET" and r.path.startswith("/blobs/")]
    assert cdn and not any(r.authorized for r in cdn)  # like the Hub's CDN: the token stays with the Hub


def test_private_repo_without_token(hf: Path, tmp_path: Path):
    message = refusal(tmp_path, hf, "testorg/private-iris")
    assert "repository not found, or private and not visible to this token" in message
    assert "no token is set (HF_TOKEN / HUGGING_FACE_HUB_TOKEN)" in message


def test_wrong_token(hf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    wrong = "hf_wrong_" + TOKEN[-8:]
    message = refusal(tmp_path, hf, "testorg/private-iris", token=wrong)
    assert "the Hub refused the token: invalid credentials" in message
    assert wrong not in message and wrong not in caplog.text


def test_gated_repo(hf: Path, tmp_path: Path):
    message = refusal(tmp_path, hf, "testorg/gated-iris", token=TOKEN)
    assert "gated repository: access has not been granted to this token" in message


def test_missing_file_and_missing_repo(hf: Path, tmp_path: Path):
    assert refusal(tmp_path, hf, "testorg/iris", file="nope.torch").endswith("file not found in the repository")
    assert "repository not found" in refusal(tmp_path, hf, "testorg/no-such-repo")


def test_pin(hf: Path, tmp_path: Path):
    assert fetch(tmp_path, "testorg/iris", sha256=IRIS_SHA).read_bytes() == IRIS
    wrong = "ab" * 32
    message = refusal(tmp_path, hf, "testorg/iris", sha256=wrong)
    assert message.endswith(f"sha256 mismatch: the file hashes to {IRIS_SHA}, the pin says {wrong}")
    assert blobs(hf) == set()  # the refused file was removed from the Hugging Face cache


def test_download_not_matching_the_stated_sha256_is_refused(hf: Path, tmp_path: Path):
    message = refusal(tmp_path, hf, "testorg/tampered")
    assert blobs(hf) == set()
    assert "sha256 mismatch: the download hashes to" in message and f"the Hub states {IRIS_SHA}" in message


def test_offline(hf: Path, hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = fetch(tmp_path, "testorg/iris")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    requests = len(hub.log)
    assert fetch(tmp_path, "testorg/iris") == path
    assert len(hub.log) == requests  # nothing asked of the Hub
    message = refusal(tmp_path, hf, "testorg/private-iris", token=TOKEN)
    assert message.endswith("HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache")


def test_a_cached_file_the_hub_now_refuses_is_refused(hf: Path, hub: Hub, tmp_path: Path):
    """Explorer F-b: hf_hub_download serves its cached copy whatever the Hub's error, so a repository deleted or
    made private, or a token revoked, kept being served from a warm cache."""
    fetch(tmp_path, "testorg/private-iris", token=TOKEN)
    wrong = "hf_wrong_" + TOKEN[-8:]
    assert "the Hub refused the token: invalid credentials" in refusal(tmp_path, hf, "testorg/private-iris", wrong)
    assert "repository not found, or private" in refusal(tmp_path, hf, "testorg/private-iris")
    hub.repos["testorg/withdrawn"] = hub.repos["testorg/iris"]
    try:
        fetch(tmp_path, "testorg/withdrawn")
        hub.repos["testorg/withdrawn"] = Repo(hub.repos["testorg/iris"].git_dir, "gated")
        assert "gated repository" in refusal(tmp_path, hf, "testorg/withdrawn", token=TOKEN)
        del hub.repos["testorg/withdrawn"]
        assert "repository not found" in refusal(tmp_path, hf, "testorg/withdrawn")
    finally:
        hub.repos.pop("testorg/withdrawn", None)


def test_an_unreachable_hub_serves_the_cache_with_a_warning(
    hf: Path, hub: Hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    path = fetch(tmp_path, "testorg/private-iris", token=TOKEN)
    commit = path.parent.name
    with socket.socket() as closed:  # a port nothing listens on: connection refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    caplog.clear()
    assert fetch(tmp_path, "testorg/private-iris", token=TOKEN) == path
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING and "cannot be reached" in r.getMessage()]
    assert f"serving the cached revision {commit} of testorg/private-iris" in warning.getMessage()
    assert TOKEN not in caplog.text
    message = refusal(tmp_path, hf, "testorg/gated-iris", token=TOKEN)
    assert "cannot be reached" in message and "the file is not in the Hugging Face cache" in message


def test_a_file_over_max_bytes_is_refused_before_its_download(hf: Path, hub: Hub, tmp_path: Path):
    """The Hub's HEAD states the size (X-Linked-Size): a per-request bound refuses the file without a GET."""
    before = hub.downloads("model.torch")
    spec = sources.ModelSpec("huggingface", "model.torch", repo_id="testorg/private-iris")
    with pytest.raises(sources.TooLarge) as caught:
        sources.fetch(spec, settings_for(tmp_path, TOKEN), max_bytes=len(IRIS) - 1)
    assert caught.value.size_bytes == len(IRIS)
    assert (
        str(caught.value) == f"the file is {len(IRIS)} bytes, more than MAX_LOADED_MODEL_BYTES ({len(IRIS) - 1}) allows"
    )
    assert hub.downloads("model.torch") == before
    assert not [p for p in blobs(hf) if "private" in str(p)]


def test_a_stream_longer_than_the_hub_stated_is_stopped_and_removed(hf: Path, hub: Hub, tmp_path: Path):
    """A Hub that states 100 bytes and sends more: the download stops at the stated size and leaves no partial."""
    spec = sources.ModelSpec("huggingface", "model.torch", repo_id="testorg/liar")
    with pytest.raises(StartupError, match="longer than the 100 bytes the Hub stated"):
        sources.fetch(spec, settings_for(tmp_path), max_bytes=len(IRIS) * 10)
    left = [p for p in blobs(hf) if "liar" in str(p)]  # neither the blob nor its .incomplete partial
    assert left == [], left


def test_names_the_hub_rejects_are_one_line_refusals(hf: Path, hub: Hub, tmp_path: Path):
    """A repo id huggingface_hub will not ask for is refused before any request, with the library's rule on one line
    (it was a traceback of HFValidationError after a HEAD; explorer S8)."""
    before = len(hub.log)
    for repo in ("testorg/a--b", "testorg/a..b", "testorg/a-", "testorg/a."):
        message = refusal(tmp_path, hf, repo)
        assert "invalid Hugging Face repo id: " in message and f"'{repo}'" in message, message
    assert len(hub.log) == before


def test_a_download_reports_its_bytes_and_is_then_known_cached(hf: Path, tmp_path: Path):
    """What the runner's registry reads (runner/model_registry.py): a download's bytes so far, and, without asking
    the Hub, whether a file is already verified in the cache (then it skips the download threads)."""
    spec = sources.ModelSpec("huggingface", "model.torch", repo_id="testorg/iris")
    settings = settings_for(tmp_path)
    assert not sources.is_cached(spec, settings)
    seen: list[tuple[int, int | None]] = []
    path = sources.fetch(spec, settings, len(IRIS) * 10, lambda got, total: seen.append((got, total)))
    assert seen[0] == (0, len(IRIS)) and seen[-1] == (len(IRIS), len(IRIS)), seen
    assert sources.is_cached(spec, settings)
    assert not sources.is_cached(sources.ModelSpec("huggingface", "model.torch", repo_id="testorg/liar"), settings)
    assert not sources.is_cached(dataclasses.replace(spec, sha256="0" * 64), settings)  # another pin
    os.utime(path.resolve(), ns=(1, 1))  # changed since it was verified: hashed again before it is believed
    assert not sources.is_cached(spec, settings)
