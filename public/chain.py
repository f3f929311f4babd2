"""CHAIN data: ABI ``int256[]`` of 18-decimal fixed-point numbers (SD59x18), in and out."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from eth_abi import encode

from core.errors import RequestError
from public.infernet_ml_layouts import COMPLEX_NAMES as _COMPLEX
from public.infernet_ml_layouts import LayoutError, decode_int256, describe_answer, shortest_decimal

SCALE = 10**18
_INT256 = (-(2**255), 2**255 - 1)


def decode_input(hex_data: str, max_elements: int | None = None) -> dict[str, Any]:
    """Hex from a contract -> the OFFCHAIN form of a ``double`` tensor of shape [1, N], whose values an error names
    as sent (``data[0]: ... (int256)``). Bytes after the ABI payload are ignored, as in every CHAIN layout
    (public/infernet_ml_layouts.py ``decode_int256``). On the API worker's event loop; raises RequestError 400."""
    try:
        return decode_int256(bytes.fromhex(hex_data), max_elements)
    except ValueError as e:  # LayoutError, or hex that is not hex
        raise RequestError(400, str(e) if isinstance(e, LayoutError) else f"data: not a hex string ({e})") from None


def encode_output(body: Any) -> dict[str, str]:
    """A tensor output -> the five-key CHAIN response, ``raw_output`` = ABI int256[] in 18-decimal fixed point.

    Integers are exact (n -> n * 10**18); a floating value is its shortest decimal in the tensor's own dtype (what
    the OFFCHAIN answer prints: a float 0.1 is 10**17), rounded half-even to 18 decimals. On the API worker's event
    loop. Raises RequestError 422 for an answer the int256[] cannot hold exactly: several tensors (a model's tuple,
    list or dict), anything that is not numbers, complex values, ``true``/``false`` mixed with numbers,
    non-finite values, values beyond int256. A ``bool`` tensor is 0 or 1 (false 0, true 10**18).
    """
    tensor = isinstance(body, dict) and "dtype" in body
    values = body.get("values") if tensor else body
    name = body.get("dtype") if tensor else ""
    try:
        exact = np.asarray(values)
    except (TypeError, ValueError):
        exact = None  # ragged: not an array of numbers
    _refuse_inexact(name, values, exact)
    if exact is not None and _integral(exact):
        # Integers as Python ints: through float64 a long beyond 2**53 would come out rounded.
        fixed = [int(v) * SCALE for v in exact.ravel().tolist()]
    elif (mixed := _ints_and_floats(values, exact)) is not None:
        # A workflow's JSON list of integers and floats: numpy read it as float64, which rounds an integer beyond
        # 2**53; each value is taken as it was written instead.
        fixed = _fixed_point(mixed, name)
    else:
        flat = _floats(exact)
        if flat is None:
            raise RequestError(
                422,
                f"the answer holds {describe_answer(body)}; the int256[] CHAIN answer holds the numbers of one "
                "tensor (send destination 1 for this answer)",
            )
        fixed = _fixed_point(flat, name)
    if fixed and (min(fixed) < _INT256[0] or max(fixed) > _INT256[1]):
        raise RequestError(422, "the model's output does not fit int256 in 18-decimal fixed point")
    return {
        "raw_input": "",
        "processed_input": "",
        "raw_output": encode(["int256[]"], [fixed]).hex(),
        "processed_output": "",
        "proof": "",
    }


def _refuse_inexact(name: str, values: Any, exact: np.ndarray | None) -> None:
    """Raise RequestError 422 for values the int256[] would hold only by changing what they mean: a complex tensor
    (its [real, imag] pairs would come out as two reals each) and ``true``/``false`` mixed with numbers (a
    workflow's own JSON: numpy would make them 1 and 0 silently). ``exact`` is ``values`` as numpy reads them."""
    if name in _COMPLEX or (exact is not None and exact.dtype.kind == "c"):
        raise RequestError(
            422,
            f"the model's output is complex ({name or 'complex'}); the int256[] CHAIN answer holds real numbers only "
            "(send destination 1 for [real, imag] pairs, or a 1.x or 2.0 CHAIN request, whose vectors hold complex "
            "values)",
        )
    # numbers that numpy may have made of true/false (a bool tensor, or a JSON list of true/false only, reads "b")
    numbers = exact is not None and exact.dtype.kind in "iufO"
    if numbers and _holds_bool(values):
        raise RequestError(
            422,
            "the answer mixes true/false with numbers; the int256[] CHAIN answer holds numbers, or the 0/1 of a bool "
            "tensor (send destination 1 for this answer)",
        )


def _holds_bool(values: Any) -> bool:
    """Whether a Python bool (or a numpy bool in an object array) sits among ``values``: nested lists, or an array."""
    if isinstance(values, np.ndarray):
        return values.dtype.kind == "O" and any(isinstance(v, (bool, np.bool_)) for v in values.flat)
    pending = [values]
    while pending:  # iterative: a deep list must not exhaust the stack
        item = pending.pop()
        if isinstance(item, (bool, np.bool_)):
            return True
        if isinstance(item, (list, tuple)):
            pending.extend(item)
    return False


def _floats(array: np.ndarray | None) -> np.ndarray | None:
    """The values as a flat floating array in their own dtype (float16/32/64 keep theirs), or None when they are not
    numbers (strings, objects, several tensors, ragged lists)."""
    if array is None:
        return None
    if array.dtype.kind == "f":
        return array.ravel()
    if array.dtype.kind == "O" and all(type(v) in (int, float) for v in array.flat):
        try:
            return array.astype(np.float64).ravel()  # Python floats among integers beyond 64 bits
        except OverflowError:
            raise RequestError(422, "the model's output does not fit int256 in 18-decimal fixed point") from None
    return None


def _fixed_point(values: Any, name: str) -> list[int]:
    """Each value times 10**18: a Python int exactly, a float as its shortest decimal in its own dtype, rounded
    half-even. RequestError 422 for a non-finite value."""
    if not all(type(v) is int or math.isfinite(v) for v in values):
        raise RequestError(422, "the model's output has non-finite values; they cannot be encoded as int256[]")
    return [
        v * SCALE if type(v) is int else int(shortest_decimal(v, name).scaleb(18).to_integral_value()) for v in values
    ]


def _ints_and_floats(values: Any, exact: np.ndarray | None) -> list[Any] | None:
    """A JSON list's values, flat, when it mixes Python ints and floats (numpy reads it as float64, or as objects
    for an int beyond 64 bits, which float64 then rounds); else None."""
    if not isinstance(values, list) or exact is None or exact.dtype.kind not in "fO":
        return None
    flat = np.asarray(values, dtype=object).ravel().tolist()
    if all(type(v) in (int, float) for v in flat) and any(type(v) is int for v in flat):
        return flat
    return None


def _integral(array: np.ndarray) -> bool:
    """Whether every value is an integer type (or bool): numpy integers, or Python ints an object array holds."""
    if array.dtype.kind in "iub":
        return True
    return array.dtype.kind == "O" and all(isinstance(v, int) for v in array.flat)
