"""Tensors in the contract's vocabulary: ``{"dtype": NAME, "shape": [..], "values": NESTED_LIST}``.

``decode`` turns a request's data into a tensor and refuses anything that does not fit the dtype;
``encode`` writes a tensor back in the same vocabulary, so one container's output is the next one's input.
Encoded values stay numpy arrays: the API worker serialises them with orjson, which writes non-finite
floats as ``null``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from api.contract import DTYPE_NAMES
from workflows.errors import InputError

DTYPES: dict[str, torch.dtype] = {
    "float": torch.float32,
    "double": torch.float64,
    "cfloat": torch.complex64,
    "cdouble": torch.complex128,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "short": torch.int16,
    "int": torch.int32,
    "long": torch.int64,
    "bool": torch.bool,
}
assert tuple(DTYPES) == DTYPE_NAMES
NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

_INTEGER = {"uint8": np.uint8, "int8": np.int8, "short": np.int16, "int": np.int32, "long": np.int64}
_COMPLEX = {"cfloat", "cdouble"}
_FLOAT = {"float": np.float32, "double": np.float64, "half": np.float16}
_MAX_DEPTH = 32


def decode(data: Any, max_elements: int | None = None) -> torch.Tensor:
    """Request data -> CPU tensor of the named dtype. Raises InputError saying what is wrong and where."""
    if not isinstance(data, dict):
        raise InputError("data: expected an object with 'dtype' and 'values'")
    name = data.get("dtype")
    if not isinstance(name, str) or name not in DTYPES:
        raise InputError(f"dtype: unknown dtype {name!r}; expected one of {', '.join(DTYPE_NAMES)}")
    if "values" not in data:
        raise InputError("values: missing")
    array = _numeric_array(data["values"], max_elements)
    if array.size == 0:
        raise InputError("values: empty")
    shaped = data.get("shape") is not None
    if shaped and name in _COMPLEX and array.ndim == 1 and array.size % 2 == 0:
        array = array.reshape(-1, 2)  # flat complex values: real, imag, real, imag, ...
    tensor = _fit(array, name)
    if shaped:
        tensor = _reshape(tensor, data["shape"], complex_pairs=name in _COMPLEX)
    if tensor.numel() == 0:
        raise InputError("values: empty")
    return tensor


def encode(tensor: torch.Tensor) -> dict[str, Any]:
    tensor = tensor.detach().cpu()
    name = NAMES.get(tensor.dtype) or _nearest_name(tensor.dtype)
    tensor = tensor.to(DTYPES[name])
    if name == "bfloat16":
        array = tensor.float().numpy()  # numpy has no bfloat16; float32 holds every value exactly
    else:
        array = tensor.resolve_conj().numpy()
    if name in _COMPLEX:
        array = np.stack([array.real, array.imag], axis=-1)
    return {"dtype": name, "shape": list(tensor.shape), "values": np.ascontiguousarray(array)}


def encode_output(output: Any) -> Any:
    """A model's output as JSON-ready data: tensors encoded, containers walked, anything else as it is."""
    if isinstance(output, torch.Tensor):
        return encode(output)
    if isinstance(output, dict):
        return {key: encode_output(value) for key, value in output.items()}
    if isinstance(output, (list, tuple)):
        return [encode_output(value) for value in output]
    return output


