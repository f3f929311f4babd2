"""Upload a model file to Arweave so that the service can load it (USE_ARWEAVE=true).

    .venv/bin/python scripts/publish_arweave.py models/iris/model.torch --wallet wallet.json --repo my-org/iris \\
        [--file-name model.torch] [--version 0.0.0] [--gateway https://arweave.net]

One format-2 data transaction, signed with the JWK wallet file, tagged the way Ritual's tools tag model files:
App-Name=Ritual, App-Version, Unix-Time, Repo-Name, File-Name, File-Version, File-SHA256, Content-Type. Data larger
than one chunk (256 KiB) is sent chunk by chunk to POST /chunk with a progress bar; every request has a timeout and
is retried with backoff. Prints the transaction id and the environment lines that serve the file. The upload costs
AR from the wallet (the gateway's /price); on arlocal, mint some first (GET /mint/<address>/<winston>).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import mimetypes
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import requests
import urllib3
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from workflows.sources import arweave
from workflows.sources.arweave import APP_NAME, b64url_decode, b64url_encode, deep_hash
from workflows.sources.cache import sha256_of

APP_VERSION = "0.1.0"
DEFAULT_GATEWAY = "https://arweave.net"
MAX_CHUNK = 256 * 1024
MIN_CHUNK = 32 * 1024
TIMEOUT = (10, 120)  # (connect, read) seconds; the read timeout is per socket read, hence the deadline
REQUEST_DEADLINE_S = 300.0  # total per request, sending a chunk (256 KiB) included
ANSWER_MAX_BYTES = 64 * 1024  # the gateway answers an anchor, a price, "OK" or an error line
ATTEMPTS = 5


class PublishError(Exception):
    pass


def load_wallet(path: Path) -> tuple[rsa.RSAPrivateKey, str]:
    """(private key, owner = the modulus n as base64url) from an Arweave JWK file."""
    try:
        jwk = json.loads(Path(path).read_text())
        n, e, d, p, q, dp, dq, qi = (int.from_bytes(b64url_decode(jwk[k]), "big") for k in _JWK_FIELDS)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PublishError(f"{path}: not an Arweave JWK wallet file ({type(err).__name__})") from None
    key = rsa.RSAPrivateNumbers(p, q, d, dp, dq, qi, rsa.RSAPublicNumbers(e, n)).private_key()
    return key, jwk["n"]


_JWK_FIELDS = ("n", "e", "d", "p", "q", "dp", "dq", "qi")


def address_of(owner: str) -> str:
    return arweave.address_of(b64url_decode(owner))


def model_tags(
    path: Path, repo: str, file_name: str, version: str, content_type: str | None = None
) -> list[tuple[str, str]]:
    return [
        ("Content-Type", content_type or mimetypes.guess_type(file_name)[0] or "application/octet-stream"),
        ("App-Name", APP_NAME),
        ("App-Version", APP_VERSION),
        ("Unix-Time", str(int(time.time()))),
        ("Repo-Name", repo),
        ("File-Name", file_name),
        ("File-Version", version),
        ("File-SHA256", sha256_of(path)),
    ]


def chunk_ranges(size: int) -> list[tuple[int, int]]:
    """Byte ranges of the chunks, split the way arweave-js splits data: 256 KiB chunks, except that a remainder
    smaller than 32 KiB is avoided by halving the last two."""
    ranges, start = [], 0
    while size - start >= MAX_CHUNK:
        length = MAX_CHUNK
        after = size - start - MAX_CHUNK
        if 0 < after < MIN_CHUNK:
            length = math.ceil((size - start) / 2)
        ranges.append((start, start + length))
        start += length
    if start < size:
        ranges.append((start, size))
    return ranges


def merkle(path: Path) -> tuple[bytes, list[tuple[int, int]], list[Any]]:
    """(data_root, chunk ranges, proofs). The tree and proofs come from arweave-python-client's merkle module."""
    from arweave.merkle import Chunk, build_layers, generate_leaves, generate_proofs

    ranges = chunk_ranges(path.stat().st_size)
    chunks = []
    with open(path, "rb") as f:
        for start, end in ranges:
            f.seek(start)
            data = f.read(end - start)
            chunks.append(Chunk(hashlib.sha256(data).digest(), len(data), start, end))
    root = build_layers(generate_leaves(tuple(chunks)))
    return root.id, ranges, list(generate_proofs(root))


