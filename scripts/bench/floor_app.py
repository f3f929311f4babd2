"""Reference `floor`: the CPU per request and req/s of a Python HTTP tier that does nothing but read and parse the
body, on the same cores in the same run: the floor under any Python front. Not a peer (no ratio column) and no
model: it does no inference, and its answer is not the model's, so the bench does not check it.

``uvicorn floor_app:app --workers 2 --http httptools --loop uvloop --no-access-log --lifespan off``, a bare ASGI
app (no framework): POST (any path) reads the whole body, parses it with orjson.loads as our service does, and
answers a small fixed JSON 200 (400 if the body is not JSON); GET /readyz answers 200 for the bench's readiness
check; anything else 404.
"""

from __future__ import annotations

from typing import Any

import orjson

ANSWER = orjson.dumps({"dtype": "double", "shape": [1, 2], "values": [[0.25, 0.75]]})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    # Served with --lifespan off: only HTTP scopes come.
    status, answer = 404, b""
    if scope["method"] == "POST":
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        try:
            orjson.loads(b"".join(chunks))
            status, answer = 200, ANSWER
        except orjson.JSONDecodeError:
            status = 400
    elif scope["path"] == "/readyz":
        status, answer = 200, b'"ok"'
    # A length, so the answer goes in one piece rather than chunked.
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": answer})
