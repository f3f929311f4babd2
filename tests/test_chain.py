"""CHAIN data: ABI int256[] of 18-decimal fixed-point numbers, both directions, checked with eth-abi itself."""

import numpy as np
import pytest
from eth_abi import decode, encode

from core.errors import RequestError
from public.chain import decode_input, encode_output


def test_decode_input_gives_a_double_row():
    hex_data = encode(["int256[]"], [[10**18, -(5 * 10**17), 1]]).hex()
    assert decode_input(hex_data) == {"dtype": "double", "shape": [1, 3], "values": [1.0, -0.5, 1e-18]}


def test_encode_output_round_trips_through_eth_abi():
    body = {"dtype": "float", "shape": [1, 3], "values": np.array([[0.1, -2.5, 3.0]], dtype=np.float64)}
    response = encode_output(body)
    assert set(response) == {"raw_input", "processed_input", "raw_output", "processed_output", "proof"}
    assert response["raw_input"] == response["processed_output"] == response["proof"] == ""
    assert not response["raw_output"].startswith("0x")
    (numbers,) = decode(["int256[]"], bytes.fromhex(response["raw_output"]))
    assert list(numbers) == [10**17, -(25 * 10**17), 3 * 10**18]


@pytest.mark.parametrize(
    "hex_data, status, message",
    [
        ("00", 400, "not an ABI-encoded int256[]"),
        (encode(["int256[]"], [[]]).hex(), 400, "the int256[] is empty"),
    ],
)
def test_bad_chain_input(hex_data, status, message):
    with pytest.raises(RequestError) as refused:
        decode_input(hex_data)
    assert refused.value.status == status and message in refused.value.description


def test_non_finite_output_cannot_go_on_chain():
    with pytest.raises(RequestError) as refused:
        encode_output({"dtype": "float", "shape": [1], "values": np.array([np.nan])})
    assert refused.value.status == 422


@pytest.mark.parametrize(
    "answer, holds",
    [
        ({"label": "cat"}, "an object with keys label"),
        (["cat"], "a list that is not a rectangular array of numbers"),
        ([[1, 2], [3]], "a list that is not a rectangular array of numbers"),
        (None, "null"),
    ],
)
def test_non_numeric_output_cannot_go_on_chain(answer, holds):
    # The model ran and the request was well-formed: the layout cannot hold this answer (422, not the service's 500).
    with pytest.raises(RequestError) as refused:
        encode_output(answer)
    assert refused.value.status == 422
    assert f"the answer holds {holds}; the int256[] CHAIN answer holds the numbers of one tensor" in str(
        refused.value.description
    )


def test_integer_outputs_encode_exactly():
    # Through float64, 2**53 + 1 would come out as 2**53 and int64's bounds as 2**63.
    longs = [2**53 + 1, 2**63 - 1, -(2**63), -3]
    outputs = [
        ({"dtype": "long", "shape": [1, 4], "values": np.array([longs], dtype=np.int64)}, longs),
        ({"dtype": "uint8", "shape": [2], "values": np.array([255, 0], dtype=np.uint8)}, [255, 0]),
        ({"dtype": "bool", "shape": [2], "values": np.array([True, False])}, [1, 0]),
        ([[2**53 + 1], [2**70]], [2**53 + 1, 2**70]),  # a workflow's own JSON: Python ints
    ]
    for body, expected in outputs:
        (numbers,) = decode(["int256[]"], bytes.fromhex(encode_output(body)["raw_output"]))
        assert list(numbers) == [n * 10**18 for n in expected]


@pytest.mark.parametrize(
    "answer, expected",
    [
        ([0.5, 2**53 + 1], [5 * 10**17, (2**53 + 1) * 10**18]),  # numpy reads float64: 2**53 * 10**18 before
        ([1.0, 2**70], [10**18, 2**70 * 10**18]),  # numpy reads objects, then float64 rounded 2**70's digits
        ([[0.1, 3], [2, 0.25]], [10**17, 3 * 10**18, 2 * 10**18, 25 * 10**16]),
        ({"dtype": "double", "shape": [2], "values": [-(2**60) - 1, 0.5]}, [(-(2**60) - 1) * 10**18, 5 * 10**17]),
    ],
)
def test_a_workflows_json_mixing_integers_and_floats_keeps_each_integer_exact(answer, expected):
    (numbers,) = decode(["int256[]"], bytes.fromhex(encode_output(answer)["raw_output"]))
    assert list(numbers) == expected


@pytest.mark.parametrize(
    "answer, says",
    [
        ({"dtype": "cfloat", "shape": [1], "values": np.array([[1.0, 2.0]], dtype=np.float32)}, "complex (cfloat)"),
        ({"dtype": "cdouble", "shape": [1], "values": np.array([[0.5, 0.0]])}, "complex (cdouble)"),
        ([True, 2.5], "mixes true/false with numbers"),  # a workflow's own JSON: numpy made true 1.0
        ([[1], [True]], "mixes true/false with numbers"),
    ],
)
def test_answers_the_int256_cannot_hold_exactly_are_refused(answer, says):
    with pytest.raises(RequestError) as refused:
        encode_output(answer)
    assert refused.value.status == 422 and says in refused.value.description


def test_true_and_false_alone_are_one_and_zero():
    # docs/contract.md: a bool output is 0 or 1 in 18-decimal fixed point, a JSON list of true/false too.
    (numbers,) = decode(["int256[]"], bytes.fromhex(encode_output([True, False])["raw_output"]))
    assert list(numbers) == [10**18, 0]
