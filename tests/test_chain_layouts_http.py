"""CHAIN data and the infernet-ml 2.0 layout over HTTP, against a real ``bentoml serve`` of a float32 model that
answers its input unchanged (one tensor) or several tensors (tests/models.py ``Outputs``): what the layouts hold,
what they cannot hold (422, saying both), the values as a contract reads them, and errors that name the value as
the client sent it (docs/contract.md, CHAIN and section 5). Bodies are built with eth-abi; nothing is mocked."""

from __future__ import annotations

import asyncio
import json
import struct

import aiohttp
import numpy as np
import pytest
import requests
import torch
from eth_abi import decode, encode

from public.infernet_ml_layouts import encode_vector_v1, encode_vector_v2
from tests.fixtures.server import Server, serving
from tests.models import Outputs, save
from tests.reliability_support import assert_contract_error

INT256_MAX = 2**255 - 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("outputs")
    path = save(Outputs(), tmp / "outputs.pt", "pickle", torch.zeros(1, 2))
    with serving({"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": str(path)})}, tmp) as running:
        yield running


def int256_hex(fixed: list[int]) -> str:
    return encode(["int256[]"], [fixed]).hex()


V1_HEAD = ["uint8", "string", "string", "string", "bytes"]


def v1_hex(values: list[float]) -> str:
    vector = encode_vector_v1("double", [1, len(values)], values)
    return encode(["uint8", "string", "string", "string", "bytes"], [0, "", "", "", vector]).hex()


def v2_hex(values: list[float]) -> str:
    return encode(["bytes", "bytes"], [b"", encode_vector_v2("double", [1, len(values)], values)]).hex()


def chain(server: Server, hex_data: str) -> requests.Response:
    return server.post({"source": 0, "destination": 0, "data": hex_data})


def int256_answer(response: requests.Response) -> list[int]:
    assert response.status_code == 200, response.text
    (numbers,) = decode(["int256[]"], bytes.fromhex(response.json()["raw_output"]))
    return list(numbers)


# F2, F10: an answer of several tensors is one that the CHAIN answers and the 2.0 answer cannot hold.


@pytest.mark.parametrize(
    ("features", "holds"), [(3, "2 tensors (a list)"), (5, "2 tensors (an object with keys scaled, total)")]
)
def test_several_tensors_are_a_422_in_every_layout_that_holds_one(server, features, holds):
    row = [0.5] * features
    fixed = [5 * 10**17] * features
    for hex_data, layout_holds in [
        (int256_hex(fixed), "the int256[] CHAIN answer holds the numbers of one tensor"),
        (v1_hex(row), "a 1.x CHAIN answer holds one vector"),
        (v2_hex(row), "a 2.0 CHAIN answer holds one vector"),
    ]:
        body = assert_contract_error(chain(server, hex_data), 422)
        assert f"the answer holds {holds}; {layout_holds}" in body["description"], body
        assert "not numeric" not in body["description"]
    vector = {"dtype": 1, "shape": [1, features], "values": row}
    for data in (vector, {"input": vector}, {"model_id": None, "input": vector}):
        body = assert_contract_error(server.post({"source": 1, "data": data}), 422)
        assert f"the answer holds {holds}; a 2.0 answer holds one vector" in body["description"], body
    # Today's OFFCHAIN form holds them all: the model's tensors in our vocabulary.
    answer = server.post({"source": 1, "data": {"dtype": "float", "values": [row]}})
    assert answer.status_code == 200, answer.text
    tensors = answer.json() if isinstance(answer.json(), list) else list(answer.json().values())
    assert [t["values"] for t in tensors] == [[row], [0.5 * features]]


# F7: a floating output on chain is the decimal the OFFCHAIN answer prints, not its float64 widening.


def test_chain_writes_the_shortest_decimal_of_the_outputs_own_dtype(server):
    offchain = server.post({"source": 1, "data": {"dtype": "float", "values": [[0.1, 0.3]]}})
    assert offchain.json()["values"] == [[0.1, 0.3]]  # float32 0.1 prints as 0.1
    assert int256_answer(chain(server, int256_hex([10**17, 3 * 10**17]))) == [10**17, 3 * 10**17]
    # The 2.0 fixed-point answer (an OFFCHAIN 2.0 request answered on chain) takes the same decimal.
    response = server.post(
        {
            "source": 1,
            "destination": 0,
            "data": {"input": {"dtype": 1, "shape": [1, 2], "values": [0.1, 0.3]}, "output_arithmetic": "fixed_point"},
        }
    )
    assert response.status_code == 200, response.text
    words = decode(["uint8", "uint8", "uint8", "uint16[]", "int128[]"], bytes.fromhex(response.json()["raw_output"]))
    assert list(words[4]) == [10**17, 3 * 10**17]


