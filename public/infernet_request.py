"""The body of ``POST /service_output`` as Infernet nodes send it: ``InfernetInput`` and its parser.

The contract's vocabulary it uses (Source, Destination, dtype names, error bodies) lives in core/terms.py."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

from core.errors import RequestError
from core.terms import PROOFS_NOT_SUPPORTED, Destination, Source

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
        # bool is an int in Python; `"source": true` is a client bug, not CHAIN/OFFCHAIN.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be an integer")
        return value

    @field_validator("data", mode="before")
    @classmethod
    def _hex(cls, value: Any) -> Any:
        if not isinstance(value, (str, dict)):
            raise ValueError("must be a hex string (CHAIN) or a JSON object (OFFCHAIN)")
        if isinstance(value, str):
            value = "".join(value.split())
            if value[:2] in ("0x", "0X"):
                value = value[2:]
            if not _HEX.match(value):
                raise ValueError("must be a hex string (0-9, a-f)")
            if len(value) % 2:
                raise ValueError("hex string has an odd number of digits")
        return value

    @model_validator(mode="after")
    def _check(self) -> InfernetInput:
        if self.source == Source.CHAIN and not isinstance(self.data, str):
            raise ValueError("data: CHAIN source needs a hex string")
        if self.source == Source.OFFCHAIN and not isinstance(self.data, dict):
            raise ValueError("data: OFFCHAIN source needs a JSON object")
        if self.requires_proof:
            raise ValueError(PROOFS_NOT_SUPPORTED)
        if self.destination == Destination.STREAM:
            raise ValueError("destination: STREAM (2) is not supported; use 0 (CHAIN) or 1 (OFFCHAIN)")
        return self


def parse_input(obj: Any) -> InfernetInput:
    if not isinstance(obj, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(obj).__name__}")
    try:
        return InfernetInput.model_validate(obj)
    except ValidationError as e:
        errors = [{"loc": list(err["loc"]), "msg": _clean(err["msg"])} for err in e.errors(include_url=False)]
        described = "; ".join(_describe(err) for err in errors[:3])
        raise RequestError(400, described, errors) from None


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(map(str, err["loc"]))
    return f"{loc}: {err['msg']}" if loc else err["msg"]


def _clean(msg: str) -> str:
    return msg.removeprefix("Value error, ")
