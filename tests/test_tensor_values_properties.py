"""Property test of the tensor decoder (core/tensor_values.py): many random requests of every numeric dtype, each
well formed or with exactly one fault at a random place, checked against what an independent, plain-Python
reading of the contract expects: the array's dtype, shape and every value, or the refusal's exact words and place.

It guards the decoder's fast paths (docs/performance.md, section 27): a vectorised test clears most requests without
looking at each value, so these requests mix in the inputs it must not clear: true/false among numbers, 0 and 1 and
powers of two (which the boolean test marks), each integer dtype's bounds and one past them, NaN and infinities, a
float dtype's largest value and the first that overflows it, integers given to float dtypes and integral or
fractional floats given to integer dtypes, irregular nesting, and sizes either side of the vectorised paths' limits.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from core.errors import InputError
from core.tensor_values import decode_array, sent_tensor

INTEGERS = {
    "uint8": (np.uint8, 0, 255),
    "int8": (np.int8, -128, 127),
    "short": (np.int16, -(2**15), 2**15 - 1),
    "int": (np.int32, -(2**31), 2**31 - 1),
    "long": (np.int64, -(2**63), 2**63 - 1),
}
FLOATS = {"half": np.float16, "float": np.float32, "double": np.float64}
NAMES = [*INTEGERS, *FLOATS, "bool"]
LIMIT = 10**6
# Sizes of the innermost axis: either side of 16 (the type scan's limit), the bench's 69, either side of 100 (where
# a scan of every value stops) and of 8192 (the sum of squares' limit).
WIDTHS = (1, 2, 3, 15, 16, 69, 100, 101, 8192, 8193)


def _float_value(rng: random.Random, dtype: type) -> float | int:
    """A value any float dtype keeps finite: the requests' common values and the edge ones."""
    largest = float(np.finfo(dtype).max)
    return rng.choice(
        [
            rng.uniform(-1, 1),
            rng.uniform(-1, 1),
            largest * rng.uniform(-1, 1),  # (uniform(-largest, largest) overflows for double)
            round(rng.uniform(-100, 100), 2),
            rng.randint(-min(2**53, int(largest)), min(2**53, int(largest))),  # an integer, exact in float64
            rng.randint(-3, 3),
            rng.choice([0.0, -0.0, 1.0, -1.0, 0.5, 0.25, 2.0**-1022, 5e-324, largest, -largest, 0, 1]),
        ]
    )


def _integer_value(rng: random.Random, low: int, high: int) -> int | float:
    return rng.choice(
        [
            rng.randint(low, high),
            rng.randint(max(low, -3), min(high, 3)),
            rng.choice([low, high, 0, 1]),
            float(rng.randint(max(low, -(2**24)), min(high, 2**24))),  # an integral float
        ]
    )


def _value(rng: random.Random, name: str) -> object:
    if name == "bool":
        return rng.choice([True, False, 0, 1, 0.0, 1.0])
    if name in FLOATS:
        return _float_value(rng, FLOATS[name])
    _, low, high = INTEGERS[name]
    return _integer_value(rng, low, high)


def _fault(rng: random.Random, name: str) -> tuple[object, str]:
    """A value ``name`` refuses and the words after its place that the refusal says."""
    if name == "bool":
        sent = rng.choice([2, -1, 0.5, 1.5, float("nan"), 2**70])
        return sent, f"bool accepts only true/false or 0/1, got {_text(sent)}"
    if rng.random() < 0.3:
        sent = rng.choice([True, False])
        return sent, f"{name} expects numbers, got {'true' if sent else 'false'}"
    if name in FLOATS:
        dtype = FLOATS[name]
        largest = float(np.finfo(dtype).max)
        if rng.random() < 0.5:
            sent = rng.choice([float("nan"), float("inf"), float("-inf")])
            return sent, f"{_text(sent)} is not a finite number for {name}"
        if dtype is np.float64:
            sent = rng.choice([10**400, -(10**400)])
            return sent, f"an integer of {abs(sent).bit_length()} bits overflows double"
        # The first values the cast rounds to infinity: half's 65520, float's 2**128 less half a unit; and far beyond.
        first = 65520.0 if dtype is np.float16 else 3.4028235677973366e38
        sent = rng.choice([first, -first, largest * 4, 1e300, 70000 if dtype is np.float16 else 2**200])
        return sent, f"{_text(sent)} overflows {name}"
    _, low, high = INTEGERS[name]
    kind = rng.randrange(3)
    if kind == 0:
        sent = rng.choice([low - 1, high + 1, high + 2**70, low - 2**70])
        return sent, f"{sent} is out of range for {name} [{low}, {high}]"
    sent = rng.choice([0.5, -1.5, 3.25, 1e-300]) if kind == 1 else rng.choice([float("nan"), float("inf")])
    return sent, f"{name} expects integers, got {_text(sent)}"


def _text(value: object) -> str:
    return str(value) if isinstance(value, int) else repr(value)


