"""The contract's tensor vocabulary: every dtype in and out, and every way values can fail to fit."""

import math

import numpy as np
import pytest
import torch

from api.contract import DTYPE_NAMES
from workflows.errors import InputError
from workflows.tensors import DTYPES, decode, encode, encode_output

SAMPLES = {
    "float": [[1.5, -2.0], [0.25, 3.0]],
    "double": [[1.0380048, 0.5586108], [1.1037828, 1.712096]],
    "cfloat": [[[1.0, 2.0], [3.0, -4.0]]],
    "cdouble": [[[0.5, 0.25]], [[-1.0, 8.0]]],
    "half": [[1.0, 2.5, -65504.0]],
    "bfloat16": [[1.0, 0.5, -3.0]],
    "uint8": [[0, 255, 7]],
    "int8": [[-128, 127, 0]],
    "short": [[-32768, 32767]],
    "int": [[-(2**31), 2**31 - 1]],
    "long": [[-(2**63), 2**63 - 1]],
    "bool": [[True, False], [False, True]],
}


def test_every_contract_dtype_has_a_torch_dtype():
    assert set(SAMPLES) == set(DTYPE_NAMES) == set(DTYPES)


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_round_trip_keeps_dtype_shape_and_values(name):
    tensor = decode({"dtype": name, "values": SAMPLES[name]})
    assert tensor.dtype == DTYPES[name]
    encoded = encode(tensor)
    assert encoded["dtype"] == name
    assert encoded["values"].tolist() == SAMPLES[name]
    expected_shape = list(np.array(SAMPLES[name]).shape)
    if name in ("cfloat", "cdouble"):
        expected_shape = expected_shape[:-1]  # the innermost [real, imag] pair is one complex element
    assert encoded["shape"] == expected_shape == list(tensor.shape)


def test_complex_pairs_become_complex_numbers():
    tensor = decode({"dtype": "cdouble", "values": [[1.0, 2.0], [3.0, -4.0]]})
    assert tensor.tolist() == [complex(1, 2), complex(3, -4)]


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"dtype": "double", "values": [[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3]]},
            "values: row 2 has 3 elements, expected 4",
        ),
        ({"dtype": "double", "values": [[[1, 2]], [[1, 2, 3]]]}, "values[1][0]: has 3 elements, expected 2"),
        ({"dtype": "double", "values": [[1, 2], 3]}, "values[1]: expected a list"),
        ({"dtype": "double", "values": [[1, "x"]]}, "values[0][1]: expected a number, got a string"),
        ({"dtype": "double", "values": [[1, None]]}, "values[0][1]: expected a number, got null"),
        ({"dtype": "double", "values": [{"a": 1}]}, "values[0]: expected a number, got an object"),
        ({"dtype": "double", "values": 3.0}, "values: expected a (nested) list of numbers"),
        ({"dtype": "double", "values": []}, "values: empty"),
        ({"dtype": "double", "values": [[]]}, "values: empty"),
        ({"dtype": "double"}, "values: missing"),
        ({"dtype": "quad", "values": [1]}, "dtype: unknown dtype 'quad'"),
        ({"values": [1]}, "dtype: unknown dtype None"),
        ({"dtype": "int", "values": [1.5]}, "int expects integers, got a fraction"),
        ({"dtype": "int", "values": [2**31]}, "2147483648 is out of range for int"),
        ({"dtype": "uint8", "values": [256]}, "256 is out of range for uint8"),
        ({"dtype": "uint8", "values": [-1]}, "-1 is out of range for uint8"),
        ({"dtype": "int8", "values": [-129]}, "-129 is out of range for int8"),
        ({"dtype": "short", "values": [40000]}, "40000 is out of range for short"),
        ({"dtype": "long", "values": [2**64 + 1]}, "out of range"),
        ({"dtype": "long", "values": [True, False]}, "long expects numbers, got true/false"),
        ({"dtype": "float", "values": [True]}, "float expects numbers, got true/false"),
        ({"dtype": "bool", "values": [2]}, "bool accepts only true/false or 0/1"),
        ({"dtype": "bool", "values": [0.5]}, "bool accepts only true/false or 0/1"),
        ({"dtype": "half", "values": [70000.0]}, "a value overflows half"),
        ({"dtype": "float", "values": [1e39]}, "a value overflows float"),
        ({"dtype": "bfloat16", "values": [1e39]}, "a value overflows bfloat16"),
        ({"dtype": "cfloat", "values": [1.0, 2.0, 3.0]}, "[real, imag] pairs"),
        ({"dtype": "cfloat", "values": [[1.0, 2.0, 3.0]]}, "[real, imag] pairs"),
        ({"dtype": "float", "values": [1, 2, 3], "shape": [2, 2]}, "shape: [2, 2] holds 4 elements but values has 3"),
        ({"dtype": "float", "values": [1, 2], "shape": [2, -1]}, "shape: expected a list of non-negative integers"),
        ({"dtype": "float", "values": [1, 2], "shape": "2"}, "shape: expected a list of non-negative integers"),
        ({"dtype": "float", "values": [1, 2], "shape": [0]}, "shape: [0] holds 0 elements"),
        ("not an object", "data: expected an object"),
    ],
)
def test_refusals_say_what_and_where(data, message):
    with pytest.raises(InputError) as refused:
        decode(data)
    assert message in str(refused.value)
    assert refused.value.status == 400