# F9: a CHAIN value the model's dtype cannot hold is named as sent, at its place in the int256[].


def test_a_chain_value_that_does_not_fit_is_named_as_sent(server):
    for fixed, place in [([INT256_MAX, 10**18], 0), ([10**18, -INT256_MAX], 1)]:
        body = assert_contract_error(chain(server, int256_hex(fixed)), 400)
        assert body["description"] == (
            f"data[{place}]: {fixed[place]} (int256) does not fit float (the model's dtype)"
        ), body


# F9: bytes after the ABI payload are ignored in every layout, as infernet-ml's eth_abi decode ignored them.


def test_bytes_after_the_abi_payload_are_ignored_in_every_layout(server):
    for hex_data in (int256_hex([10**18, 2 * 10**18]), v1_hex([1.0, 2.0]), v2_hex([1.0, 2.0])):
        plain = chain(server, hex_data)
        assert plain.status_code == 200, plain.text
        for trailing in ("00", "00" * 32, "ff" * 40):
            padded = chain(server, hex_data + trailing)
            assert padded.status_code == 200, (trailing, padded.text)
            assert padded.json()["raw_output"] == plain.json()["raw_output"]
    # The vector inside the 2.0 bytes too.
    vector = encode_vector_v2("double", [1, 2], [1.0, 2.0]) + bytes(32)
    response = chain(server, encode(["bytes", "bytes"], [b"", vector]).hex())
    assert response.status_code == 200, response.text


# F1: the 2.0 unsigned codes keep the declared dtype's range, though our dtype for them is wider.


@pytest.mark.parametrize(
    ("code", "values", "says"),
    [
        (10, [70000, 1], "values[0]: 70000 is out of range for uint16 [0, 65535]"),
        (10, [1, -1], "values[1]: -1 is out of range for uint16 [0, 65535]"),
        (11, [-5, 1], "values[0]: -5 is out of range for uint32 [0, 4294967295]"),
        (11, [2**32, 1], "values[0]: 4294967296 is out of range for uint32 [0, 4294967295]"),
        (12, [-5, 1], "values[0]: -5 is out of range for uint64 [0, 18446744073709551615]"),
        (12, [2**63, 1], "values[0]: 9223372036854775808 (uint64) does not fit long, the widest integer dtype"),
        (10, [1.5, 1], "values[0]: uint16 expects integers, got 1.5"),
        (10, [True, 1], "values[0]: uint16 expects numbers, got true"),
    ],
)
def test_unsigned_2_0_codes_keep_their_range(server, code, values, says):
    for data in ({"dtype": code, "shape": [1, 2], "values": values}, {"input": {"dtype": code, "values": values}}):
        body = assert_contract_error(server.post({"source": 1, "data": data}), 400)
        assert body["description"] == says, body


def test_unsigned_2_0_codes_take_their_whole_range_and_no_more(server):
    for code, high in [(10, 2**16 - 1), (11, 2**32 - 1), (12, 2**63 - 1)]:
        beyond = server.post({"source": 1, "data": {"dtype": code, "shape": [1, 2], "values": [high + 1, 0]}})
        assert_contract_error(beyond, 400)
        response = server.post({"source": 1, "data": {"dtype": code, "shape": [1, 2], "values": [high, 0]}})
        if high < 2**24:  # float32, the model's dtype, holds it exactly: the float model answers float32 (code 1)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert (answer["dtype"], answer["shape"], answer["values"]) == (1, [1, 2], [float(high), 0.0])
        else:  # within the declared range, but the cast to float32 would round it
            body = assert_contract_error(response, 400)
            assert "does not fit float (the model's dtype)" in body["description"], body