def _nearest_name(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "cdouble"
    if dtype.is_floating_point:
        return "double"
    return "long"


def _numeric_array(values: Any, max_elements: int | None) -> np.ndarray:
    if not isinstance(values, list):
        raise InputError(f"values: expected a (nested) list of numbers, got {_json_type(values)}")
    try:
        array = np.array(values)
    except (ValueError, OverflowError):
        raise InputError(_describe_irregular(values)) from None
    if array.dtype.kind not in "biuf":
        raise InputError(_describe_irregular(values))
    if array.ndim > _MAX_DEPTH:
        raise InputError(f"values: nested deeper than {_MAX_DEPTH} levels")
    if max_elements is not None and array.size > max_elements:
        raise InputError(f"values: {array.size} elements exceed the limit of {max_elements} per request")
    return array


def _fit(array: np.ndarray, name: str) -> torch.Tensor:
    kind = array.dtype.kind
    if name == "bool":
        if kind != "b":
            if not np.isin(array, (0, 1)).all():
                raise InputError("values: bool accepts only true/false or 0/1")
            array = array.astype(np.bool_)
        return torch.from_numpy(array)
    if kind == "b":
        raise InputError(f"values: {name} expects numbers, got true/false")
    if name in _INTEGER:
        if kind == "f" and not (np.isfinite(array).all() and (array == np.trunc(array)).all()):
            raise InputError(f"values: {name} expects integers, got a fraction")
        info = np.iinfo(_INTEGER[name])
        # Compared as Python ints: as floats, 2**63 equals int64's maximum and would wrap to its minimum.
        low, high = int(array.min()), int(array.max())
        if low < info.min or high > info.max:
            bad = low if low < info.min else high
            raise InputError(f"values: {_number(bad)} is out of range for {name} [{info.min}, {info.max}]")
        return torch.from_numpy(array.astype(_INTEGER[name]))
    if name in _COMPLEX:
        if array.ndim == 0 or array.shape[-1] != 2:
            raise InputError(f"values: {name} values travel as [real, imag] pairs on the innermost axis")
        array = array.astype(np.float64)
        array = array[..., 0] + 1j * array[..., 1]
    if name in _FLOAT:  # numpy's cast and check cost a few microseconds less per request than torch's
        with np.errstate(over="ignore"):
            array = array.astype(_FLOAT[name], copy=False)
        if not np.isfinite(array).all():
            raise InputError(f"values: a value overflows {name}")
        return torch.from_numpy(np.ascontiguousarray(array))
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(DTYPES[name])
    if not torch.isfinite(tensor).all():
        raise InputError(f"values: a value overflows {name}")
    return tensor


def _reshape(tensor: torch.Tensor, shape: Any, complex_pairs: bool) -> torch.Tensor:
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise InputError("shape: expected a list of non-negative integers")
    count = math.prod(shape)
    if count != tensor.numel():
        what = "complex values" if complex_pairs else "values"
        raise InputError(f"shape: {shape} holds {count} elements but {what} has {tensor.numel()}")
    return tensor.reshape(shape)


def _describe_irregular(values: list) -> str:
    """Why a nested list is not a rectangular array of numbers, with the place it goes wrong."""
    level: list[tuple[str, Any]] = [("values", values)]
    for _ in range(_MAX_DEPTH):
        lists = [(path, v) for path, v in level if isinstance(v, list)]
        if not lists:
            break
        if len(lists) != len(level):
            path, v = next((p, v) for p, v in level if not isinstance(v, list))
            return f"{path}: expected a list like its neighbours, got {_json_type(v)}"
        width = len(lists[0][1])
        for index, (path, v) in enumerate(lists):
            if len(v) != width:
                if path.count("[") == 1:
                    return f"values: row {index} has {len(v)} elements, expected {width}"
                return f"{path}: has {len(v)} elements, expected {width}"
        level = [(f"{path}[{i}]", item) for path, v in lists for i, item in enumerate(v)]
        for path, item in level:
            if not isinstance(item, (list, int, float)) or (isinstance(item, int) and abs(item) >= 2**64):
                if isinstance(item, int) and not isinstance(item, bool):
                    return f"{path}: {item} is out of range"
                if not isinstance(item, bool):
                    return f"{path}: expected a number, got {_json_type(item)}"
    else:
        return f"values: nested deeper than {_MAX_DEPTH} levels"
    return "values: not a rectangular array of numbers"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, str):
        return f"a string ({value[:20]!r})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _number(value: Any) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
