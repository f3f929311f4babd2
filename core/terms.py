"""The contract's vocabulary: dtype names, where data comes from and goes to, the request's body as Infernet nodes
send it (``InfernetInput``), the error body. Imported by the service and the tests alike."""

from __future__ import annotations

import json
import re
from enum import IntEnum
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationInfo, field_validator

DTYPE_NAMES = (
    "float", "double", "cfloat", "cdouble", "half", "bfloat16",
    "uint8", "int8", "short", "int", "long", "bool",
)  # fmt: skip

PROOFS_NOT_SUPPORTED = "Proofs are not supported by this service"
# The most dimensions a tensor may have, given as `shape` or as nested `values`, in every layout and protocol, in
# both directions: an answer the service writes must be a valid next input (numpy itself stops at 64).
MAX_RANK = 32


class Source(IntEnum):
    CHAIN = 0
    OFFCHAIN = 1


class Destination(IntEnum):
    CHAIN = 0
    OFFCHAIN = 1
    STREAM = 2


_HEX = re.compile(r"^[a-fA-F0-9]+$")


class InfernetInput(BaseModel):
    """The body of ``POST /service_output``, as Infernet nodes send it."""

    model_config = ConfigDict(extra="ignore")

    source: Source = Field(description="0 = CHAIN (hex data), 1 = OFFCHAIN (JSON object)")
    data: str | dict[str, Any] = Field(description="ABI-encoded hex for CHAIN, an object for OFFCHAIN")
    destination: Destination = Field(Destination.OFFCHAIN, description="0 = CHAIN, 1 = OFFCHAIN")
    requires_proof: StrictBool = False

    @field_validator("source", "destination", mode="before")
    @classmethod
    def _plain_int(cls, value: Any) -> Any:
        if isinstance(value, float) and value.is_integer() and abs(value) >= 2**63:
            # The JSON parser reads integers beyond 64 bits as floats: it was an integer, just far too large.
            raise ValueError("an integer beyond 64 bits is out of range; expected 0 (CHAIN) or 1 (OFFCHAIN)")
        # bool is an int in Python; `"source": true` is a client bug, not CHAIN/OFFCHAIN.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {json_text(value)}")
        return value

    @field_validator("data", mode="before")
    @classmethod
    def _hex(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, (str, dict)):
            raise ValueError("must be a hex string (CHAIN) or a JSON object (OFFCHAIN)")
        if isinstance(value, str) and info.data.get("source") == Source.OFFCHAIN:
            # The type the source asks for first: "abc" sent as OFFCHAIN data is not a hex string with an odd number
            # of digits, it is not a JSON object (the refusal named the hex rule, confusing an OFFCHAIN client).
            raise ValueError("OFFCHAIN source needs a JSON object")
        if isinstance(value, str):
            value = "".join(value.split())
            if value[:2] in ("0x", "0X"):
                value = value[2:]
            if not _HEX.match(value):
                raise ValueError("must be a hex string (0-9, a-f)")
            if len(value) % 2:
                raise ValueError("hex string has an odd number of digits")
        return value

    # Field validators, not a model validator: each refusal's `errors` entry names its field in `loc`.
    @field_validator("data")
    @classmethod
    def _data_fits_source(cls, value: Any, info: ValidationInfo) -> Any:
        source = info.data.get("source")  # absent when the source itself was refused
        if source == Source.CHAIN and not isinstance(value, str):
            raise ValueError("CHAIN source needs a hex string")
        if source == Source.OFFCHAIN and not isinstance(value, dict):
            raise ValueError("OFFCHAIN source needs a JSON object")
        return value

    @field_validator("destination")
    @classmethod
    def _no_stream(cls, value: Destination) -> Destination:
        if value == Destination.STREAM:
            raise ValueError("STREAM (2) is not supported; use 0 (CHAIN) or 1 (OFFCHAIN)")
        return value

    @field_validator("requires_proof")
    @classmethod
    def _no_proofs(cls, value: bool) -> bool:
        if value:
            raise ValueError(PROOFS_NOT_SUPPORTED)
        return value


def too_many_dimensions(rank: int) -> str:
    """The words for a shape beyond ``MAX_RANK``, after the place that holds it."""
    return f"{rank} dimensions exceed the limit of {MAX_RANK}"


def json_type(value: Any) -> str:
    """What a value read from JSON is, in JSON's words (``null``, ``true``, ``a number``, ``an array``...): messages
    to clients name what they sent, not Python's types."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def json_text(value: Any, limit: int = 40) -> str:
    """A scalar read from JSON as JSON writes it (``null``, ``true``, ``"quad"``, ``1.5``), cut at ``limit``
    characters; an array or an object by its kind only."""
    if isinstance(value, (list, tuple, dict)):
        return json_type(value)
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return json_type(value)
    return text if len(text) <= limit else f"{text[:limit]}..."


def error_body(status: int, description: str, errors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The contract's JSON error: ``{"code": "<status>", "name": <reason phrase>, "description": ...}``."""
    body: dict[str, Any] = {"code": str(status), "name": HTTPStatus(status).phrase, "description": description}
    if errors:
        body["errors"] = errors
    return body


class SentValues(list):
    """A request's values decoded from another encoding (CHAIN data, a 2.0 dtype wider in our vocabulary), with how
    the request wrote each: an error about one names it as sent and its place (``data[2]: 5789... (int256)``), not
    as the decoded value at its index in the tensor. A plain list otherwise; pickles across the hop to the runner.
    ``where`` is the place's prefix, ``dtype`` the sent dtype's name, ``sent`` the values as sent, in tensor order.
    """

    def __init__(self, values: list[Any], where: str, dtype: str, sent: list[Any] | None = None) -> None:
        super().__init__(values)
        self.where = where
        self.dtype = dtype
        self.sent = list(values) if sent is None else sent

    def describe(self, index: int) -> str:
        """``where[index]: VALUE (dtype)`` for the value at flat ``index`` of the tensor."""
        value = self.sent[index]
        text = str(value) if isinstance(value, int) and not isinstance(value, bool) else repr(value)
        return f"{self.where}[{index}]: {text} ({self.dtype})"
