"""Numbers over HTTP arrive exactly as sent, or are refused with a 400 that names them (docs/contract.md).

Against real ``bentoml serve`` processes: the embedded float iris model, a TorchScript model that returns its
integer input unchanged, and one with half-precision parameters; all built here, none mocked.
"""

from __future__ import annotations

import contextlib
import json

import pytest
import requests
import torch
from eth_abi import decode, encode

from public.infernet_ml_layouts import encode_vector_v1, encode_vector_v2
from tests.fixtures.server import Server, serving
from tests.reliability_support import assert_contract_error

INTEGER_BOUNDS = {"uint8": (0, 255), "int8": (-128, 127), "short": (-(2**15), 2**15 - 1),
                  "int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}  # fmt: skip


class Same(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()  # keeps the dtype, and -0.0 (x + 0 would make it 0.0)


class HalfScale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1, dtype=torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def serve(model: torch.nn.Module, tmp, **kw_args) -> contextlib.AbstractContextManager[Server]:
    path = tmp / "model.pt"
    torch.jit.save(torch.jit.script(model.eval()), str(path))
    return serving({"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": str(path), **kw_args})}, tmp)


@pytest.fixture(scope="module")
def integer_server(tmp_path_factory):
    with serve(Same(), tmp_path_factory.mktemp("integers"), cast_inputs=False) as server:
        yield server


class FloatScale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


@pytest.fixture(scope="module")
def lowered_server(tmp_path_factory):
    """A float32 model the operator runs in float16 (KW_ARG ``precision``): the model computes in half."""
    with serve(FloatScale(), tmp_path_factory.mktemp("lowered"), precision="float16") as server:
        yield server


@pytest.fixture(scope="module")
def half_server(tmp_path_factory):
    with serve(HalfScale(), tmp_path_factory.mktemp("half")) as server:
        yield server


def post_raw(server: Server, body: str) -> requests.Response:
    """Posts JSON text as written, so literals like ``2e0``, ``true`` and 64-bit integers reach the service as is."""
    headers = {"content-type": "application/json"}
    return requests.post(f"{server.url}/service_output", data=body.encode(), headers=headers, timeout=30)


def offchain(dtype: str, values: str, destination: int = 1) -> str:
    return f'{{"source": 1, "destination": {destination}, "data": {{"dtype": "{dtype}", "values": {values}}}}}'


def refused(response: requests.Response, description: str) -> None:
    body = assert_contract_error(response, 400)
    assert description in body["description"], body


def test_integers_come_back_exactly_whatever_literals_share_the_row(integer_server):
    for name, (low, high) in INTEGER_BOUNDS.items():
        response = post_raw(integer_server, offchain(name, f"[[{low}, {high}, 2.0, 2e0]]"))
        assert response.status_code == 200, response.text
        assert f'"values":[[{low},{high},2,2]]' in response.text  # written exactly, not through a float
        assert response.json()["dtype"] == name
    response = post_raw(integer_server, offchain("long", "[[9007199254740993, 2.0]]"))
    assert response.status_code == 200 and response.json()["values"] == [[9007199254740993, 2]], response.text


@pytest.mark.parametrize(
    "dtype, values, description",
    [
        ("long", "[[9223372036854775808, 1.0]]", "values[0][0]: 9223372036854775808 is out of range for long"),
        ("long", "[[9223372036854775809, 1.0]]", "values[0][0]: 9223372036854775809 is out of range for long"),
        ("long", "[[1, 1e19]]", "values[0][1]: 1e+19 is out of range for long"),
        ("long", "[[-9223372036854775809, 1]]", "values[0][0]: -9.223372036854776e+18 is out of range for long"),
        ("uint8", "[[2.0, 256]]", "values[0][1]: 256 is out of range for uint8 [0, 255]"),
        ("int8", "[[-129, 2.0]]", "values[0][0]: -129 is out of range for int8"),
        # A float literal beyond 2**53 is the nearest double: 9007199254740993.0 arrived as ...992 (explorer F12).
        ("long", "[[1, 9007199254740993.0]]", "values[0][1]: 9007199254740992.0 is a float literal beyond 2**53"),
        ("long", "[[-1e17, 2]]", "values[0][0]: -1e+17 is a float literal beyond 2**53"),
        ("long", "[[true, 5]]", "values[0][0]: long expects numbers, got true"),
        ("int", "[[1, 2], [3, false]]", "values[1][1]: int expects numbers, got false"),
    ],
)
def test_integers_that_do_not_fit_are_refused_naming_what_was_sent(integer_server, dtype, values, description):
    refused(post_raw(integer_server, offchain(dtype, values)), description)


