"""A request's body in the API worker: read within MAX_REQUEST_BYTES, gzip decoded, JSON depth bounded.

Runs on the API worker's event loop. Every refusal is a ``RequestError`` with the contract's status (400, 413, 415).
"""

from __future__ import annotations

import zlib

import numpy as np

from core.asgi import BodyTooLarge, ClientDisconnected, Receive, Scope, read_body
from core.errors import RequestError

# Set in the scope once the whole body has been received. An answer sent before then closes the connection: the
# unread body (or, after `Expect: 100-continue`, the next request) would otherwise be read as what follows.
BODY_READ = "infernet.body_read"
CODINGS = "gzip, identity"  # request Content-Encodings decoded; others get 415
# Deeper bodies are refused: the hop to the runner pickles the data, and pickling ~1000 levels raises
# RecursionError, which would fail every request sent with it. Tensor values nest at most 32 levels.
MAX_JSON_DEPTH = 64
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")


async def read(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request's body, decoded from its Content-Encoding; at most ``limit`` bytes, before and after decoding."""
    gzipped = 0
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise RequestError(413, f"body of {int(value)} bytes exceeds the limit of {limit} (MAX_REQUEST_BYTES)")
        if name == b"content-encoding":
            gzipped += gzip_layers(value)
    try:
        raw = await read_body(receive, limit)
    except ClientDisconnected:
        raise RequestError(400, "client disconnected before sending the whole body") from None
    except BodyTooLarge:
        raise RequestError(413, f"body exceeds the limit of {limit} bytes (MAX_REQUEST_BYTES)") from None
    scope[BODY_READ] = True
    for _ in range(gzipped):
        raw = gunzip(raw, limit)
    return raw


def has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip(b"0 ")):
            return True
    return False


def nesting_depth(raw: bytes) -> int:
    """Deepest bracket nesting of a JSON text, counted at C speed. Brackets inside strings count too, so this
    may overestimate, never underestimate."""
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return 0
    brackets = np.frombuffer(raw.translate(None, _NOT_BRACKETS), np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(steps.cumsum().max())


def gzip_layers(value: bytes) -> int:
    """How many times a Content-Encoding says the body was gzipped; 415 for a coding not decoded here."""
    layers = 0
    for token in value.split(b","):
        coding = token.strip().lower()
        if coding in (b"gzip", b"x-gzip"):
            layers += 1
        elif coding not in (b"identity", b""):
            name = coding.decode("latin-1")
            raise RequestError(415, f"Content-Encoding {name!r} is not supported; send one of: {CODINGS}")
    return layers


def gunzip(data: bytes, limit: int) -> bytes:
    """Decode a gzip body (one or more members) without ever holding more than ``limit`` + 1 decoded bytes: a small
    compressed body can expand a thousandfold."""
    parts: list[bytes] = []
    size = 0
    while True:
        decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            part = decoder.decompress(data, limit + 1 - size)
        except zlib.error as e:
            raise RequestError(400, f"body is not valid gzip (Content-Encoding: gzip): {e}") from None
        size += len(part)
        if size > limit:
            raise RequestError(413, f"decompressed body exceeds the limit of {limit} bytes (MAX_REQUEST_BYTES)")
        if not decoder.eof:
            raise RequestError(400, "gzip body is truncated (Content-Encoding: gzip)")
        parts.append(part)
        data = decoder.unused_data
        if not data:
            return b"".join(parts)
