"""CHAIN data: ABI ``int256[]`` of 18-decimal fixed-point numbers (SD59x18), in and out."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import numpy as np
from eth_abi import decode, encode
from eth_abi.exceptions import DecodingError

from core.errors import RequestError

SCALE = 10**18
_INT256 = (-(2**255), 2**255 - 1)


def decode_input(hex_data: str) -> dict[str, Any]:
    """Hex from a contract -> the OFFCHAIN form of a ``double`` tensor of shape [1, N]."""
    try:
        (numbers,) = decode(["int256[]"], bytes.fromhex(hex_data))
    except (DecodingError, ValueError, OverflowError) as e:
        raise RequestError(400, f"data: not an ABI-encoded int256[] ({e})") from None
    if not numbers:
        raise RequestError(400, "data: the int256[] is empty")
    return {"dtype": "double", "shape": [1, len(numbers)], "values": [n / SCALE for n in numbers]}


def encode_output(body: Any) -> dict[str, str]:
    """A tensor output -> the five-key CHAIN response, ``raw_output`` = ABI int256[] in 18-decimal fixed point."""
    values = body.get("values") if isinstance(body, dict) and "dtype" in body else body
    try:
        exact = np.asarray(values)
    except (TypeError, ValueError):
        exact = None  # ragged: the float conversion below says so
    if exact is not None and _integral(exact):
        # Integers as Python ints: through float64 a long beyond 2**53 would come out rounded.
        fixed = [int(v) * SCALE for v in exact.ravel().tolist()]
    else:
        try:
            flat = np.asarray(values, dtype=np.float64).ravel()
        except (TypeError, ValueError, OverflowError):
            raise RequestError(500, "the workflow's output is not numeric; it cannot be encoded as int256[]") from None
        if not np.isfinite(flat).all():
            raise RequestError(422, "the model's output has non-finite values; they cannot be encoded as int256[]")
        fixed = [int(Decimal(repr(float(v))).scaleb(18).to_integral_value()) for v in flat]
    if fixed and (min(fixed) < _INT256[0] or max(fixed) > _INT256[1]):
        raise RequestError(422, "the model's output does not fit int256 in 18-decimal fixed point")
    return {
        "raw_input": "",
        "processed_input": "",
        "raw_output": encode(["int256[]"], [fixed]).hex(),
        "processed_output": "",
        "proof": "",
    }


def _integral(array: np.ndarray) -> bool:
    """Whether every value is an integer type (or bool): numpy integers, or Python ints an object array holds."""
    if array.dtype.kind in "iub":
        return True
    return array.dtype.kind == "O" and all(isinstance(v, int) for v in array.flat)