def test_values_nested_too_deep_are_refused():
    values: list = [1.0]
    for _ in range(40):
        values = [values]
    with pytest.raises(InputError, match="nested deeper than"):
        decode({"dtype": "float", "values": values})


def test_element_limit():
    with pytest.raises(InputError, match="1000 elements exceed the limit of 999"):
        decode({"dtype": "float", "values": [0.0] * 1000}, max_elements=999)
    assert decode({"dtype": "float", "values": [0.0] * 999}, max_elements=999).numel() == 999


def test_shape_reshapes_flat_values():
    tensor = decode({"dtype": "long", "values": [1, 2, 3, 4, 5, 6], "shape": [2, 3]})
    assert tensor.tolist() == [[1, 2, 3], [4, 5, 6]]
    nested = decode({"dtype": "float", "values": [[1, 2], [3, 4]], "shape": [4]})
    assert nested.tolist() == [1, 2, 3, 4]


def test_flat_complex_values_with_shape_are_pairs():
    tensor = decode({"dtype": "cfloat", "values": [1, 2, 3, 4], "shape": [2]})
    assert tensor.tolist() == [complex(1, 2), complex(3, 4)]


def test_integral_floats_fit_integer_dtypes_and_bool_accepts_0_and_1():
    assert decode({"dtype": "long", "values": [1.0, -2.0]}).tolist() == [1, -2]
    assert decode({"dtype": "bool", "values": [0, 1, 1]}).tolist() == [False, True, True]


def test_extra_keys_are_ignored():
    tensor = decode({"dtype": "double", "values": [[1.0]], "bot": "\U0001f60c hello"})
    assert tensor.tolist() == [[1.0]]


def test_non_finite_outputs_stay_non_finite_for_the_writer():
    encoded = encode(torch.tensor([1.0, math.nan, math.inf]))
    values = encoded["values"].tolist()
    assert values[0] == 1.0 and math.isnan(values[1]) and math.isinf(values[2])


def test_unusual_output_dtypes_are_written_in_the_vocabulary():
    assert encode(torch.tensor([1, 2], dtype=torch.uint16))["dtype"] == "long"
    assert encode(torch.tensor([1.0], dtype=torch.float8_e4m3fn))["dtype"] == "double"


def test_structured_outputs_encode_each_tensor():
    out = encode_output({"logits": torch.tensor([[1.0]]), "labels": ["a"], "pair": (torch.tensor([1]), 2)})
    assert out["logits"]["dtype"] == "float" and out["labels"] == ["a"]
    assert out["pair"][0]["dtype"] == "long" and out["pair"][1] == 2
