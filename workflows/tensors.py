"""Tensors in the contract's vocabulary: ``{"dtype": NAME, "shape": [..], "values": NESTED_LIST}``.

``decode`` turns a request's data into a tensor and refuses anything that does not fit the dtype;
``encode`` writes a tensor back in the same vocabulary, so one container's output is the next one's input.
Encoded values stay numpy arrays: the API worker serialises them with orjson, which writes non-finite
floats as ``null``.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from core.errors import InputError, ModelError
from core.settings import ServiceSettings, integer
from core.terms import DTYPE_NAMES, MAX_RANK, SentValues, json_text, json_type, too_many_dimensions

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
_LARGEST: dict[torch.dtype, float] = {
    dtype: 1 if dtype == torch.bool else (torch.finfo if dtype.is_floating_point else torch.iinfo)(dtype).max
    for dtype in DTYPES.values()
    if not dtype.is_complex
}

_INTEGER = {"uint8": np.uint8, "int8": np.int8, "short": np.int16, "int": np.int32, "long": np.int64}
_INTEGER_RANGE = {name: (int(np.iinfo(t).min), int(np.iinfo(t).max)) for name, t in _INTEGER.items()}
_WIDER_FLOATS = ("half", "bfloat16", "float", "double")  # narrowest first
# Unsigned output dtypes beyond uint8: answered under the name of a wider signed dtype, values in their own dtype.
KEPT_UNSIGNED = frozenset({torch.uint16, torch.uint32, torch.uint64})
_COMPLEX = {"cfloat", "cdouble"}
_FLOAT = {"float": np.float32, "double": np.float64, "half": np.float16}
_MAX_DEPTH = MAX_RANK  # nested values and a `shape` alike
# Below this magnitude float64 holds every integer exactly, so a float64 array of such values lost nothing.
_EXACT_IN_DOUBLE = 2**53
_LONG_MAX = 2**63 - 1
MAX_DENSE_OUTPUT = 16 * 1024 * 1024  # values: a sparse output is sent dense up to this many (128 MiB of float64)
_SCAN_AT_MOST = 100  # values; measured on the development box: about where a type scan costs a numpy call


def decode(data: Any, max_elements: int | None = None) -> torch.Tensor:
    """Request data -> CPU tensor of the named dtype, at most ``max_elements`` values and never more than
    MAX_REQUEST_ELEMENTS (what /info reports as the limit, whichever workflow decodes). Raises InputError saying what
    is wrong and where."""
    if not isinstance(data, dict):
        raise InputError("data: expected an object with 'dtype' and 'values'")
    if "dtype" not in data:
        raise InputError("dtype: missing")
    name = data["dtype"]
    if not isinstance(name, str) or name not in DTYPES:
        raise InputError(f"dtype: unknown dtype {json_text(name)}; expected one of {', '.join(DTYPE_NAMES)}")
    if "values" not in data:
        raise InputError("values: missing")
    shaped = data.get("shape") is not None
    if shaped:
        _check_shape(data["shape"])  # before anything is built: torch would build any rank numpy cannot write back
    values = data["values"]
    limit = request_element_limit()
    array = _numeric_array(values, limit if max_elements is None else min(max_elements, limit))
    if array.size == 0:
        raise InputError("values: empty")
    if name != "bool":
        _refuse_booleans(array, values, name)
    if shaped and name in _COMPLEX and array.ndim == 1 and array.size % 2 == 0:
        array = array.reshape(-1, 2)  # flat complex values: real, imag, real, imag, ...
    tensor = _fit(array, name, values)
    if shaped:
        tensor = _reshape(tensor, data["shape"], complex_pairs=name in _COMPLEX)
    if tensor.numel() == 0:
        raise InputError("values: empty")
    return tensor


def cast_to_model(
    tensor: torch.Tensor, dtype: torch.dtype, values: Any, role: str = "the model's dtype"
) -> torch.Tensor:
    """A decoded input as the model's ``dtype``; ``values`` is what it was decoded from, to name a value as sent;
    ``role`` says in the refusal what ``dtype`` is to the model (its own, or the precision it runs in).

    Runs where the workflow's preprocess runs (the runner's event loop). Raises InputError naming the first value
    the cast does not keep (a float that overflows a floating dtype, an integer that does not come back exactly from a
    floating one, any value that does not come back from an integer one), with its place and both dtypes; for
    ``core.terms.SentValues`` (CHAIN data), as the client sent it.
    """
    cast = tensor.to(dtype)
    if dtype.is_floating_point and not tensor.is_floating_point() and tensor.dtype != torch.bool:
        # Integers to a floating dtype: rounding would change a value nobody sent as a float (16777217 as float
        # is 16777216), so each must come back exactly; inf from an overflow does not come back either.
        bad = (cast.to(tensor.dtype) != tensor) | _beyond(cast, tensor.dtype)
    elif dtype.is_floating_point:
        if _largest(tensor.dtype) <= _largest(dtype):
            return cast
        # decode lets only finite values through, so a non-finite one here is an overflow of the cast;
        # numpy's check costs a few microseconds less than torch's (no bfloat16 in numpy, though).
        if dtype == torch.bfloat16:
            bad = ~torch.isfinite(cast)
        else:
            finite = np.isfinite(cast.numpy())
            if finite.all():
                return cast
            bad = torch.from_numpy(~finite)
    else:
        bad = cast.to(tensor.dtype) != tensor
        if tensor.is_floating_point() and dtype != torch.bool:
            bad |= _beyond(tensor, dtype)
    if not bad.any():
        return cast
    index = int(bad.flatten().nonzero()[0])
    target = NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if isinstance(values, SentValues):  # decoded from CHAIN data or a wider 2.0 dtype: name it as the client sent it
        raise InputError(f"{values.describe(index)} does not fit {target} ({role})")
    place, sent = _sent_at(values, index)
    raise InputError(f"{place}: {_number(sent)} does not fit {target} ({role}), cast from {NAMES[tensor.dtype]}")


def _beyond(floats: torch.Tensor, integer: torch.dtype) -> torch.Tensor:
    """Where ``floats`` lie outside ``integer``'s range. A float cast to an integer dtype it does not fit is undefined
    in C: x86 gives the dtype's minimum, so the back-cast differs and the value is refused, but ARM saturates, and
    2**63 would come back from long's 2**63-1 as itself. So the range is checked, in float64 (exact for every float
    dtype), never left to the cast."""
    info = torch.iinfo(integer)
    wide = floats.to(torch.float64)
    return (wide < float(info.min)) | (wide >= float(info.max) + 1)  # float(2**63-1) + 1 is 2**63: the first beyond


def encode(tensor: torch.Tensor) -> dict[str, Any]:
    """A tensor in the contract's vocabulary (a sparse one as its dense values). Raises ModelError for an unsigned
    value beyond ``long``, for a tensor of more than ``MAX_RANK`` dimensions (the answer would not be a valid next
    input), and for a sparse tensor of more than ``MAX_DENSE_OUTPUT`` values."""
    if tensor.dim() > MAX_RANK:
        raise ModelError(f"output: {too_many_dimensions(tensor.dim())} (the most a request may send)")
    tensor = tensor.detach().cpu()
    if tensor.layout != torch.strided:  # sparse: the contract's values are dense
        if tensor.numel() > MAX_DENSE_OUTPUT:
            raise ModelError(
                f"output: a sparse tensor of shape {list(tensor.shape)} is {tensor.numel()} values dense, more than "
                f"{MAX_DENSE_OUTPUT} to send"
            )
        tensor = tensor.to_dense()
    name = NAMES.get(tensor.dtype) or widened_name(tensor.dtype)
    if name == "long" and not tensor.is_signed() and tensor.numel():
        largest = tensor.numpy().max()  # uint64 would wrap to a negative long
        if largest > _LONG_MAX:
            raise ModelError(f"output: {largest} ({tensor.dtype}) does not fit long, the widest integer dtype")
    if tensor.dtype in KEPT_UNSIGNED:
        # The values keep their own dtype: the layouts with a code for it (2.0's uint16/32/64, the protocol's
        # UINT16/32/64) answer in it; the others read the name, the narrowest that holds every value.
        return {"dtype": name, "shape": list(tensor.shape), "values": np.ascontiguousarray(tensor.numpy())}
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
    if isinstance(output, dict):  # JSON keys are strings: a TorchScript Dict[int, Tensor] answers {"1": ...}
        return {key if isinstance(key, str) else str(key): encode_output(value) for key, value in output.items()}
    if isinstance(output, (list, tuple)):
        return [encode_output(value) for value in output]
    return output


def widened_name(dtype: torch.dtype) -> str:
    """The vocabulary's name for an output dtype outside it: the narrowest dtype of its kind that holds every value of
    ``dtype`` exactly (float8 -> half, float8_e8m0fnu -> bfloat16, complex32 -> cfloat, uint16 -> int, uint32 and
    uint64 -> long); the widest of its kind for a dtype torch cannot describe. Pure; raises nothing."""
    widest = "cdouble" if dtype.is_complex else "double" if dtype.is_floating_point else "long"
    try:  # packed and sub-byte dtypes (float4_e2m1fn_x2, uint3) have no usable finfo/iinfo
        if dtype.is_complex or dtype.is_floating_point:
            own = _limits(torch.finfo(dtype))  # a complex dtype's finfo is its parts'
        else:
            info = torch.iinfo(dtype)
    except (TypeError, NotImplementedError, RuntimeError):
        return widest
    if dtype.is_complex:
        return "cfloat" if _holds(_limits(torch.finfo(torch.float32)), own) else widest
    if dtype.is_floating_point:
        return next((name for name in _WIDER_FLOATS if _holds(_limits(torch.finfo(DTYPES[name])), own)), widest)
    return next(
        (name for name in _INTEGER if _INTEGER_RANGE[name][0] <= info.min and info.max <= _INTEGER_RANGE[name][1]),
        "long",
    )


def _limits(info: torch.finfo) -> tuple[float, float, float]:
    """(eps, largest, smallest positive) of a floating dtype; the smallest positive is a subnormal, tiny times eps."""
    return info.eps, info.max, info.tiny * info.eps


def _holds(wide: tuple[float, float, float], narrow: tuple[float, float, float]) -> bool:
    """Whether a floating dtype holds every finite value of another: as many fraction bits (eps), as large a maximum,
    as small a smallest positive value."""
    return wide[0] <= narrow[0] and wide[1] >= narrow[1] and wide[2] <= narrow[2]


@functools.cache
def request_element_limit() -> int:
    """MAX_REQUEST_ELEMENTS, read from this process's environment once: the bound of every ``decode``, so a custom
    workflow (a ``TensorWorkflow`` that never sets ``max_elements``) keeps the limit /info advertises too."""
    return integer(os.environ, "MAX_REQUEST_ELEMENTS", ServiceSettings.max_elements, minimum=1)


def _numeric_array(values: Any, max_elements: int | None) -> np.ndarray:
    if not isinstance(values, list):
        raise InputError(f"values: expected a (nested) list of numbers, got {_json_type(values)}")
    try:
        array = np.array(values)
    except (ValueError, OverflowError):
        raise InputError(_describe_irregular(values)) from None
    kind = array.dtype.kind
    # An object array of numbers holds integers beyond 64 bits; the dtype decides whether they fit.
    if kind not in "biuf" and not (kind == "O" and all(isinstance(x, (int, float)) for x in array.flat)):
        raise InputError(_describe_irregular(values))
    if array.ndim > _MAX_DEPTH:
        raise InputError(f"values: nested deeper than {_MAX_DEPTH} levels")
    if max_elements is not None and array.size > max_elements:
        raise InputError(f"values: {array.size} elements exceed the limit of {max_elements} per request")
    return array


def _refuse_booleans(array: np.ndarray, values: list, name: str) -> None:
    """Refuse true/false anywhere in ``values`` for a numeric dtype ``name``."""
    kind = array.dtype.kind
    if kind == "b":
        index: int | None = 0
    elif kind == "O":
        index = next((i for i, x in enumerate(array.flat) if isinstance(x, bool)), None)
    elif array.size <= _SCAN_AT_MOST:
        # np.array reads true/false among numbers as 1/0 and keeps no trace of them. For a few values, looking
        # at their types costs less than one numpy call.
        index = _first_boolean_in_rows(_innermost_lists(values, array.ndim), range(array.size // array.shape[-1]))
    else:
        # Looking at every value's type costs as much as np.array itself. Only a value that decoded to exactly 0
        # or 1 can have been a boolean, so one vectorised comparison clears the usual request, and only the rows
        # holding such values are looked at in the lists as sent.
        if kind == "f":
            maybe = (array == 0) | (array == 1)
            if not maybe.any():
                return
        else:
            halves = array >> 1  # 0 for 0 and 1 only: one operation fewer than two comparisons
            if halves.all():
                return
            maybe = halves == 0
        index = _first_boolean(values, maybe)
    if index is not None:
        place, sent = _sent_at(values, index)
        raise InputError(f"{place}: {name} expects numbers, got {_json_type(sent)}")


def _first_boolean(values: list, maybe: np.ndarray) -> int | None:
    """C-order index of the first true/false in ``values`` among the places ``maybe`` marks, or None."""
    width = maybe.shape[-1]
    rows = _innermost_lists(values, maybe.ndim)
    marked = np.flatnonzero(maybe).tolist()
    if len(marked) * 8 > maybe.size:  # many marks: scanning whole rows at C speed costs less than a look at each
        return _first_boolean_in_rows(rows, range(len(rows)))
    for index in marked:
        r, column = divmod(index, width)
        if type(rows[r][column]) is bool:
            return index
    return None


def _first_boolean_in_rows(rows: list[list], numbers: Iterable[int]) -> int | None:
    """C-order index of the first true/false in the rows ``numbers`` of equally long ``rows``, or None."""
    for r in numbers:
        row = rows[r]
        if bool in map(type, row):
            return r * len(row) + next(j for j, x in enumerate(row) if type(x) is bool)
    return None


def _fit(array: np.ndarray, name: str, values: list) -> torch.Tensor:
    kind = array.dtype.kind
    if name == "bool":
        if kind != "b":
            fits = (array == 0) | (array == 1)
            if not fits.all():
                place, sent = _sent_at(values, int(np.flatnonzero(~fits)[0]))
                raise InputError(f"{place}: bool accepts only true/false or 0/1, got {_number(sent)}")
            array = array.astype(np.bool_)
        return torch.from_numpy(array)
    if name in _INTEGER:
        return torch.from_numpy(_integers(array, name, values))
    if kind == "O":
        array = _doubles(array, name, values)
    if name in _COMPLEX:
        if array.ndim == 0 or array.shape[-1] != 2:
            raise InputError(f"values: {name} values travel as [real, imag] pairs on the innermost axis")
        parts = _floats(array, np.float32 if name == "cfloat" else np.float64, name, values)
        # A view of the [real, imag] pairs, not ``real + 1j * imag``: that sum turns a part of -0.0 into 0.0.
        pairs = np.ascontiguousarray(parts, dtype=np.float32 if name == "cfloat" else np.float64)
        return torch.from_numpy(pairs.view(np.complex64 if name == "cfloat" else np.complex128)[..., 0])
    if name in _FLOAT:  # numpy's cast and check cost a few microseconds less per request than torch's
        return torch.from_numpy(np.ascontiguousarray(_floats(array, _FLOAT[name], name, values)))
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(DTYPES[name])  # numpy has no bfloat16
    bad = ~torch.isfinite(tensor)
    if bad.any():
        raise InputError(_overflow(*_sent_at(values, int(bad.flatten().nonzero()[0])), name))
    return tensor


def _integers(array: np.ndarray, name: str, values: list) -> np.ndarray:
    kind = array.dtype.kind
    if kind == "f":
        whole = np.isfinite(array) & (array == np.trunc(array))
        if not whole.all():
            place, sent = _sent_at(values, int(np.flatnonzero(~whole)[0]))
            raise InputError(f"{place}: {name} expects integers, got {_number(sent)}")
    if kind == "O":
        return _exact_integers(values, array.shape, name)
    low, high = array.min(), array.max()
    if kind == "f" and (low <= -_EXACT_IN_DOUBLE or high >= _EXACT_IN_DOUBLE):
        # A float literal among integers makes np.array round every integer to float64, and beyond 2**53 that
        # loses some: read such values again from the lists as sent, as Python ints.
        return _exact_integers(values, array.shape, name)
    info = np.iinfo(_INTEGER[name])
    # Compared as Python ints: exact for int64 and uint64 arrays, and for float64 below 2**53.
    if int(low) < info.min or int(high) > info.max:
        index = int(np.argmin(array)) if int(low) < info.min else int(np.argmax(array))
        place, sent = _sent_at(values, index)
        raise InputError(f"{place}: {_number(sent)} is out of range for {name} [{info.min}, {info.max}]")
    return array.astype(_INTEGER[name])


def _exact_integers(values: list, shape: tuple[int, ...], name: str) -> np.ndarray:
    """The slow path of ``_integers``: every value as sent, as a Python int."""
    info = np.iinfo(_INTEGER[name])
    exact = []
    for index, sent in enumerate(_flatten(values, len(shape))):
        if isinstance(sent, float) and not sent.is_integer():
            raise InputError(f"{_place(index, shape)}: {name} expects integers, got {_number(sent)}")
        if isinstance(sent, float) and -_EXACT_IN_DOUBLE < sent < _EXACT_IN_DOUBLE:
            exact.append(int(sent))
            continue
        number = int(sent)
        if number == info.min == -(2**63) and isinstance(sent, float):
            # orjson reads a JSON integer below -2**63 as a float, and the 1024 next to it round to exactly
            # -2**63: taken as long's minimum, they would arrive as a value nobody sent.
            raise InputError(
                f"{_place(index, shape)}: {_number(sent)} is out of range for long: JSON integers below {info.min} "
                f"are read as this float; send {info.min} as an integer"
            )
        if isinstance(sent, float) and info.min <= number <= info.max:
            # A float literal this large is the double nearest to what was written (9007199254740993.0 reads as
            # ...992): which integer was meant is lost. Integer literals of this size arrive exactly.
            raise InputError(
                f"{_place(index, shape)}: {_number(sent)} is a float literal beyond 2**53, where a double does not "
                f"hold every integer; send {name} values this large as integer literals (no fraction, no exponent)"
            )
        if number < info.min or number > info.max:
            place = _place(index, shape)
            raise InputError(f"{place}: {_number(sent)} is out of range for {name} [{info.min}, {info.max}]")
        exact.append(number)
    return np.array(exact, dtype=_INTEGER[name]).reshape(shape)


def _doubles(array: np.ndarray, name: str, values: list) -> np.ndarray:
    """An object array of Python numbers as float64, refusing integers beyond it."""
    try:
        return array.astype(np.float64)
    except OverflowError:
        for index, sent in enumerate(array.flat):
            try:
                float(sent)
            except OverflowError:
                raise InputError(f"{_place(index, array.shape)}: {_number(sent)} overflows {name}") from None
        raise


def _floats(array: np.ndarray, dtype: type, name: str, values: list) -> np.ndarray:
    with np.errstate(over="ignore"):
        cast = array.astype(dtype, copy=False)
    finite = np.isfinite(cast)
    if not finite.all():
        raise InputError(_overflow(*_sent_at(values, int(np.flatnonzero(~finite)[0])), name))
    return cast


def _overflow(place: str, sent: Any, name: str) -> str:
    try:
        finite = math.isfinite(sent)
    except OverflowError:  # an integer beyond float64
        finite = True
    return f"{place}: {_number(sent)} {'overflows' if finite else 'is not a finite number for'} {name}"


def _largest(dtype: torch.dtype) -> float:
    largest = _LARGEST.get(dtype)
    if largest is None:
        largest = (torch.finfo if dtype.is_floating_point else torch.iinfo)(dtype).max
    return largest


def _innermost_lists(values: list, ndim: int) -> list:
    rows = [values]
    for _ in range(ndim - 1):
        rows = list(itertools.chain.from_iterable(rows))
    return rows


def _flatten(values: list, ndim: int) -> list:
    return list(itertools.chain.from_iterable(_innermost_lists(values, ndim)))


def _place(index: int, shape: tuple[int, ...]) -> str:
    return "values" + "".join(f"[{i}]" for i in np.unravel_index(index, shape))


def _sent_at(values: list, index: int) -> tuple[str, Any]:
    """The place and the value as sent of element ``index`` (C order) of rectangular ``values``."""
    shape = []
    item: Any = values
    while isinstance(item, list) and item:
        shape.append(len(item))
        item = item[0]
    item = values
    for i in np.unravel_index(index, shape):
        item = item[i]
    return _place(index, tuple(shape)), item


def _check_shape(shape: Any) -> None:
    if not isinstance(shape, list):
        raise InputError(f"shape: expected a list of non-negative integers, got {json_type(shape)}")
    if len(shape) > MAX_RANK:
        raise InputError(f"shape: {too_many_dimensions(len(shape))}")
    if not all(type(n) is int and n >= 0 for n in shape):
        raise InputError("shape: expected a list of non-negative integers")


def _reshape(tensor: torch.Tensor, shape: list[int], complex_pairs: bool) -> torch.Tensor:
    if tensor.dim() > 1 and list(tensor.shape) != shape:
        # Neither the original service (it ignored `shape`) nor infernet-ml 1.x (it refused values whose nesting
        # differs from `shape`) reshaped nested values: a nesting that disagrees with `shape` is a client's mistake.
        what = "complex values" if complex_pairs else "values"
        raise InputError(
            f"shape: {shape} does not match the shape of the nested {what}, {list(tensor.shape)}; "
            "send values nested as `shape` says, or flat"
        )
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
            if not isinstance(item, (list, int, float)):
                return f"{path}: expected a number, got {_json_type(item)}"
    else:
        return f"values: nested deeper than {_MAX_DEPTH} levels"
    return "values: not a rectangular array of numbers"


def _json_type(value: Any) -> str:
    if isinstance(value, str):
        return f"a string ({json_text(value, 22)})"
    return json_type(value)


def _number(value: Any) -> str:
    """A number as the request wrote it: an integer exactly, a float as the shortest text that reads back as it."""
    if isinstance(value, (int, np.integer)):
        value = int(value)
        # Python refuses to write integers of more than 4300 digits, and nobody reads them in a message.
        return str(value) if value.bit_length() <= 256 else f"an integer of {value.bit_length()} bits"
    return repr(float(value))
