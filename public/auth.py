"""The bearer token that BEARER_TOKEN / BEARER_TOKEN_FILE set, checked before a protected request is read.

The Infernet node sends its container entry's ``bearer`` as ``Authorization: Bearer <token>``. The inference and
information routes need it; BentoML's probes and /metrics stay open (kubelets and scrapers send no token). The
token is compared in constant time and never written anywhere: answers name only what was wrong.
"""

from __future__ import annotations

import hmac

import orjson

from core.terms import error_body

# /service-resources stays open: the Infernet node asks it without its container's bearer (infernet-node 1.4), and a
# container it cannot read drops out of the node's GET /resources and model lookups.
PROTECTED = frozenset({"/service_output", "/info"})


def protects(path: str) -> bool:
    """Whether ``path`` needs the token: the routes above and the Open Inference Protocol's model and server
    routes (inference and metadata); its health routes stay open, like /livez, /readyz and /service-resources."""
    if path in PROTECTED:
        return True
    return (path == "/v2" or path.startswith("/v2/")) and not path.startswith("/v2/health/")


def refusal(scope: dict, token: bytes) -> tuple[bytes, str] | None:
    """The ``WWW-Authenticate`` challenge and the description of a 401 when the request lacks ``token``; None when
    it carries it. Runs on an API worker's event loop; raises nothing."""
    given = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                given = credentials.strip() or None
            break
    if given is None:  # no token at all: the challenge alone (RFC 6750 section 3.1)
        return b"Bearer", "this route needs an Authorization: Bearer token (BEARER_TOKEN)"
    if not hmac.compare_digest(given, token):
        # RFC 6750 section 3.1: a token was sent but is not the right one.
        return b'Bearer error="invalid_token"', "the Authorization: Bearer token is not the service's (BEARER_TOKEN)"
    return None


async def refuse(send, challenge: bytes, description: str) -> int:
    """Answer the contract's JSON 401. The body was not read, so the connection is closed after the answer: the
    unread body must not be taken for the next request."""
    payload = orjson.dumps(error_body(401, description))
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"www-authenticate", challenge),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
    return 401