def test_integer_outputs_go_on_chain_exactly(integer_server):
    response = post_raw(integer_server, offchain("long", "[[9007199254740993, -9223372036854775808, 2.0]]", 0))
    assert response.status_code == 200, response.text
    (numbers,) = decode(["int256[]"], bytes.fromhex(response.json()["raw_output"]))
    assert list(numbers) == [9007199254740993 * 10**18, -(2**63) * 10**18, 2 * 10**18]


@pytest.mark.parametrize(
    "dtype, values, description",
    [
        ("double", "[[true, 0.5586108, 1.1037828, 1.712096]]", "values[0][0]: double expects numbers, got true"),
        ("long", "[[true, 5, 1, 1]]", "values[0][0]: long expects numbers, got true"),
        ("float", "[[1.0, 0.5, 1.1, 1.7], [1.0, 0.5, 1.1, false]]", "values[1][3]: float expects numbers, got false"),
        ("double", "[[true, false, true, true]]", "values[0][0]: double expects numbers, got true"),
    ],
)
def test_booleans_are_refused_for_numeric_dtypes(iris_server, dtype, values, description):
    refused(post_raw(iris_server, offchain(dtype, values)), description)


def test_a_value_the_cast_to_the_model_dtype_would_overflow_is_refused(iris_server):
    response = post_raw(iris_server, offchain("double", "[[1e308, 1e308, 1e308, 1e308]]"))
    refused(response, "values[0][0]: 1e+308 does not fit float (the model's dtype), cast from double")


def test_an_integer_the_model_dtype_would_round_is_refused(iris_server):
    # 16777217 reached the float model as 16777216 (explorer P2); 16777216 itself is exact in float.
    response = post_raw(iris_server, offchain("long", "[[1, 16777217, 2, 3]]"))
    refused(response, "values[0][1]: 16777217 does not fit float (the model's dtype), cast from long")
    assert post_raw(iris_server, offchain("long", "[[1, 16777216, 2, 3]]")).status_code == 200


@pytest.fixture(params=["fast path", "public path"])
def either_path(request):
    """The embedded iris model on BentoML's fast path and on its public path (INFERNET_FAST_PATH=0), where BentoML's
    client turned the values' own types into plain lists on the way to the runner (explorer K7)."""
    return request.getfixturevalue("iris_server" if request.param == "fast path" else "public_path_server")


@pytest.mark.parametrize("destination", [0, 1])
def test_chain_input_beyond_the_model_dtype_is_refused(either_path, destination):
    largest = 2**255 - 1  # int256's maximum: 5.8e58 in 18-decimal fixed point, beyond float's 3.4e38
    data = encode(["int256[]"], [[largest, 10**18, 10**18, 10**18]]).hex()
    response = either_path.post({"source": 0, "data": data, "destination": destination})
    # Named as the contract sent it: the int256 itself, at its place in the int256[].
    refused(response, f"data[0]: {largest} (int256) does not fit float (the model's dtype)")


def test_widened_values_are_named_as_sent_on_both_paths(either_path):
    uint32 = encode(["uint8", "uint8", "uint8", "uint16[]", "uint32[]"], [0, 18, 11, [1, 4], [4294967295, 1, 1, 1]])
    chain_v2 = encode(["bytes", "bytes"], [b"", uint32]).hex()
    refused(
        either_path.post({"source": 0, "data": chain_v2}),
        "values[0]: 4294967295 (uint32) does not fit float (the model's dtype)",
    )
    offchain_v2 = {"source": 1, "data": {"dtype": 11, "shape": [1, 4], "values": [4294967295, 1, 1, 1]}}
    refused(either_path.post(offchain_v2), "values[0]: 4294967295 (uint32) does not fit float (the model's dtype)")
    vector = encode_vector_v1("double", [1, 4], [[1e300, 1, 1, 1]])
    chain_v1 = encode(["uint8", "string", "string", "string", "bytes"], [0, "", "", "", vector]).hex()
    refused(
        either_path.post({"source": 0, "data": chain_v1}),
        "vector.values[0]: 1e+300 (double) does not fit float (the model's dtype)",
    )


