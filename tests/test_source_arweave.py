"""The Arweave source against a real arlocal gateway (and a lying proxy in front of it), called in-process."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from core.errors import FetchError, StartupError
from core.settings import EMBEDDED_MODEL, TorchSettings
from tests.fixtures.arlocal import PUBLISH, REPO, Arlocal, LyingGateway, new_wallet, publish_tool
from workflows import sources
from workflows.sources import arweave
from workflows.sources.cache import ModelCache

IRIS = EMBEDDED_MODEL.read_bytes()
IRIS_SHA = hashlib.sha256(IRIS).hexdigest()
# 4 full chunks and a remainder under 32 KiB: the last two chunks are split evenly, as arweave-js splits them.
BIG = os.urandom(4 * 256 * 1024 + 10_000)
BIG_SHA = hashlib.sha256(BIG).hexdigest()


@dataclasses.dataclass
class Uploads:
    good: str  # allowed owner
    evil: str  # another wallet
    tx: dict[str, str]


@pytest.fixture(scope="module")
def uploads(arlocal: Arlocal, tmp_path_factory: pytest.TempPathFactory) -> Uploads:
    tmp = tmp_path_factory.mktemp("arweave-uploads")
    tool = publish_tool()
    wallets = {}
    for name in ("good", "evil"):
        wallets[name] = tmp / f"{name}.json"
        arlocal.mint(new_wallet(wallets[name]))
    good, evil = (tool.address_of(tool.load_wallet(wallets[n])[1]) for n in ("good", "evil"))
    (tmp / "iris.torch").write_bytes(IRIS)
    (tmp / "big.bin").write_bytes(BIG)
    (tmp / "v1.bin").write_bytes(b"version one " * 1000)
    (tmp / "v2.bin").write_bytes(b"version two " * 1000)
    tx = {}

    def upload(key: str, who: str, file: str, repo: str, name: str, version: str = "0.0.0", drop=(), rename=None):
        tags = tool.model_tags(tmp / file, repo, name, version)
        tags = [(rename.get(k, k) if rename else k, v) for k, v in tags if k not in drop]
        tx[key] = tool.publish(arlocal.url, wallets[who], tmp / file, tags, progress=False)

    upload("iris", "good", "iris.torch", "testorg/iris", "model.torch")
    upload("big", "good", "big.bin", "testorg/big", "model.bin")
    upload("evil", "evil", "iris.torch", "testorg/evil", "model.torch")
    upload("untagged", "good", "iris.torch", "testorg/untagged", "model.torch", drop=("File-SHA256",))
    upload("legacy", "good", "iris.torch", "testorg/legacy", "model.torch", rename={"Repo-Name": "Model-Id"})
    upload("v1", "good", "v1.bin", "testorg/versioned", "model.bin", version="1.0.0")
    arlocal.mine()
    # Newer uploads: another version by the allowed owner, and the evil wallet's copy of the allowed repo's name.
    upload("v2", "good", "v2.bin", "testorg/versioned", "model.bin", version="2.0.0")
    (tmp / "evil-iris.torch").write_bytes(b"not the model " * 100)
    upload("evil-iris", "evil", "evil-iris.torch", "testorg/iris", "model.torch")
    arlocal.mine()
    return Uploads(good, evil, tx)


@pytest.fixture
def settings(tmp_path: Path, gateway_proxy: LyingGateway, uploads: Uploads) -> TorchSettings:
    gateway_proxy.mode, gateway_proxy.target = None, "/chunk/"
    return TorchSettings(
        use_arweave=True,
        allowed_arweave_owners=(uploads.good,),
        arweave_gateway=gateway_proxy.url,
        model_cache_dir=tmp_path / "cache",
    )


def fetch(settings: TorchSettings, repo: str, file: str = "model.torch", **kwargs) -> Path:
    spec = sources.spec_from_kwargs({"model_name": repo, **kwargs}, dataclasses.replace(settings, model_file_name=file))
    return sources.fetch(spec, settings)


def refusal(settings: TorchSettings, repo: str, file: str = "model.torch", **kwargs) -> str:
    with pytest.raises(StartupError) as caught:
        fetch(settings, repo, file, **kwargs)
    message = str(caught.value)
    assert message.startswith(f"model source=arweave repo={repo} file={file}"), message
    assert "\n" not in message
    assert_nothing_unverified(settings.model_cache_dir)
    return message


def assert_nothing_unverified(cache: Path) -> None:
    """No model bytes in the cache: only lock files (and no entry directory of a refused transaction)."""
    left = [p for p in cache.rglob("*") if p.is_file() and p.parent.name != ".locks"]
    assert left == [], left


def test_downloads_verifies_and_caches_by_transaction(settings: TorchSettings, uploads: Uploads):
    path = fetch(settings, "testorg/iris")
    assert path.read_bytes() == IRIS
    assert path == settings.model_cache_dir / "arweave" / uploads.tx["iris"] / "model.torch"
    record = json.loads((path.parent / "verified.json").read_text())
    assert record["owner"] == uploads.good and record["sha256"] == IRIS_SHA
    # The evil wallet's newer upload under the same names is not even a candidate.
    assert record["tags"]["Repo-Name"] == "testorg/iris"


def test_multi_chunk_file_is_walked_chunk_by_chunk(settings: TorchSettings, gateway_proxy: LyingGateway):
    before = gateway_proxy.count("/chunk/")
    path = fetch(settings, "testorg/big", file="model.bin")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == BIG_SHA
    assert gateway_proxy.count("/chunk/") - before == 5


def test_second_fetch_downloads_nothing(settings: TorchSettings, gateway_proxy: LyingGateway):
    first = fetch(settings, "testorg/big", file="model.bin")
    before = {p: gateway_proxy.count(p) for p in ("/chunk/", "/tx/", "/graphql")}
    assert fetch(settings, "testorg/big", file="model.bin") == first
    assert gateway_proxy.count("/chunk/") == before["/chunk/"]
    assert gateway_proxy.count("/tx/") == before["/tx/"]
    assert gateway_proxy.count("/graphql") == before["/graphql"] + 1  # only to learn the newest upload


def test_transient_gateway_errors_are_retried(
    settings: TorchSettings, gateway_proxy: LyingGateway, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(arweave, "BACKOFF_S", 0.01)
    gateway_proxy.mode, gateway_proxy.failures = "flaky", 2
    before = gateway_proxy.count("/chunk/")
    path = fetch(settings, "testorg/big", file="model.bin")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == BIG_SHA
    assert gateway_proxy.count("/chunk/") - before == 5 + 2


def test_newest_is_highest_block_then_latest_unix_time():
    mined_old = arweave.Candidate("a" * 43, "owner", height=5, unix_time=900)
    mined_new = arweave.Candidate("b" * 43, "owner", height=7, unix_time=100)
    same_block_later = arweave.Candidate("c" * 43, "owner", height=7, unix_time=200)
    pending = arweave.Candidate("d" * 43, "owner", height=None, unix_time=999)
    assert max([mined_old, mined_new, same_block_later, pending], key=arweave.Candidate.rank) == same_block_later
    assert max([pending], key=arweave.Candidate.rank) == pending


def test_newest_version_and_pinned_version(settings: TorchSettings):
    assert fetch(settings, "testorg/versioned", file="model.bin").read_bytes() == b"version two " * 1000
    old = fetch(settings, "testorg/versioned", file="model.bin", revision="1.0.0")
    assert old.read_bytes() == b"version one " * 1000


def test_older_model_id_tag_is_found(settings: TorchSettings):
    assert fetch(settings, "testorg/legacy").read_bytes() == IRIS


def test_owner_not_allow_listed_finds_nothing(settings: TorchSettings):
    message = refusal(settings, "testorg/evil")
    assert "no transaction found" in message and "ALLOWED_ARWEAVE_OWNERS" in message
    with pytest.raises(FetchError) as caught:  # a per-request client's 404, from the gateway's empty answer
        fetch(settings, "testorg/evil")
    assert caught.value.status == 404


def test_gateway_claiming_an_allowed_owner_is_refused(
    settings: TorchSettings, gateway_proxy: LyingGateway, uploads: Uploads
):
    gateway_proxy.mode, gateway_proxy.impostor = "claim-owner", uploads.evil
    message = refusal(settings, "testorg/evil")
    assert f"is signed by {uploads.evil}, which is not in ALLOWED_ARWEAVE_OWNERS" in message


def test_gateway_swapping_bytes_is_refused(settings: TorchSettings, gateway_proxy: LyingGateway):
    gateway_proxy.mode = "swap-bytes"
    message = refusal(settings, "testorg/big", file="model.bin")
    assert "sha256 mismatch" in message and f"its signed File-SHA256 tag says {BIG_SHA}" in message


def test_gateway_dropping_the_sha256_tag_is_refused(settings: TorchSettings, gateway_proxy: LyingGateway):
    gateway_proxy.mode = "drop-sha-tag"
    message = refusal(settings, "testorg/iris")
    assert "the signature does not match" in message


def test_gateway_serving_another_transaction_is_refused(
    settings: TorchSettings, gateway_proxy: LyingGateway, uploads: Uploads
):
    gateway_proxy.mode, gateway_proxy.other_tx = "other-tx", uploads.tx["legacy"]
    message = refusal(settings, "testorg/iris")
    assert "the gateway returned a different transaction" in message


def test_upload_without_sha256_tag_needs_a_pin(settings: TorchSettings):
    message = refusal(settings, "testorg/untagged")
    assert "has no signed File-SHA256 tag" in message and "pin" in message
    assert fetch(settings, "testorg/untagged", sha256=IRIS_SHA).read_bytes() == IRIS


def test_pin_mismatch_is_refused(settings: TorchSettings):
    wrong = "0" * 64
    message = refusal(settings, "testorg/untagged", sha256=wrong)
    assert f"sha256 mismatch: the file hashes to {IRIS_SHA}, the pin says {wrong}" in message
    message = refusal(settings, "testorg/iris", sha256=wrong)
    assert f"the pin says {wrong}" in message


def test_pin_mismatch_on_a_cached_file_is_refused_and_keeps_the_verified_file(settings: TorchSettings):
    path = fetch(settings, "testorg/iris")
    with pytest.raises(StartupError, match="the pin says 1111"):
        fetch(settings, "testorg/iris", sha256="1" * 64)
    assert path.read_bytes() == IRIS


def test_tampered_cached_file_is_dropped_and_downloaded_again(settings: TorchSettings, gateway_proxy: LyingGateway):
    path = fetch(settings, "testorg/iris")
    path.write_bytes(b"x" * len(IRIS))  # same size, new mtime: hashed again, found changed
    before = gateway_proxy.count("/chunk/")
    assert fetch(settings, "testorg/iris").read_bytes() == IRIS
    assert gateway_proxy.count("/chunk/") == before + 1


def test_no_allowed_owners(settings: TorchSettings):
    spec = sources.ModelSpec("arweave", "model.torch", repo_id="testorg/iris")
    with pytest.raises(StartupError, match="no allowed owners: set ALLOWED_ARWEAVE_OWNERS"):
        sources.fetch(spec, settings)


def test_unreachable_gateway_uses_the_last_verified_download(
    settings: TorchSettings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    path = fetch(settings, "testorg/iris")
    monkeypatch.setattr(arweave, "BACKOFF_S", 0.01)
    dead = dataclasses.replace(settings, arweave_gateway="http://127.0.0.1:9")
    assert fetch(dead, "testorg/iris") == path
    fresh = dataclasses.replace(dead, model_cache_dir=tmp_path / "empty-cache")
    with pytest.raises(StartupError, match=r"gateway http://127.0.0.1:9: POST /graphql: cannot connect"):
        fetch(fresh, "testorg/iris")


def test_each_owners_fallback_is_kept(settings: TorchSettings, uploads: Uploads, monkeypatch: pytest.MonkeyPatch):
    """Two owners' uploads of the same name, fetched through one cache: with the gateway down each owner's fetch
    still gets its own last verified file (the other owner's fetch replaced it, and the fallback was lost; S9)."""
    theirs = dataclasses.replace(settings, allowed_arweave_owners=(uploads.evil,))
    ours_path, theirs_path = fetch(settings, "testorg/iris"), fetch(theirs, "testorg/iris")
    assert ours_path.read_bytes() == IRIS and theirs_path.read_bytes() == b"not the model " * 100
    monkeypatch.setattr(arweave, "BACKOFF_S", 0.01)
    dead = "http://127.0.0.1:9"
    assert fetch(dataclasses.replace(settings, arweave_gateway=dead), "testorg/iris") == ours_path
    assert fetch(dataclasses.replace(theirs, arweave_gateway=dead), "testorg/iris") == theirs_path


def test_two_processes_starting_at_once_share_one_download(
    settings: TorchSettings, gateway_proxy: LyingGateway, uploads: Uploads
):
    program = (
        "import logging, sys; from workflows import sources; from core.settings import TorchSettings\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "s = TorchSettings.from_env(); spec = sources.spec_from_kwargs({'model_name': 'testorg/big'}, s)\n"
        "print(sources.fetch(spec, s))\n"
    )
    env = {
        **os.environ,
        "USE_ARWEAVE": "true",
        "ALLOWED_ARWEAVE_OWNERS": settings.allowed_arweave_owners[0],
        "ARWEAVE_GATEWAY": settings.arweave_gateway,
        "MODEL_CACHE_DIR": str(settings.model_cache_dir),
        "TORCH_MODEL_FILE_NAME": "model.bin",
        "TQDM_DISABLE": "1",
    }
    before = gateway_proxy.count("/chunk/")
    # The test holds the entry's lock until both processes are seen waiting for it, so they truly start together.
    with ModelCache(settings.model_cache_dir).locked(f"arweave-{uploads.tx['big']}"):
        runs = [
            subprocess.Popen(
                [sys.executable, "-c", program], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            for _ in range(2)
        ]
        waiting = [threading.Event() for _ in runs]
        logs: list[list[bytes]] = [[] for _ in runs]

        def read(index: int) -> None:
            for line in runs[index].stderr:
                logs[index].append(line)
                if b"another process is fetching" in line:
                    waiting[index].set()

        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(len(runs))]
        for reader in readers:
            reader.start()
        try:
            assert all(event.wait(60) for event in waiting), logs
        except AssertionError:
            for run in runs:
                run.kill()
            raise
    outputs = [run.stdout.read().decode().strip() for run in runs]
    assert [run.wait(120) for run in runs] == [0, 0], logs
    assert outputs[0] == outputs[1]
    assert hashlib.sha256(Path(outputs[0]).read_bytes()).hexdigest() == BIG_SHA
    assert gateway_proxy.count("/chunk/") - before == 5  # one walk of the 5 chunks, not two


def test_publish_tool_prints_the_serving_environment(arlocal: Arlocal, tmp_path: Path):
    wallet = tmp_path / "wallet.json"
    address = new_wallet(wallet)
    arlocal.mint(address)
    command = [sys.executable, str(PUBLISH), str(EMBEDDED_MODEL), "--wallet", str(wallet), "--repo", "tool/iris"]
    done = subprocess.run(
        [*command, "--version", "3.1.0", "--gateway", arlocal.url, "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"ALLOWED_ARWEAVE_OWNERS={address}" in lines
    assert f"ARWEAVE_GATEWAY={arlocal.url}" in lines and "USE_ARWEAVE=true" in lines
    tx_id = lines[0].split()[1]
    arlocal.mine()
    header = arweave.Gateway(arlocal.url).json("GET", f"/tx/{tx_id}")
    spec = sources.ModelSpec("arweave", "model.torch", repo_id="tool/iris", owners=(address,))
    signed = arweave.verify_header(header, tx_id, spec)
    assert signed.sha256 == IRIS_SHA and signed.data_size == len(IRIS)
    assert {k: signed.tags[k] for k in ("App-Name", "Repo-Name", "File-Name", "File-Version")} == {
        "App-Name": "Ritual",
        "Repo-Name": "tool/iris",
        "File-Name": "model.torch",
        "File-Version": "3.1.0",
    }
    assert {"App-Version", "Unix-Time", "Content-Type"} <= signed.tags.keys()


def test_deep_hash_matches_the_arweave_client():
    from arweave.deep_hash import deep_hash as reference

    value = [b"2", os.urandom(512), b"", [[b"App-Name", b"Ritual"], [b"File-Name", b"model.torch"]], []]
    assert arweave.deep_hash(value) == reference(value)


def test_a_file_over_max_bytes_is_refused_by_its_signed_size(settings: TorchSettings, gateway_proxy: LyingGateway):
    """The signed data_size states the size: a per-request bound refuses it before a chunk is fetched."""
    chunks = gateway_proxy.count("/chunk/")
    spec = sources.spec_from_kwargs({"model_name": "testorg/iris"}, settings)
    with pytest.raises(sources.TooLarge) as caught:
        sources.fetch(spec, settings, max_bytes=len(IRIS) - 1)
    assert caught.value.size_bytes == len(IRIS)
    assert gateway_proxy.count("/chunk/") == chunks
    assert_nothing_unverified(settings.model_cache_dir)


# arlocal answers promptly and in bounded sizes; the proxy's "huge" and "trickle" modes stand in for a gateway that
# does not. requests' own timeout is per socket read (60 s), so only a total deadline stops a trickle.
@pytest.mark.parametrize(
    ("mode", "target", "expected"),
    [
        ("huge", "/chunk/", "exceeds 1048576 bytes"),
        ("huge", "/graphql", "exceeds 4194304 bytes"),
        ("trickle", "/chunk/", "took longer than 1 s"),
        ("trickle", "/tx/", "took longer than 1 s"),
    ],
)
def test_a_gateway_answer_too_big_or_too_slow_is_cut_off(
    settings: TorchSettings,
    gateway_proxy: LyingGateway,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
    target: str,
    expected: str,
):
    monkeypatch.setattr(arweave, "REQUEST_DEADLINE_S", 1.0)
    gateway_proxy.mode, gateway_proxy.target = mode, target
    began = time.monotonic()
    message = refusal(settings, "testorg/iris")
    assert time.monotonic() - began < 5, "cut off well before the 60 s per-read timeout, and not retried"
    assert "the gateway's answer to " in message and expected in message, message


@pytest.mark.parametrize(("mode", "expected"), [("huge", "exceeds 65536 bytes"), ("trickle", "took longer than 1 s")])
def test_publish_tool_cuts_off_a_gateway_answer_too_big_or_too_slow(
    gateway_proxy: LyingGateway, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, expected: str
):
    """Same stand-in as above (arlocal cannot misbehave), in front of the upload's first request."""
    tool = publish_tool()
    monkeypatch.setattr(tool, "REQUEST_DEADLINE_S", 1.0)
    gateway_proxy.mode, gateway_proxy.target = mode, "/tx_anchor"
    new_wallet(tmp_path / "wallet.json")
    tags = tool.model_tags(EMBEDDED_MODEL, "tool/iris", "model.torch", "0.0.0")
    began = time.monotonic()
    try:
        with pytest.raises(tool.PublishError) as caught:
            tool.publish(gateway_proxy.url, tmp_path / "wallet.json", EMBEDDED_MODEL, tags, progress=False)
    finally:
        gateway_proxy.mode = None
    assert time.monotonic() - began < 5
    message = str(caught.value)
    assert message.startswith(f"the gateway's answer to GET {gateway_proxy.url}/tx_anchor ") and expected in message


def test_a_download_reports_its_bytes_chunk_by_chunk_and_is_then_known_cached(settings: TorchSettings):
    """What the runner's registry reads (runner/model_registry.py): a download's bytes so far, and, without asking
    the gateway, whether a file is already verified in the cache (then it skips the download threads)."""
    spec = sources.spec_from_kwargs(
        {"model_name": "testorg/big"}, dataclasses.replace(settings, model_file_name="model.bin")
    )
    assert not sources.is_cached(spec, settings)
    seen: list[tuple[int, int | None]] = []
    sources.fetch(spec, settings, None, lambda got, total: seen.append((got, total)))
    assert seen[0] == (0, len(BIG)) and seen[-1] == (len(BIG), len(BIG)) and len(seen) == 6, seen  # 5 chunks
    assert sources.is_cached(spec, settings)
    assert not sources.is_cached(dataclasses.replace(spec, owners=("someone-else",)), settings)