def test_integer_keys_and_sparse_outputs_are_answered_not_500(server):
    # A model's dict with integer keys and a sparse tensor were 500s, the service's own fault (explorer P5).
    keyed = server.post({"source": 1, "data": {"dtype": "float", "values": [[1, 2, 3, 4, 5, 6]]}})
    assert keyed.status_code == 200, keyed.text
    assert keyed.json() == {
        "1": {"dtype": "float", "shape": [1, 6], "values": [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]},
        "2": {"dtype": "float", "shape": [1], "values": [21.0]},
    }
    sparse = server.post({"source": 1, "data": {"dtype": "float", "values": [[0, 2, 0, 0, 5, 0, 7]]}})
    assert sparse.status_code == 200, sparse.text
    assert sparse.json() == {"dtype": "float", "shape": [1, 7], "values": [[0.0, 2.0, 0.0, 0.0, 5.0, 0.0, 7.0]]}


def test_a_model_that_raises_systemexit_fails_only_its_own_request(server):
    # SystemExit is no Exception: it failed every request batched with the one that raised it (explorer N2).
    from tests.test_batching_http import fire_together

    bodies = [{"source": 1, "data": {"dtype": "float", "values": [[i + 0.5] * 8]}} for i in range(16)]
    bodies[5] = {"source": 1, "data": {"dtype": "float", "values": [[13.0] * 8]}}
    for _ in range(2):  # two rounds: each may batch the bad request with others
        responses = fire_together(server, bodies)
        for i, response in enumerate(responses):
            if i == 5:
                body = assert_contract_error(response, 422)
                assert "it raised SystemExit(13)" in body["description"], body
            else:
                assert response.status_code == 200, response.text
                assert response.json()["values"] == [[i + 0.5] * 8]


# Explorer P7: a dtype outside the vocabulary is answered as the narrowest vocabulary dtype that holds every value
# exactly, in every layout; a layout with a code of the output's own dtype (2.0, the protocol) answers in that.

WIDENED_ROWS = {
    "uint16": [0, 7, 65535, 0, 1, 2, 3, 4, 5],
    "uint32": [1, 7, 65535, 70000, 2**24, 2, 3, 4, 5],
    "uint64": [2, 7, 65535, 70000, 2**24, 2, 3, 4, 5],
    "float8_e4m3fn": [3, 0.1015625, 448, 0, 1, 2, 0.5, -1, 240],  # each one a float8 value
    "complex32": [4, 0.5, -2, 0, 1, 2, 3, 65504, 0.25],
}
# own dtype -> (today's and 1.x's name, 2.0 code, the protocol's datatype or None)
WIDENED_AS = {
    "uint16": ("int", 10, "UINT16"),
    "uint32": ("long", 11, "UINT32"),
    "uint64": ("long", 12, "UINT64"),
    "float8_e4m3fn": ("half", 0, "FP16"),
    "complex32": ("cfloat", 13, None),
}
V2_WORDS = {10: "uint16", 11: "uint32", 12: "uint64", 0: "int16", 13: "uint64"}


@pytest.mark.parametrize("own", list(WIDENED_ROWS))
def test_a_dtype_outside_the_vocabulary_is_widened_alike_in_every_layout(server, own):
    row = WIDENED_ROWS[own]
    name, code, datatype = WIDENED_AS[own]
    values = [[v, 0.0] for v in row] if name == "cfloat" else row
    response = server.post({"source": 1, "data": {"dtype": "float", "values": [row]}})  # today's form
    assert response.status_code == 200, response.text
    assert response.json() == {"dtype": name, "shape": [1, 9], "values": [values]}
    # 1.x's envelope: labelled with the request's dtype, values flat (complex pairs keep their own name)
    response = server.post({"source": 1, "data": {"input": {"dtype": "float", "shape": [1, 9], "values": [row]}}})
    assert response.status_code == 200, response.text
    assert response.json() == {"dtype": "cfloat" if name == "cfloat" else "float", "shape": [1, 9], "values": values}
    response = server.post({"source": 1, "data": {"dtype": 1, "shape": [1, 9], "values": row}})  # 2.0
    assert response.status_code == 200, response.text
    assert response.json() == {"dtype": code, "shape": [1, 9], "values": values}
    response = chain(server, v2_hex(row))
    assert response.status_code == 200, response.text
    types = ["uint8", "uint8", "uint8", "uint16[]", f"{V2_WORDS[code]}[]"]
    arithmetic, _, written_code, shape, words = decode(types, bytes.fromhex(response.json()["raw_output"]))
    assert (arithmetic, written_code, list(shape)) == (0, code, [1, 9])
    if own.startswith("uint"):
        assert list(words) == row
    v2 = {"inputs": [{"name": "x", "shape": [1, 9], "datatype": "FP32", "data": row}]}
    response = requests.post(f"{server.url}/v2/models/model/infer", json=v2, timeout=30)
    if datatype is None:
        assert response.status_code == 422, response.text
    else:
        assert response.status_code == 200, response.text
        [output] = response.json()["outputs"]
        assert output["datatype"] == datatype and output["data"] == row


