"""InfernetInput (core/terms.py) validation through parse_input (public/app.py): what Infernet nodes send, and what is
refused with which message."""

import pytest

from core.errors import RequestError
from core.terms import PROOFS_NOT_SUPPORTED, Destination, Source, error_body
from public.app import parse_input


def test_offchain_and_chain_inputs_parse():
    offchain = parse_input({"source": 1, "data": {"dtype": "float", "values": [1]}, "unknown": "ignored"})
    assert offchain.source == Source.OFFCHAIN and offchain.destination == Destination.OFFCHAIN
    chain = parse_input({"source": 0, "data": " 0x00FF\n", "destination": 0, "requires_proof": False})
    assert chain.data == "00FF" and chain.destination == Destination.CHAIN


@pytest.mark.parametrize(
    "body, message",
    [
        ([1, 2], "body must be a JSON object, got an array"),
        ({"data": {}}, "source: Field required"),
        ({"source": 1}, "data: Field required"),
        ({"source": 2, "data": {}}, "source: Input should be 0 or 1"),
        ({"source": "1", "data": {}}, "source: must be an integer"),
        ({"source": True, "data": {}}, "source: must be an integer"),
        ({"source": 0, "data": {"a": 1}}, "data: CHAIN source needs a hex string"),
        ({"source": 1, "data": "00ff"}, "data: OFFCHAIN source needs a JSON object"),
        # The source's type is checked before the hex rules (a newcomer's "abc" was told about odd digits).
        ({"source": 1, "data": "abc"}, "data: OFFCHAIN source needs a JSON object"),
        ({"source": 1, "data": "xyz"}, "data: OFFCHAIN source needs a JSON object"),
        ({"source": 1, "data": ""}, "data: OFFCHAIN source needs a JSON object"),
        ({"source": 0, "data": "xyz"}, "data: must be a hex string"),
        ({"source": 0, "data": "abc"}, "data: hex string has an odd number of digits"),
        ({"source": 0, "data": ""}, "data: must be a hex string"),
        ({"source": 1, "data": [1]}, "data: must be a hex string (CHAIN) or a JSON object (OFFCHAIN)"),
        ({"source": 1, "data": {}, "requires_proof": True}, PROOFS_NOT_SUPPORTED),
        ({"source": 1, "data": {}, "requires_proof": "no"}, "requires_proof: Input should be a valid boolean"),
        ({"source": 1, "data": {}, "destination": 2}, "destination: STREAM (2) is not supported"),
        ({"source": 1, "data": {}, "destination": 3}, "destination: Input should be 0, 1 or 2"),
        ({"source": 1, "data": {}, "destination": None}, "destination: must be an integer"),
    ],
)
def test_refusals(body, message):
    with pytest.raises(RequestError) as refused:
        parse_input(body)
    assert refused.value.status == 400
    assert message in refused.value.description


def test_validation_errors_list_locations():
    with pytest.raises(RequestError) as refused:
        parse_input({"source": 5, "data": 7})
    assert {tuple(e["loc"]) for e in refused.value.errors} == {("source",), ("data",)}


@pytest.mark.parametrize(
    "body, loc",
    [
        ({"source": 1, "data": {}, "destination": 2}, ("destination",)),  # it had "loc": [] (explorer P8)
        ({"source": 1, "data": {}, "requires_proof": True}, ("requires_proof",)),
        ({"source": 0, "data": {"a": 1}}, ("data",)),
        ({"source": 1, "data": "00ff"}, ("data",)),
    ],
)
def test_refusals_of_a_field_name_it_in_loc(body, loc):
    with pytest.raises(RequestError) as refused:
        parse_input(body)
    assert [tuple(e["loc"]) for e in refused.value.errors] == [loc]


def test_error_body_has_string_code():
    assert error_body(413, "too big") == {"code": "413", "name": "Request Entity Too Large", "description": "too big"}
    assert error_body(400, "x", [{"loc": ["a"], "msg": "m"}])["errors"] == [{"loc": ["a"], "msg": "m"}]
