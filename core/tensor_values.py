"""The contract's tensor values decoded with numpy alone: ``{"dtype": NAME, "shape": [..], "values": NESTED_LIST}``
-> an array of the named dtype, or an ``InputError`` that says what is wrong and where.

Both sides of the runner hop use it, so both decode alike. ``workflows/tensors.py`` ``decode`` (the runner: the
built-in workflows' ``preprocess``) makes a torch tensor of ``decode_array``'s array. On the default path an API worker
decodes a request's data first (``sent_tensor``) and sends the array across the hop as a ``SentTensor`` (protocol-5
pickle, its buffer out of band), so the runner's one process does not parse and check every value of every request
under its one GIL (docs/performance.md, section 27). Nothing here imports torch: the API workers never do.
"""

from __future__ import annotations

import itertools
import math
import pickle
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from core.errors import InputError, Outcome
from core.terms import DTYPE_NAMES, MAX_RANK, json_text, json_type, too_many_dimensions

INTEGER_DTYPES = {"uint8": np.uint8, "int8": np.int8, "short": np.int16, "int": np.int32, "long": np.int64}
INTEGER_RANGE = {name: (int(np.iinfo(t).min), int(np.iinfo(t).max)) for name, t in INTEGER_DTYPES.items()}
COMPLEX = frozenset({"cfloat", "cdouble"})
_FLOAT = {"float": np.float32, "double": np.float64, "half": np.float16}
_MAX_DEPTH = MAX_RANK  # nested values and a `shape` alike
# Below this magnitude float64 holds every integer exactly, so a float64 array of such values lost nothing.
_EXACT_IN_DOUBLE = 2**53
# Every bit but the sign and 1.0's exponent bits: a float64 with none of them set is ±0 or ±2**-k (0 <= k <= 1022), so
# this marks every value a true/false among numbers became (np.array reads them as 1.0/0.0), and rarely another.
_NOT_ZERO_OR_ONE = np.int64(~0x3FF0_0000_0000_0000 & 0x7FFF_FFFF_FFFF_FFFF)
_DOUBLE = np.dtype(np.float64)
# The largest finite value of each float dtype, squared: a float64 array whose sum of squares is at most this holds
# only finite values that the cast to that dtype keeps finite (_cast_keeps_finite).
_SQUARED_LARGEST = {
    np.float16: float(np.finfo(np.float16).max) ** 2,
    np.float32: float(np.finfo(np.float32).max) ** 2,
    np.float64: float(np.finfo(np.float64).max),  # its square is inf: any finite sum of squares will do
}
# Values; measured on the development box. Fewer than _TEST_FROM: a type scan costs less than the vectorised boolean
# test (~1.1 µs). Up to _SCAN_AT_MOST: where the test marks a place, a scan of every value costs less than looking
# at the marked ones.
_TEST_FROM = 16
_SCAN_AT_MOST = 100
# Values: up to this one sum of squares (np.vdot) costs less than casting under np.errstate and looking for
# non-finite results; above it OpenBLAS may wake its threads for the sum, and the cast's own check costs less.
_DOT_AT_MOST = 8192


@dataclass(slots=True, frozen=True)
class SentTensor:
    """A request's tensor as an API worker decoded it (``sent_tensor``): ``array``, of the request's dtype and shape
    (C order), and ``elements``, how many values the request sent (a complex value's two parts count two, as the
    element limit counts them). What the built-in workflows' ``preprocess`` receives in place of the request's
    ``data`` on the default path (workflows/base.py ``takes_sent_tensors``). On the runner the array is read-only
    (it lies in the call's received bytes): ``workflows/tensors.py`` ``decode`` copies it. A dataclass, so that
    core/crash_records.py ``request_digest`` reads it field by field, the same on both sides of the hop."""

    array: np.ndarray
    elements: int

    def __reduce__(self) -> tuple[Any, ...]:
        # The array's bytes, dtype and shape: numpy's own pickling costs ~6 µs more per request on each side of the
        # hop. A large array's bytes go as a pickle.PickleBuffer: out of band (no copy into the pickle) on the fast
        # path, in the pickle on the public path (core/model_call.py ``seal``).
        array = self.array
        data = pickle.PickleBuffer(array) if array.nbytes >= _OUT_OF_BAND_BYTES else array.tobytes()
        return (_sent_tensor, (data, array.dtype.str, array.shape, self.elements))

    def __repr__(self) -> str:
        return f"SentTensor({self.array.dtype}, shape={list(self.array.shape)})"


