"""A model file uploaded to Arweave by an allowed owner, verified before use.

Found through the gateway's GraphQL: the newest transaction (highest block, then latest ``Unix-Time``) owned by an
address in the allow-list and tagged ``App-Name=Ritual``, ``File-Name=<file>``, ``Repo-Name=<repo>`` (or the older
``Model-Id=<repo>``) and ``File-Version=<version>`` when one is given. The gateway is not trusted. Before a byte is
downloaded, the transaction's own header must show that an allowed key signed it (the address is computed from the
owner key, the RSA-PSS signature is checked over the v2 deep hash, and the id must be the hash of that signature) and
that its signed tags name this model. After the chunk walk, the size must equal the signed ``data_size`` and the
sha256 the signed ``File-SHA256`` tag (a transaction without that tag is refused unless the operator pinned
``sha256``). Only then is the file renamed into the model cache, keyed by transaction id; a later start that finds
the same newest transaction uses the cached file without downloading it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import urllib3
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tqdm import tqdm

from core.errors import FetchError, StartupError
from core.settings import TorchSettings
from workflows.sources import ModelSpec, OnBytes, TooLarge, check_pin_digest
from workflows.sources.cache import MODEL_CACHE_FIX, ModelCache, unwritable

log = logging.getLogger("workflows.sources.arweave")

SOURCE = "arweave"
APP_NAME = "Ritual"
TIMEOUT = (10, 60)  # (connect, read) seconds, on every request: requests' read timeout is per socket read
# A total deadline per request, checked between reads: a gateway trickling a byte per read would pass TIMEOUT for ever.
REQUEST_DEADLINE_S = 120.0
READ_BLOCK_BYTES = 64 * 1024
# Byte caps on a gateway's answer, read as it streams in (the gateway is not trusted to send a sane Content-Length).
# JSON answers (GraphQL listing of at most 200 transactions, a v2 header without data, /offset): a few hundred KiB.
JSON_MAX_BYTES = 4 * 1024 * 1024
# A /chunk answer: at most 256 KiB of data (Arweave's chunk size bound), base64url (~342 KiB), plus its Merkle proofs.
CHUNK_MAX_BYTES = 1024 * 1024
ATTEMPTS = 5
BACKOFF_S = 0.5  # doubled after each failed attempt, capped at BACKOFF_MAX_S
BACKOFF_MAX_S = 8.0
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TX_ID = re.compile(r"[A-Za-z0-9_-]{43}")

_QUERY = """
query($owners: [String!], $byRepo: [TagFilter!], $byModelId: [TagFilter!]) {
  byRepo: transactions(owners: $owners, tags: $byRepo, first: 100, sort: HEIGHT_DESC) { ...found }
  byModelId: transactions(owners: $owners, tags: $byModelId, first: 100, sort: HEIGHT_DESC) { ...found }
}
fragment found on TransactionConnection {
  edges { node { id owner { address } block { height } tags { name value } } }
}
"""


class GatewayError(Exception):
    def __init__(self, message: str, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


@dataclass(frozen=True)
class Candidate:
    id: str
    owner: str  # as the gateway claims it; the signature decides
    height: int | None
    unix_time: int

    def rank(self) -> tuple[bool, int, int]:
        # Mined before pending (a pending upload's chunks may not be served yet), then newest block, then newest tag.
        return (self.height is not None, self.height or 0, self.unix_time)


def fetch(
    spec: ModelSpec,
    settings: TorchSettings,
    max_bytes: int | None = None,
    on_bytes: OnBytes | None = None,
    reserve: Callable[[int], None] | None = None,
) -> Path:
    assert spec.repo_id
    if not spec.owners:
        raise StartupError(
            "no allowed owners: set ALLOWED_ARWEAVE_OWNERS (or model_args.owners) to the wallet addresses "
            "whose uploads may be loaded"
        )
    gateway = Gateway(settings.arweave_gateway)
    cache = ModelCache(settings.model_cache_dir)
    # The gateway-down fallback remembers the last verified transaction per question asked: the same name under
    # other owners (or another pin) is another model, whose fetch must not replace this one's fallback.
    ref = _ref(spec)
    try:
        candidates = find(gateway, spec)
    except GatewayError as e:
        if e.unreachable and (path := _last_verified(cache, ref, spec)):
            log.warning("%s; using the last verified download of this model, %s", e, path)
            return path
        raise StartupError(str(e)) from None
    if not candidates:
        raise FetchError(f"no transaction found on {gateway.url}: {_wanted(spec)}", 404)
    newest = max(candidates, key=Candidate.rank)
    log.info("newest upload: transaction %s by %s (block %s)", newest.id, newest.owner, newest.height)
    try:
        with cache.locked(f"{SOURCE}-{newest.id}"):
            path = _cached(cache, newest.id, spec) or _download(
                gateway, cache, newest.id, spec, max_bytes, on_bytes, reserve
            )
    except GatewayError as e:
        raise StartupError(str(e)) from None
    except OSError as e:
        raise StartupError(f"model cache {cache.root}: {unwritable(e)}; {MODEL_CACHE_FIX}") from None
    cache.set_ref(SOURCE, ref, newest.id)
    return path


def is_cached(spec: ModelSpec, settings: TorchSettings) -> bool:
    """Whether the model cache holds, unchanged, the transaction that last answered this same question (the
    gateway-down fallback's record). No network, no hashing (``sources.is_cached``): a newer upload found by
    ``fetch`` is still downloaded."""
    cache = ModelCache(settings.model_cache_dir)
    tx_id = cache.get_ref(SOURCE, _ref(spec))
    return tx_id is not None and cache.is_verified(SOURCE, tx_id)


def _ref(spec: ModelSpec) -> str:
    return json.dumps([spec.repo_id, spec.filename, spec.revision, sorted(spec.owners), spec.sha256])


def find(gateway: Gateway, spec: ModelSpec) -> list[Candidate]:
    """Transactions the gateway lists for this model, from allowed owners (as far as the gateway says)."""
    common = [{"name": "App-Name", "values": [APP_NAME]}, {"name": "File-Name", "values": [spec.filename]}]
    if spec.revision:
        common.append({"name": "File-Version", "values": [spec.revision]})
    variables = {
        "owners": list(spec.owners),
        "byRepo": [*common, {"name": "Repo-Name", "values": [spec.repo_id]}],
        "byModelId": [*common, {"name": "Model-Id", "values": [spec.repo_id]}],
    }
    answer = gateway.json("POST", "/graphql", json={"query": _QUERY, "variables": variables})
    if not isinstance(answer, dict) or answer.get("errors") or not isinstance(answer.get("data"), dict):
        detail = answer.get("errors") if isinstance(answer, dict) else answer
        raise GatewayError(f"gateway {gateway.url}: GraphQL query failed: {str(detail)[:300]}")
    found: dict[str, Candidate] = {}
    try:
        for listing in answer["data"].values():
            for edge in (listing or {}).get("edges") or []:
                node = edge.get("node") or {}
                tags = {t.get("name"): t.get("value") for t in node.get("tags") or []}
                owner = (node.get("owner") or {}).get("address")
                if not _TX_ID.fullmatch(str(node.get("id"))) or owner not in spec.owners:
                    continue
                height = (node.get("block") or {}).get("height")
                height = None if height is None else int(height)
                found[node["id"]] = Candidate(node["id"], owner, height, _unix_time(tags))
    except (AttributeError, TypeError, ValueError):
        raise GatewayError(f"gateway {gateway.url}: malformed GraphQL answer") from None
    return list(found.values())


def _cached(cache: ModelCache, tx_id: str, spec: ModelSpec) -> Path | None:
    hit = cache.lookup(SOURCE, tx_id)
    if hit is None:
        return None
    path, record = hit
    # Verified when it was downloaded; it must still fit what the operator asks for now.
    if record.get("owner") not in spec.owners:
        raise StartupError(
            f"transaction {tx_id} is signed by {record.get('owner')}, which is not in ALLOWED_ARWEAVE_OWNERS"
        )
    _check_tags(tx_id, record.get("tags") or {}, spec)
    check_pin_digest(str(record.get("sha256")), spec)
    log.info("using cached transaction %s (verified %s)", tx_id, time.ctime(record.get("verified_at", 0)))
    return path


def _last_verified(cache: ModelCache, ref: str, spec: ModelSpec) -> Path | None:
    tx_id = cache.get_ref(SOURCE, ref)
    if tx_id is None:
        return None
    with cache.locked(f"{SOURCE}-{tx_id}"):
        try:
            return _cached(cache, tx_id, spec)
        except StartupError:
            return None


def _download(
    gateway: Gateway,
    cache: ModelCache,
    tx_id: str,
    spec: ModelSpec,
    max_bytes: int | None,
    on_bytes: OnBytes | None,
    reserve: Callable[[int], None] | None,
) -> Path:
    header = gateway.json("GET", f"/tx/{tx_id}")
    signed = verify_header(header, tx_id, spec)
    if max_bytes is not None and signed.data_size > max_bytes:
        # The signed size: refused before a chunk is fetched (the chunk walk never goes past it either).
        raise TooLarge(signed.data_size, max_bytes)
    if reserve is not None:
        reserve(signed.data_size)
    with cache.partial(SOURCE, tx_id, spec.filename) as partial:
        digest = walk_chunks(gateway, tx_id, signed.data_size, partial, spec.filename, on_bytes)
        if signed.sha256 is not None and digest != signed.sha256:
            raise StartupError(
                f"sha256 mismatch: transaction {tx_id} downloaded from {gateway.url} hashes to {digest}, "
                f"its signed File-SHA256 tag says {signed.sha256}"
            )
        check_pin_digest(digest, spec)
        record = {"owner": signed.owner, "sha256": digest, "tags": signed.tags, "gateway": gateway.url}
        path = cache.commit(SOURCE, tx_id, partial, spec.filename, record)
    log.info(
        "verified transaction %s: signed by %s, %d bytes, sha256 %s", tx_id, signed.owner, signed.data_size, digest
    )
    return path


@dataclass(frozen=True)
class SignedHeader:
    owner: str
    tags: dict[str, str]
    data_size: int
    sha256: str | None


def verify_header(header: Any, tx_id: str, spec: ModelSpec) -> SignedHeader:
    """What an allowed key signed about this transaction; refuses anything the signature does not cover."""
    if not isinstance(header, dict):
        raise StartupError(f"transaction {tx_id}: the gateway's header is not a JSON object")
    if str(header.get("format")) != "2":
        raise StartupError(f"transaction {tx_id}: format {header.get('format')} is not supported (only format 2)")
    try:
        owner_key = b64url_decode(header["owner"])
        signature = b64url_decode(header["signature"])
        tags = [(b64url_decode(t["name"]), b64url_decode(t["value"])) for t in header.get("tags") or []]
        data_size = int(header["data_size"])
        fields = [
            b"2",
            owner_key,
            b64url_decode(header.get("target") or ""),
            str(header.get("quantity") or "0").encode(),
            str(header["reward"]).encode(),
            b64url_decode(header["last_tx"]),
            [[name, value] for name, value in tags],
            str(header["data_size"]).encode(),
            b64url_decode(header.get("data_root") or ""),
        ]
    except (KeyError, TypeError, ValueError) as e:
        raise StartupError(
            f"transaction {tx_id}: malformed header from the gateway ({type(e).__name__}: {e})"
        ) from None
    owner = address_of(owner_key)
    if owner not in spec.owners:
        raise StartupError(f"transaction {tx_id} is signed by {owner}, which is not in ALLOWED_ARWEAVE_OWNERS")
    if b64url_encode(hashlib.sha256(signature).digest()) != tx_id:
        raise StartupError(f"transaction {tx_id}: the gateway returned a different transaction (id does not match)")
    try:
        key = rsa.RSAPublicNumbers(65537, int.from_bytes(owner_key, "big")).public_key()
        key.verify(
            signature,
            deep_hash(fields),
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO),
            hashes.SHA256(),
        )
    except (InvalidSignature, ValueError):
        raise StartupError(
            f"transaction {tx_id}: the signature does not match the header the gateway returned "
            f"(altered in transit or by the gateway)"
        ) from None
    named: dict[str, str] = {}
    for name, value in tags:
        named.setdefault(name.decode("utf-8", "replace"), value.decode("utf-8", "replace"))
    _check_tags(tx_id, named, spec)
    sha256 = named.get("File-SHA256", "").strip().lower() or None
    if sha256 is not None and not _SHA256.fullmatch(sha256):
        raise StartupError(f"transaction {tx_id}: its File-SHA256 tag is not 64 hex digits")
    if sha256 is None and not spec.sha256:
        raise StartupError(
            f"transaction {tx_id} has no signed File-SHA256 tag, so its content cannot be verified; "
            "pin the expected sha256 in CLASSIC_INF_WORKFLOW_KW_ARGS to accept it"
        )
    if data_size <= 0:
        raise StartupError(f"transaction {tx_id} carries no data")
    return SignedHeader(owner, named, data_size, sha256)


def _check_tags(tx_id: str, tags: dict[str, str], spec: ModelSpec) -> None:
    wanted = {"App-Name": APP_NAME, "File-Name": spec.filename}
    if spec.revision:
        wanted["File-Version"] = spec.revision
    wrong = [f"{k}={tags.get(k)!r}" for k, v in wanted.items() if tags.get(k) != v]
    if spec.repo_id not in (tags.get("Repo-Name"), tags.get("Model-Id")):
        wrong.append(f"Repo-Name={tags.get('Repo-Name')!r}")
    if wrong:
        raise StartupError(f"transaction {tx_id}: its signed tags do not name this model ({', '.join(wrong)})")


def walk_chunks(
    gateway: Gateway, tx_id: str, size: int, out: Path, filename: str, on_bytes: OnBytes | None = None
) -> str:
    """Download a transaction's data chunk by chunk into ``out``; its sha256. ``on_bytes`` is told each chunk."""
    where = gateway.json("GET", f"/tx/{tx_id}/offset")
    try:
        end, listed = int(where["offset"]), int(where["size"])
    except (KeyError, TypeError, ValueError):
        raise StartupError(f"transaction {tx_id}: malformed /offset answer from the gateway") from None
    if listed != size:
        raise StartupError(f"transaction {tx_id}: the gateway lists {listed} bytes, the signed data_size is {size}")
    start = end - size + 1
    digest = hashlib.sha256()
    done = 0
    if on_bytes is not None:
        on_bytes(0, size)
    with (
        open(out, "wb") as f,
        tqdm(
            total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"arweave {filename}", mininterval=1.0
        ) as bar,
    ):
        while done < size:
            answer = gateway.json("GET", f"/chunk/{start + done}", max_bytes=CHUNK_MAX_BYTES)
            try:
                chunk = b64url_decode(answer["chunk"])
            except (KeyError, TypeError, ValueError):
                raise StartupError(f"transaction {tx_id}: malformed chunk at byte {done} from the gateway") from None
            if not chunk or done + len(chunk) > size:
                raise StartupError(
                    f"transaction {tx_id}: the gateway's chunk at byte {done} has {len(chunk)} bytes, "
                    f"which does not fit the signed data_size {size}"
                )
            f.write(chunk)
            digest.update(chunk)
            done += len(chunk)
            bar.update(len(chunk))
            if on_bytes is not None:
                on_bytes(done, size)
    return digest.hexdigest()


class Gateway:
    """JSON over HTTP with retries with backoff for transient failures; every answer is bounded in bytes
    (``max_bytes``, default JSON_MAX_BYTES) and every request in total time (REQUEST_DEADLINE_S).

    Raises GatewayError (``unreachable`` for connection failures, timeouts and a request past its deadline).
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()

    def json(self, method: str, path: str, max_bytes: int = JSON_MAX_BYTES, **kwargs: Any) -> Any:
        delay = BACKOFF_S
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return self._once(method, path, max_bytes, **kwargs)
            except _Transient as e:
                if attempt == ATTEMPTS:
                    raise GatewayError(
                        f"gateway {self.url}: {method} {path}: {e} ({ATTEMPTS} attempts)", unreachable=True
                    ) from None
                log.warning("gateway %s: %s %s: %s; retrying in %.1fs", self.url, method, path, e, delay)
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
        raise AssertionError("not reached")

    def _once(self, method: str, path: str, max_bytes: int, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            with self.session.request(method, self.url + path, timeout=TIMEOUT, stream=True, **kwargs) as response:
                if response.status_code in _RETRY_STATUS:
                    raise _Transient(f"HTTP {response.status_code}")
                if response.status_code != 200:
                    raise GatewayError(f"gateway {self.url}: {method} {path}: HTTP {response.status_code}")
                body = read_bounded(response, f"{method} {self.url}{path}", max_bytes, started, REQUEST_DEADLINE_S)
        except (requests.Timeout, urllib3.exceptions.TimeoutError):
            raise _Transient("timed out") from None
        except (requests.ConnectionError, urllib3.exceptions.ProtocolError) as e:
            raise _Transient(f"cannot connect ({type(e).__name__})") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
            raise GatewayError(f"gateway {self.url}: {method} {path}: {type(e).__name__}") from None
        try:
            return json.loads(body)
        except ValueError:
            raise GatewayError(f"gateway {self.url}: {method} {path}: the answer is not JSON") from None


class _Transient(Exception):
    pass


def read_bounded(response: requests.Response, what: str, max_bytes: int, started: float, deadline_s: float) -> bytes:
    """The body of a ``stream=True`` response, read in blocks; GatewayError once it passes ``max_bytes`` or
    ``deadline_s`` seconds after ``started`` (``time.monotonic()`` when the request was sent), checked between reads
    (each read is bounded by the request's read timeout).

    ``what`` names the request in the message ("GET https://gateway/tx/..."). urllib3 errors pass through. Not
    retried by Gateway: a gateway that sends too much or too slowly would do it again, ATTEMPTS times over.
    """
    body = bytearray()
    # read1, not iter_content: urllib3's read(n) waits for all n bytes, so a trickle would never reach the check.
    while block := response.raw.read1(READ_BLOCK_BYTES, decode_content=True):
        body += block
        if len(body) > max_bytes:
            raise GatewayError(f"the gateway's answer to {what} exceeds {max_bytes} bytes")
        if time.monotonic() - started > deadline_s:
            raise GatewayError(f"the gateway's answer to {what} took longer than {deadline_s:g} s", unreachable=True)
    return bytes(body)


def deep_hash(item: bytes | list) -> bytes:
    """Arweave's deep hash (SHA-384 over tagged blobs and lists): what a v2 transaction's signature signs."""
    if isinstance(item, list):
        acc = hashlib.sha384(b"list" + str(len(item)).encode()).digest()
        for child in item:
            acc = hashlib.sha384(acc + deep_hash(child)).digest()
        return acc
    tag = hashlib.sha384(b"blob" + str(len(item)).encode()).digest()
    return hashlib.sha384(tag + hashlib.sha384(item).digest()).digest()


def address_of(owner_key: bytes) -> str:
    """The wallet address of an RSA owner key (its modulus): base64url of its sha256."""
    return b64url_encode(hashlib.sha256(owner_key).digest())


def b64url_decode(text: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError("expected a base64url string")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unix_time(tags: dict[str, Any]) -> int:
    try:
        return int(tags.get("Unix-Time") or 0)
    except (TypeError, ValueError):
        return 0


def _wanted(spec: ModelSpec) -> str:
    version = f", File-Version={spec.revision}" if spec.revision else ""
    return (
        f"none by an allowed owner ({len(spec.owners)} in ALLOWED_ARWEAVE_OWNERS) tagged App-Name={APP_NAME}, "
        f"Repo-Name (or Model-Id)={spec.repo_id}, File-Name={spec.filename}{version}"
    )