def test_a_fixed_point_overflow_names_the_value_in_its_own_dtype(server):
    # bfloat16 3.3e38 widened to float64 is 3.2964854295465914e+38; the fixed-point value is its shortest decimal
    row = [5, 3.3e38, 0, 0, 0, 0, 0, 0, 0]
    data = {"input": {"dtype": 1, "shape": [1, 9], "values": row}, "output_arithmetic": "fixed_point"}
    body = assert_contract_error(server.post({"source": 1, "destination": 0, "data": data}), 422)
    assert body["description"].endswith("output: 3.3e+38 times 10**18 does not fit int128"), body


def test_a_complex_answer_to_the_int256_chain_answer_is_a_422_saying_why(server):
    # E6: complex [real, imag] pairs came out as interleaved reals, two numbers per value, with no sign of it.
    row = WIDENED_ROWS["complex32"]  # the model answers complex32, widened to cfloat
    for request in (
        {"source": 1, "destination": 0, "data": {"dtype": "float", "values": [row]}},  # OFFCHAIN in, CHAIN out
        {"source": 0, "destination": 0, "data": int256_hex([int(v * 10**18) for v in row])},  # int256[] in and out
    ):
        body = assert_contract_error(server.post(request), 422)
        assert (
            "the model's output is complex (cfloat); the int256[] CHAIN answer holds real numbers only"
            in (body["description"])
        ), body
    # 1.x answered in the request's dtype (a contract decodes its fixed types): a double vector cannot hold them.
    body = assert_contract_error(chain(server, v1_hex(row)), 422)
    assert "complex values (cfloat) cannot be written as double, the request's dtype" in body["description"], body


# C3: infernet-ml 1.x answered in the dtype the request named (TorchInferenceResult's values, flattened, labelled
# with the request's dtype; on chain encode_vector(request dtype, ...)), whatever the model's own dtype. A node
# client (aiohttp, as the Infernet node posts) reads the float32 model's answer to a double request as 1.x wrote it.


def test_1x_answers_are_in_the_requests_dtype(server):
    async def ask() -> list[tuple[int, dict]]:
        v1_long = encode(["uint8", "uint16[]", "int64[]"], [10, [1, 2], [1, 2]])
        requests_ = [
            {"source": 1, "data": {"input": {"dtype": "double", "shape": [1, 2], "values": [[0.1, 0.3]]}}},
            {
                "source": 1,
                "destination": 0,
                "data": {"input": {"dtype": "double", "shape": [1, 2], "values": [[0.1, 0.3]]}},
            },
            {"source": 0, "destination": 0, "data": v1_hex([0.1, 0.3])},
            {"source": 0, "destination": 0, "data": encode(V1_HEAD, [0, "", "", "", v1_long]).hex()},
        ]
        async with aiohttp.ClientSession() as session:
            answers = []
            for body in requests_:
                async with session.post(f"{server.url}/service_output", json=body) as response:
                    answers.append((response.status, await response.json()))
            return answers

    (s1, offchain), (s2, v1_out), (s3, v1_chain), (s4, v1_long_chain) = asyncio.run(ask())
    assert (s1, s2, s3, s4) == (200, 200, 200, 200)
    widened = [float(np.float32(0.1)), float(np.float32(0.3))]  # 0.10000000149011612: 1.x's tolist() of float32
    assert offchain == {"dtype": "double", "shape": [1, 2], "values": widened}
    bits = [struct.unpack(">Q", struct.pack(">d", v))[0] for v in widened]
    for answer in (v1_out, v1_chain):
        # A contract decodes (uint8, uint16[], uint64[]): the request's dtype double (code 1), not the model's float.
        assert decode(["uint8", "uint16[]", "uint64[]"], bytes.fromhex(answer["raw_output"])) == (
            1,
            (1, 2),
            tuple(bits),
        )
    assert decode(["uint8", "uint16[]", "int64[]"], bytes.fromhex(v1_long_chain["raw_output"])) == (10, (1, 2), (1, 2))