_OUT_OF_BAND_BYTES = 4096  # below this a copy into the pickle costs less than a buffer of its own


def _sent_tensor(data: Any, dtype: str, shape: tuple[int, ...], elements: int) -> SentTensor:
    return SentTensor(_array(data, dtype, shape), elements)


def reduce_array(array: np.ndarray) -> tuple[Any, ...]:
    """How the runner's answer pickles a numpy array (core/bentoml_seam.py ``pickled_answer``): one of fewer than
    ``_OUT_OF_BAND_BYTES`` bytes, in C order, of a numeric or boolean dtype, as its bytes, dtype and shape in the
    pickle; any other as numpy pickles it. numpy sends every contiguous array as a buffer of its own, out of band:
    for tiny's 16-byte answer that cost the runner ~1.1 µs more per request (docs/performance.md, section 28), and
    the API worker more to load. Loaded, both are read-only arrays of the same dtype, shape and values."""
    if array.nbytes < _OUT_OF_BAND_BYTES and array.dtype.kind in "biufc" and array.flags.c_contiguous:
        return (_array, (array.tobytes(), array.dtype.str, array.shape))
    return array.__reduce_ex__(5)


def _array(data: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(data, dtype).reshape(shape)


class NeedsValues(Exception):
    """The runner cannot check or describe a ``SentTensor`` without the values as the client wrote them (a limit
    lower than the API worker's, a cast that does not keep a value): the request is answered by sending its data as
    it came (workflows/base.py ``preprocess_all`` answers ``VALUES_NEEDED``)."""


# The runner's description (service.py ``describe``) says under this key whether its default workflow takes a
# ``SentTensor`` (workflows/base.py ``takes_sent_tensors``); the API workers send one only then.
TAKES_SENT_TENSORS = "takes_sent_tensors"
# The runner's answer to a ``SentTensor`` it cannot take (``NeedsValues``): status 0, which no HTTP answer has. The API
# worker then sends the request's data as it came and answers what the runner answers to that (public/app.py).
VALUES_NEEDED = Outcome(0, None, "the runner needs this request's values as sent")


def sent_tensor(data: Any, max_elements: int) -> SentTensor | None:
    """On an API worker's event loop: the request's ``data`` decoded as the runner's ``decode`` would, or None when
    it is not (bfloat16, which numpy lacks, and every request the decoder refuses: those go to the runner as they
    came, which answers them in today's words). Raises nothing."""
    try:
        name, array, elements = decode_array(data, max_elements)
        if name == "bfloat16":
            return None
        shape = requested_shape(array.shape, data, name)
        if shape is not None:
            array = array.reshape(shape)
    except Exception:  # the runner's decode says what is wrong, as for a request that was never decoded here
        return None
    return SentTensor(np.ascontiguousarray(array), elements)


def decode_array(data: Any, max_elements: int) -> tuple[str, np.ndarray, int]:
    """A request's data -> (its dtype name, its values as an array of that dtype, how many values were sent), at most
    ``max_elements`` values. The array has the shape the values were nested in (the caller reshapes it to
    ``requested_shape``); for bfloat16 it holds the values as numpy read them, for the caller to cast and check.
    Raises InputError saying what is wrong and where."""
    if not isinstance(data, dict):
        raise InputError("data: expected an object with 'dtype' and 'values'")
    if "dtype" not in data:
        raise InputError("dtype: missing")
    name = data["dtype"]
    if not isinstance(name, str) or name not in DTYPE_NAMES:
        raise InputError(f"dtype: unknown dtype {json_text(name)}; expected one of {', '.join(DTYPE_NAMES)}")
    if "values" not in data:
        raise InputError("values: missing")
    shaped = data.get("shape") is not None
    if shaped:
        _check_shape(data["shape"])  # before anything is built: torch would build any rank numpy cannot write back
    values = data["values"]
    array = _numeric_array(values, max_elements)
    if array.size == 0:
        raise InputError("values: empty")
    elements = array.size
    if name != "bool":
        _refuse_booleans(array, values, name)
    if shaped and name in COMPLEX and array.ndim == 1 and array.size % 2 == 0:
        array = array.reshape(-1, 2)  # flat complex values: real, imag, real, imag, ...
    return name, _fit(array, name, values), elements


def requested_shape(now: tuple[int, ...], data: dict[str, Any], name: str) -> list[int] | None:
    """The request's ``shape`` (checked by ``decode_array``), or None when it gives none; InputError when the
    values, of shape ``now`` as ``decode_array`` returned them, do not fill it. Never empty: ``decode_array`` refused
    empty values, and the shape holds as many."""
    shape = data.get("shape")
    if shape is None:
        return None
    complex_pairs = name in COMPLEX
    if len(now) > 1 and list(now) != shape:
        # Neither the original service (it ignored `shape`) nor infernet-ml 1.x (it refused values whose nesting
        # differs from `shape`) reshaped nested values: a nesting that disagrees with `shape` is a client's mistake.
        what = "complex values" if complex_pairs else "values"
        raise InputError(
            f"shape: {shape} does not match the shape of the nested {what}, {list(now)}; "
            "send values nested as `shape` says, or flat"
        )
    count, held = math.prod(shape), math.prod(now)
    if count != held:
        what = "complex values" if complex_pairs else "values"
        raise InputError(f"shape: {shape} holds {count} elements but {what} has {held}")
    return shape


def _fit(array: np.ndarray, name: str, values: list) -> np.ndarray:
    kind = array.dtype.kind
    if name == "bool":
        if kind != "b":
            fits = (array == 0) | (array == 1)
            if not fits.all():
                place, sent = sent_at(values, int(np.flatnonzero(~fits)[0]))
                raise InputError(f"{place}: bool accepts only true/false or 0/1, got {number_text(sent)}")
            array = array.astype(np.bool_)
        return array
    if name in INTEGER_DTYPES:
        return _integers(array, name, values)
    if kind == "O":
        array = _doubles(array, name, values)
    if name in COMPLEX:
        if array.ndim == 0 or array.shape[-1] != 2:
            raise InputError(f"values: {name} values travel as [real, imag] pairs on the innermost axis")
        parts = _floats(array, np.float32 if name == "cfloat" else np.float64, name, values)
        # A view of the [real, imag] pairs, not ``real + 1j * imag``: that sum turns a part of -0.0 into 0.0.
        pairs = np.ascontiguousarray(parts, dtype=np.float32 if name == "cfloat" else np.float64)
        return pairs.view(np.complex64 if name == "cfloat" else np.complex128)[..., 0]
    if name in _FLOAT:  # numpy's cast and check cost a few microseconds less per request than torch's
        return np.ascontiguousarray(_floats(array, _FLOAT[name], name, values))
    return np.ascontiguousarray(array)  # bfloat16: the caller casts (numpy has none) and checks


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
    elif array.size < _TEST_FROM:
        index = _first_boolean_in_rows(_innermost_lists(values, array.ndim), range(array.size // array.shape[-1]))
    else:
        # np.array reads true/false among numbers as 1/0 and keeps no trace of them; looking at every value's type
        # costs ~20 ns a value (as much as np.array itself). Only a value that decoded to exactly 0 or 1 can have
        # been a boolean, so one vectorised test clears the usual request, and only then are the lists as sent
        # looked at: all of a few values, or the places the test marks.
        maybe = _maybe_booleans(array)
        if maybe is None:
            return
        if array.size <= _SCAN_AT_MOST:
            index = _first_boolean_in_rows(_innermost_lists(values, array.ndim), range(array.size // array.shape[-1]))
        else:
            index = _first_boolean(values, maybe)
    if index is not None:
        place, sent = sent_at(values, index)
        raise InputError(f"{place}: {name} expects numbers, got {_json_type(sent)}")


def _maybe_booleans(array: np.ndarray) -> np.ndarray | None:
    """Of a numeric (int, uint or float) array: None when no value is 0 or 1, else a mask marking at least those."""
    if array.dtype == _DOUBLE:  # what np.array makes of Python floats: one bitwise operation, not two comparisons
        bits = array.view(np.int64) & _NOT_ZERO_OR_ONE
        if np.count_nonzero(bits) == array.size:
            return None
        return bits == 0
    if array.dtype.kind == "f":
        maybe = (array == 0) | (array == 1)
        return maybe if maybe.any() else None
    halves = array >> 1  # 0 for 0 and 1 only: one operation fewer than two comparisons
    if np.count_nonzero(halves) == array.size:  # count_nonzero: ~0.5 µs less than .all() on a small array
        return None
    return halves == 0


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


def _integers(array: np.ndarray, name: str, values: list) -> np.ndarray:
    kind = array.dtype.kind
    if kind == "f":
        whole = np.isfinite(array) & (array == np.trunc(array))
        if not whole.all():
            place, sent = sent_at(values, int(np.flatnonzero(~whole)[0]))
            raise InputError(f"{place}: {name} expects integers, got {number_text(sent)}")
    if kind == "O":
        return _exact_integers(values, array.shape, name)
    if kind == "i" and name == "long":  # numpy's widest signed integers are long's: nothing to check
        return array.astype(np.int64)
    low, high = np.minimum.reduce(array, axis=None), np.maximum.reduce(array, axis=None)
    if kind == "f" and (low <= -_EXACT_IN_DOUBLE or high >= _EXACT_IN_DOUBLE):
        # A float literal among integers makes np.array round every integer to float64, and beyond 2**53 that
        # loses some: read such values again from the lists as sent, as Python ints.
        return _exact_integers(values, array.shape, name)
    smallest, largest = INTEGER_RANGE[name]
    # Compared as Python ints: exact for int64 and uint64 arrays, and for float64 below 2**53.
    if int(low) < smallest or int(high) > largest:
        index = int(np.argmin(array)) if int(low) < smallest else int(np.argmax(array))
        place, sent = sent_at(values, index)
        raise InputError(f"{place}: {number_text(sent)} is out of range for {name} [{smallest}, {largest}]")
    return array.astype(INTEGER_DTYPES[name])


def _exact_integers(values: list, shape: tuple[int, ...], name: str) -> np.ndarray:
    """The slow path of ``_integers``: every value as sent, as a Python int."""
    info = np.iinfo(INTEGER_DTYPES[name])
    exact = []
    for index, sent in enumerate(_flatten(values, len(shape))):
        if isinstance(sent, float) and not sent.is_integer():
            raise InputError(f"{place_of(index, shape)}: {name} expects integers, got {number_text(sent)}")
        if isinstance(sent, float) and -_EXACT_IN_DOUBLE < sent < _EXACT_IN_DOUBLE:
            exact.append(int(sent))
            continue
        number = int(sent)
        if number == info.min == -(2**63) and isinstance(sent, float):
            # orjson reads a JSON integer below -2**63 as a float, and the 1024 next to it round to exactly
            # -2**63: taken as long's minimum, they would arrive as a value nobody sent.
            raise InputError(
                f"{place_of(index, shape)}: {number_text(sent)} is out of range for long: JSON integers below "
                f"{info.min} are read as this float; send {info.min} as an integer"
            )
        if isinstance(sent, float) and info.min <= number <= info.max:
            # A float literal this large is the double nearest to what was written (9007199254740993.0 reads as
            # ...992): which integer was meant is lost. Integer literals of this size arrive exactly.
            raise InputError(
                f"{place_of(index, shape)}: {number_text(sent)} is a float literal beyond 2**53, where a double does "
                f"not hold every integer; send {name} values this large as integer literals (no fraction, no exponent)"
            )
        if number < info.min or number > info.max:
            place = place_of(index, shape)
            raise InputError(f"{place}: {number_text(sent)} is out of range for {name} [{info.min}, {info.max}]")
        exact.append(number)
    return np.array(exact, dtype=INTEGER_DTYPES[name]).reshape(shape)


def _doubles(array: np.ndarray, name: str, values: list) -> np.ndarray:
    """An object array of Python numbers as float64, refusing integers beyond it."""
    try:
        return array.astype(np.float64)
    except OverflowError:
        for index, sent in enumerate(array.flat):
            try:
                float(sent)
            except OverflowError:
                raise InputError(f"{place_of(index, array.shape)}: {number_text(sent)} overflows {name}") from None
        raise


def _floats(array: np.ndarray, dtype: type, name: str, values: list) -> np.ndarray:
    if _cast_keeps_finite(array, dtype):  # the usual request: no np.errstate (~0.8 µs), no isfinite pass
        return array.astype(dtype, copy=False)
    with np.errstate(over="ignore"):
        cast = array.astype(dtype, copy=False)
    finite = np.isfinite(cast)
    if not finite.all():
        raise InputError(overflow_text(*sent_at(values, int(np.flatnonzero(~finite)[0])), name))
    return cast


def _cast_keeps_finite(array: np.ndarray, dtype: type) -> bool:
    """Whether every value of ``array`` is finite and stays finite (no overflow, so no warning) cast to the float
    ``dtype``. False may be wrong (``_floats`` then casts and looks at every value), True never is."""
    kind = array.dtype.kind
    if kind in "iu":  # every 64-bit integer lies within float32's range; half's maximum is 65504
        return dtype is not np.float16
    if array.dtype != _DOUBLE or array.size > _DOT_AT_MOST:
        return False
    # The sum of squares (one BLAS call, ~0.5 µs on a small array): inf or nan if any value is, and never below any
    # one square, as every term is non-negative and rounding is monotonic. So at most the largest value squared
    # means every |value| is at most the largest times (1 + 2**-53), which the cast rounds to the largest, not to
    # inf. A sum that overflows (values beyond ~1e154) only sends the request the long way.
    return bool(np.vdot(array, array) <= _SQUARED_LARGEST[dtype])


def overflow_text(place: str, sent: Any, name: str) -> str:
    try:
        finite = math.isfinite(sent)
    except OverflowError:  # an integer beyond float64
        finite = True
    return f"{place}: {number_text(sent)} {'overflows' if finite else 'is not a finite number for'} {name}"


def _innermost_lists(values: list, ndim: int) -> list:
    rows = [values]
    for _ in range(ndim - 1):
        rows = list(itertools.chain.from_iterable(rows))
    return rows


def _flatten(values: list, ndim: int) -> list:
    return list(itertools.chain.from_iterable(_innermost_lists(values, ndim)))


def place_of(index: int, shape: tuple[int, ...]) -> str:
    return "values" + "".join(f"[{i}]" for i in np.unravel_index(index, shape))


def sent_at(values: list, index: int) -> tuple[str, Any]:
    """The place and the value as sent of element ``index`` (C order) of rectangular ``values``."""
    shape = []
    item: Any = values
    while isinstance(item, list) and item:
        shape.append(len(item))
        item = item[0]
    item = values
    for i in np.unravel_index(index, shape):
        item = item[i]
    return place_of(index, tuple(shape)), item


def _check_shape(shape: Any) -> None:
    if not isinstance(shape, list):
        raise InputError(f"shape: expected a list of non-negative integers, got {json_type(shape)}")
    if len(shape) > MAX_RANK:
        raise InputError(f"shape: {too_many_dimensions(len(shape))}")
    if not all(type(n) is int and n >= 0 for n in shape):
        raise InputError("shape: expected a list of non-negative integers")


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


def number_text(value: Any) -> str:
    """A number as the request wrote it: an integer exactly, a float as the shortest text that reads back as it."""
    if isinstance(value, (int, np.integer)):
        value = int(value)
        # Python refuses to write integers of more than 4300 digits, and nobody reads them in a message.
        return str(value) if value.bit_length() <= 256 else f"an integer of {value.bit_length()} bits"
    return repr(float(value))