def publish(gateway: str, wallet: Path, path: Path, tags: list[tuple[str, str]], progress: bool = True) -> str:
    """Sign and upload ``path`` as one transaction; its id."""
    gateway = gateway.rstrip("/")
    key, owner = load_wallet(wallet)
    size = path.stat().st_size
    if size == 0:
        raise PublishError(f"{path} is empty")
    data_root, ranges, proofs = merkle(path)
    last_tx = _call("GET", f"{gateway}/tx_anchor").strip()
    reward = _call("GET", f"{gateway}/price/{size}").strip()
    encoded = [(name.encode(), value.encode()) for name, value in tags]
    message = deep_hash(
        [b"2", b64url_decode(owner), b"", b"0", reward.encode(), b64url_decode(last_tx),
         [[n, v] for n, v in encoded], str(size).encode(), data_root]
    )  # fmt: skip
    signature = key.sign(message, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
    tx_id = b64url_encode(hashlib.sha256(signature).digest())
    in_body = len(ranges) == 1  # one chunk travels inside the transaction, as arweave-js does
    header = {
        "format": 2,
        "id": tx_id,
        "last_tx": last_tx,
        "owner": owner,
        "tags": [{"name": b64url_encode(n), "value": b64url_encode(v)} for n, v in encoded],
        "target": "",
        "quantity": "0",
        "data": b64url_encode(path.read_bytes()) if in_body else "",
        "data_size": str(size),
        "data_root": b64url_encode(data_root),
        "reward": reward,
        "signature": b64url_encode(signature),
    }
    _call("POST", f"{gateway}/tx", json=header)
    if not in_body:
        with (
            open(path, "rb") as f,
            tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc="upload", disable=not progress) as bar,
        ):
            for (start, end), proof in zip(ranges, proofs):
                f.seek(start)
                chunk = f.read(end - start)
                body = {
                    "data_root": header["data_root"],
                    "data_size": str(size),
                    "data_path": b64url_encode(proof.proof),
                    "offset": str(proof.offset),
                    "chunk": b64url_encode(chunk),
                }
                _call("POST", f"{gateway}/chunk", json=body)
                bar.update(len(chunk))
    return tx_id


def _call(method: str, url: str, **kwargs: Any) -> str:
    """The text of a 2xx answer, bounded by ANSWER_MAX_BYTES and REQUEST_DEADLINE_S; retried with backoff."""
    delay = 1.0
    for attempt in range(1, ATTEMPTS + 1):
        started = time.monotonic()
        try:
            with requests.request(method, url, timeout=TIMEOUT, stream=True, **kwargs) as response:
                text = arweave.read_bounded(
                    response, f"{method} {url}", ANSWER_MAX_BYTES, started, REQUEST_DEADLINE_S
                ).decode("utf-8", "replace")
        except arweave.GatewayError as e:
            raise PublishError(str(e)) from None
        except (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError) as e:
            problem = f"{type(e).__name__}"
        else:
            if 200 <= response.status_code < 300:
                return text
            problem = f"HTTP {response.status_code}: {text[:200]}"
            if response.status_code < 500 and response.status_code != 429:
                break
        if attempt < ATTEMPTS:
            print(f"{method} {url}: {problem}; retrying in {delay:.0f}s", file=sys.stderr)
            time.sleep(delay)
            delay = min(delay * 2, 30)
    raise PublishError(f"{method} {url}: {problem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path, help="the model file to upload")
    parser.add_argument("--wallet", type=Path, required=True, help="Arweave JWK wallet file that signs and pays")
    parser.add_argument("--repo", required=True, help="Repo-Name tag: the name the service is given as model_name")
    parser.add_argument("--file-name", help="File-Name tag (default: the file's name; TORCH_MODEL_FILE_NAME)")
    parser.add_argument("--version", default="0.0.0", help="File-Version tag (default 0.0.0)")
    parser.add_argument("--content-type", help="Content-Type tag (default: guessed, else application/octet-stream)")
    parser.add_argument("--gateway", default=DEFAULT_GATEWAY, help=f"gateway to upload to (default {DEFAULT_GATEWAY})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    file_name = args.file_name or args.file.name
    try:
        if not args.file.is_file():
            raise PublishError(f"{args.file}: no such file")
        tags = model_tags(args.file, args.repo, file_name, args.version, args.content_type)
        owner = load_wallet(args.wallet)[1]
        tx_id = publish(args.gateway, args.wallet, args.file, tags, progress=not args.quiet)
    except PublishError as e:
        print(f"publish failed: {e}", file=sys.stderr)
        return 1
    sha256 = dict(tags)["File-SHA256"]
    print(f"transaction {tx_id} (File-SHA256 {sha256}); it is served once it is mined")
    print("# environment of the service:")
    print("USE_ARWEAVE=true")
    print(f"ALLOWED_ARWEAVE_OWNERS={address_of(owner)}")
    if args.gateway.rstrip("/") != DEFAULT_GATEWAY:
        print(f"ARWEAVE_GATEWAY={args.gateway.rstrip('/')}")
    print(f"TORCH_MODEL_FILE_NAME={shlex.quote(file_name)}")
    print("CLASSIC_INF_WORKFLOW_KW_ARGS=" + shlex.quote(json.dumps({"model_name": args.repo})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