def _nested(flat: list, shape: list[int]) -> list:
    if len(shape) == 1:
        return list(flat)
    step = len(flat) // shape[0]
    return [_nested(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def _expected(flat: list, name: str, shape: list[int]) -> np.ndarray:
    """The array the contract promises, value by value in Python: each value as the nearest of the dtype."""
    if name == "bool":
        array = np.array([bool(v) for v in flat], dtype=np.bool_)
    elif name in FLOATS:
        array = np.array([float(v) for v in flat], dtype=np.float64).astype(FLOATS[name])
    else:
        array = np.array([int(v) for v in flat], dtype=INTEGERS[name][0])
    return array.reshape(shape)


def _place(index: int, shape: list[int]) -> str:
    return "values" + "".join(f"[{i}]" for i in np.unravel_index(index, shape))


def _request(rng: random.Random) -> tuple[dict, np.ndarray | str]:
    name = rng.choice(NAMES)
    width = rng.choice(WIDTHS[-2:] if rng.random() < 0.04 else WIDTHS[:-2])
    outer = [rng.choice([1, 2, 3]) for _ in range(rng.choice([0, 0, 1, 2, 3]) if width <= 130 else 0)]
    shape = [*outer, width]
    count = math.prod(shape)
    flat = [_value(rng, name) for _ in range(count)]
    if rng.random() < 0.25:  # the same value everywhere: all 0/1, all powers of two, all one integer...
        flat = [flat[0]] * count
    expected: np.ndarray | str
    if rng.random() < 0.45:
        index = rng.randrange(count)
        flat[index], words = _fault(rng, name)
        expected = f"{_place(index, shape)}: {words}"
    else:
        expected = _expected(flat, name, shape)
    values = _nested(flat, shape)
    if len(shape) in (2, 3) and len(values if len(shape) == 2 else values[0]) > 1 and rng.random() < 0.1:
        # One innermost list one value longer than its neighbours: refused at the first that differs from the first.
        rows, path = (values, "values: row {}") if len(shape) == 2 else (values[0], "values[0][{}]:")
        row = rng.randrange(len(rows))
        rows[row].append(rows[row][0])
        first, has, wanted = (1, width, width + 1) if row == 0 else (row, width + 1, width)
        expected = f"{path.format(first)} has {has} elements, expected {wanted}"
    return {"dtype": name, "values": values}, expected


@pytest.mark.parametrize("seed", range(8))
def test_random_requests_decode_to_the_values_sent_or_are_refused_in_the_contracts_words(seed):
    rng = random.Random(seed)
    for _ in range(250):
        data, expected = _request(rng)
        if isinstance(expected, str):
            with pytest.raises(InputError) as refused:
                decode_array(data, LIMIT)
            assert str(refused.value) == expected, data["dtype"]
            assert sent_tensor(data, LIMIT) is None  # the runner answers it, in the same words
            continue
        name, array, elements = decode_array(data, LIMIT)
        assert (name, array.dtype, array.shape, elements) == (
            data["dtype"],
            expected.dtype,
            expected.shape,
            expected.size,
        )
        np.testing.assert_array_equal(array, expected, strict=True)
        assert np.array_equal(np.signbit(array), np.signbit(expected)) if name in FLOATS else True  # -0.0 stays
        sent = sent_tensor(data, LIMIT)
        assert sent is not None and sent.elements == expected.size
        np.testing.assert_array_equal(sent.array, expected, strict=True)


@pytest.mark.parametrize("name", [*INTEGERS, *FLOATS])
@pytest.mark.parametrize("width", WIDTHS)
def test_a_boolean_anywhere_among_numbers_is_refused_at_its_place(name, width):
    # Among values that are all 0 and 1 (which the vectorised test cannot tell from booleans), or none of them.
    rng = random.Random(width)
    for filler in (0, 1, 0.0, 1.0, 2, 0.5, 3.0):
        if name in INTEGERS and isinstance(filler, float) and not filler.is_integer():
            continue
        for index in {0, width - 1, rng.randrange(width)}:
            values = [filler] * width
            values[index] = True
            with pytest.raises(InputError) as refused:
                decode_array({"dtype": name, "values": [values]}, LIMIT)
            assert str(refused.value) == f"values[0][{index}]: {name} expects numbers, got true"


@pytest.mark.parametrize("width", [3, 8193])  # the sum of squares' path, and the cast's own check
@pytest.mark.parametrize(
    ("name", "sent", "kept"),
    [
        ("half", 65519.0, 65504.0),  # rounds down to half's largest
        ("half", 65520.0, None),  # the first that rounds to infinity
        ("half", 70000, None),  # an integer: an int64 array, not a float64 one
        ("half", -65504, -65504.0),
        ("float", 3.4028235677973362e38, 3.4028234663852886e38),
        ("float", -3.4028235677973366e38, None),
        ("float", 2**128, None),
        ("double", 1.7976931348623157e308, 1.7976931348623157e308),
        ("double", -(2**1024), None),
    ],
)
def test_a_float_dtypes_largest_values_are_kept_and_the_first_beyond_refused(name, sent, kept, width):
    for filler in (1, 0.5):  # an integer array or a float one, where ``sent`` allows
        values = [filler] * (width - 1) + [sent]
        if kept is None:
            with pytest.raises(InputError) as refused:
                decode_array({"dtype": name, "values": values}, LIMIT)
            assert str(refused.value).startswith(f"values[{width - 1}]: ")
            assert str(refused.value).endswith(f"overflows {name}")
        else:
            _, array, _ = decode_array({"dtype": name, "values": values}, LIMIT)
            assert array[-1] == kept and np.isfinite(array).all()
