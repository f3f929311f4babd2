"""The contract's vocabulary: dtype names, where data comes from and goes to, the error body. Imported by the
service and the tests alike."""

from __future__ import annotations

from enum import IntEnum
from http import HTTPStatus
from typing import Any

DTYPE_NAMES = (
    "float", "double", "cfloat", "cdouble", "half", "bfloat16",
    "uint8", "int8", "short", "int", "long", "bool",
)  # fmt: skip

PROOFS_NOT_SUPPORTED = "Proofs are not supported by this service"


class Source(IntEnum):
    CHAIN = 0
    OFFCHAIN = 1


class Destination(IntEnum):
    CHAIN = 0
    OFFCHAIN = 1
    STREAM = 2


def error_body(status: int, description: str, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The contract's JSON error: ``{"code": "<status>", "name": <reason phrase>, "description": ...}``."""
    body: dict[str, Any] = {"code": str(status), "name": HTTPStatus(status).phrase, "description": description}
    if errors:
        body["errors"] = errors
    return body