def test_half_models_refuse_what_half_cannot_hold(half_server):
    refused(
        post_raw(half_server, offchain("double", "[[1.5, 70000.0]]")),
        "values[0][1]: 70000.0 does not fit half (the model's dtype), cast from double",
    )
    refused(
        post_raw(half_server, offchain("long", "[[70000, 1]]")),
        "values[0][0]: 70000 does not fit half (the model's dtype), cast from long",
    )
    response = post_raw(half_server, offchain("double", "[[65504.0, -1.5]]"))
    assert response.status_code == 200 and response.json()["values"] == [[65504.0, -1.5]], response.text


# K2: the forward of a model run in a lowered precision takes its input in that precision, so a value that does not fit
# it is refused as for a model whose own dtype it is (before: 70000 answered null, 2049 reached the model as 2048).


def test_a_lowered_precision_refuses_what_it_cannot_hold_on_every_route(lowered_server):
    runs_in = "does not fit half (the precision the model runs in)"
    refused(
        post_raw(lowered_server, offchain("float", "[[70000, 1]]")), f"values[0][0]: 70000 {runs_in}, cast from float"
    )
    refused(post_raw(lowered_server, offchain("long", "[[1, 2049]]")), f"values[0][1]: 2049 {runs_in}, cast from long")
    refused(post_raw(lowered_server, offchain("double", "[[1e30, 1]]")), f"values[0][0]: 1e+30 {runs_in}")
    for data in (
        {"input": {"dtype": "float", "shape": [1, 2], "values": [[70000, 1]]}},  # 1.x
        {"input": {"dtype": 1, "shape": [1, 2], "values": [70000, 1]}},  # 2.0
        {"dtype": 8, "shape": [1, 2], "values": [2049, 1]},  # 2.0, bare
    ):
        body = assert_contract_error(lowered_server.post({"source": 1, "data": data}), 400)
        assert runs_in in body["description"], (data, body)
    v2 = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [70000, 1]}]}
    response = requests.post(f"{lowered_server.url}/v2/models/model/infer", json=v2, timeout=30)
    assert response.status_code == 400 and runs_in in response.text, response.text
    v1_vector = encode_vector_v1("double", [1, 2], [70000.0, 1.0])
    v2_vector = encode_vector_v2("long", [1, 2], [2049, 1])
    for hex_data, named in [
        (encode(["int256[]"], [[70000 * 10**18, 10**18]]).hex(), f"data[0]: {70000 * 10**18} (int256) {runs_in}"),
        (encode(["uint8", "string", "string", "string", "bytes"], [0, "", "", "", v1_vector]).hex(), runs_in),
        (encode(["bytes", "bytes"], [b"", v2_vector]).hex(), runs_in),
    ]:
        for destination in (0, 1):
            response = lowered_server.post({"source": 0, "destination": destination, "data": hex_data})
            refused(response, named)
    # What half holds is answered, rounded as half rounds a float.
    response = post_raw(lowered_server, offchain("long", "[[2048, -65504]]"))
    assert response.status_code == 200 and response.json()["values"] == [[2048.0, -65504.0]], response.text
    response = post_raw(lowered_server, offchain("float", "[[0.1, 65504]]"))
    assert response.status_code == 200, response.text
    assert response.json() == {"dtype": "float", "shape": [1, 2], "values": [[0.099975586, 65504.0]]}


def test_complex_inputs_keep_the_sign_of_zero(integer_server):
    # K4: [-0.0, 5] arrived as 0+5j (real + 1j * imag is IEEE arithmetic: -0.0 + 0.0 is 0.0).
    response = post_raw(integer_server, offchain("cdouble", "[[[-0.0, 5.0], [1.0, -0.0], [-0.0, -0.0]]]"))
    assert response.status_code == 200, response.text
    assert response.text.count("-0.0") == 4, response.text
    body = '{"source": 1, "data": {"dtype": 13, "shape": [1, 2], "values": [[-0.0, -0.0], [1, -0.0]]}}'
    response = post_raw(integer_server, body)
    assert response.status_code == 200, response.text
    assert response.json()["values"] == [[-0.0, -0.0], [1.0, -0.0]]
    assert '"values":[[-0.0,-0.0],[1.0,-0.0]]' in response.text
