"""Shapes, datatypes and bodies as a client sends them, over HTTP: one bound on rank in every layout and protocol and
in both directions, BOOL bytes read like BOOL JSON, nested values kept at their own shape, and refusals that name
what was sent in JSON's words (docs/contract.md).

Against real ``bentoml serve`` processes: the embedded iris model, and a TorchScript model built here that adds as
many leading dimensions to its input as its first value says (so a valid request can get an answer of any rank).
"""

from __future__ import annotations

import json

import orjson
import pytest
import requests
import torch

from tests.fixtures.server import Server, serving
from tests.reliability_support import assert_contract_error

IRIS = [1.0380048, 0.5586108, 1.1037828, 1.712096]


class Deeper(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(int(x.flatten()[0].item())):
            x = x.unsqueeze(0)
        return x


@pytest.fixture(scope="module")
def deeper_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deeper")
    path = tmp / "deeper.pt"
    torch.jit.save(torch.jit.script(Deeper().eval()), str(path))
    with serving({"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": str(path)})}, tmp) as server:
        yield server


def v2(server: Server, body: object, **kwargs) -> requests.Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return requests.post(f"{server.url}/v2/models/model/infer", data=data, timeout=30, **kwargs)


def v2_refused(response: requests.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text[:300]
    assert response.json() == {"error": error}


def refused(response: requests.Response, status: int, description: str) -> None:
    body = assert_contract_error(response, status)
    assert body["description"] == description, body


def ones(rank: int, last: int = 4) -> list[int]:
    return [1] * (rank - 1) + [last]


# --- one bound on rank -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [33, 65])
@pytest.mark.parametrize(
    "layout, data, place",
    [
        ("today's", lambda shape: {"dtype": "float", "values": IRIS, "shape": shape}, "shape"),
        ("1.x", lambda shape: {"input": {"dtype": "float", "values": IRIS, "shape": shape}}, "shape"),
        ("2.0 vector", lambda shape: {"dtype": 1, "values": IRIS, "shape": shape}, "data.shape"),
        ("2.0 envelope", lambda shape: {"input": {"dtype": 1, "values": IRIS, "shape": shape}}, "input.shape"),
    ],
)
def test_a_shape_beyond_32_dimensions_is_refused_naming_shape(iris_server, rank, layout, data, place):
    response = iris_server.post({"source": 1, "data": data(ones(rank))})
    refused(response, 400, f"{place}: {rank} dimensions exceed the limit of 32")


@pytest.mark.parametrize("rank", [33, 65])
def test_a_v2_shape_beyond_32_dimensions_is_refused_naming_shape(iris_server, rank):
    tensor = {"name": "x", "datatype": "FP32", "data": IRIS, "shape": ones(rank)}
    v2_refused(v2(iris_server, {"inputs": [tensor]}), 400, f"inputs[0].shape: {rank} dimensions exceed the limit of 32")


def test_shapes_and_nested_values_share_one_bound_so_answers_chain(deeper_server):
    first = deeper_server.post({"source": 1, "data": {"dtype": "float", "values": [0.0, 2.0], "shape": ones(32, 2)}})
    assert first.status_code == 200, first.text
    assert first.json()["shape"] == ones(32, 2)
    again = deeper_server.post({"source": 1, "data": first.json()})  # Infernet chains containers this way
    assert again.status_code == 200, again.text
    assert again.json() == first.json()
    # One more dimension is refused as a shape, as it is as nesting: an answer of that rank could not chain.
    deeper = {"dtype": "float", "values": [0.0, 2.0], "shape": ones(33, 2)}
    refused(deeper_server.post({"source": 1, "data": deeper}), 400, "shape: 33 dimensions exceed the limit of 32")
    nested = {"dtype": "float", "values": [first.json()["values"]]}
    refused(deeper_server.post({"source": 1, "data": nested}), 400, "values: nested deeper than 32 levels")


@pytest.mark.parametrize("rank", [33, 71])
def test_an_answer_beyond_32_dimensions_is_a_422_not_a_500(deeper_server, rank):
    values = [float(rank - 1), 2.0]  # the model adds rank - 1 leading dimensions to this rank-1 input
    response = deeper_server.post({"source": 1, "data": {"dtype": "float", "values": values}})
    refused(response, 422, f"output: {rank} dimensions exceed the limit of 32 (the most a request may send)")
    tensor = {"name": "x", "datatype": "FP32", "data": values, "shape": [2]}
    v2_refused(
        v2(deeper_server, {"inputs": [tensor]}),
        422,
        f"output: {rank} dimensions exceed the limit of 32 (the most a request may send)",
    )
    assert "Traceback" not in deeper_server.log()  # a client's request, not a fault of the service


# --- BOOL bytes --------------------------------------------------------------------------------------------------


def binary_bool(server: Server, octets: bytes) -> requests.Response:
    tensor = {"name": "x", "shape": [1, 4], "datatype": "BOOL", "parameters": {"binary_data_size": len(octets)}}
    header = orjson.dumps({"inputs": [tensor]})
    headers = {"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"}
    return v2(server, header + octets, headers=headers)


@pytest.mark.parametrize("octets", [b"\x01\x00\x01\x02", b"\xff\x00\x00\x00"])
def test_binary_bool_data_holds_only_bytes_0_and_1(iris_server, octets):
    good = binary_bool(iris_server, b"\x01\x00\x01\x01")
    assert good.status_code == 200, good.text
    at = next(i for i, byte in enumerate(octets) if byte > 1)
    response = binary_bool(iris_server, octets)
    v2_refused(response, 400, f"inputs[0].data[{at}]: BOOL bytes are 0 (false) or 1 (true), got {octets[at]}")
    # The same rule as JSON data.
    tensor = {"name": "x", "shape": [1, 4], "datatype": "BOOL", "data": list(octets)}
    v2_refused(
        v2(iris_server, {"inputs": [tensor]}),
        400,
        f"inputs[0].data[{at}]: bool accepts only true/false or 0/1, got {octets[at]}",
    )


# --- nested values keep their own shape ----------------------------------------------------------------------------


def test_nested_values_are_not_reshaped_to_another_declared_shape(iris_server):
    nested = [[IRIS[0], IRIS[1]], [IRIS[2], IRIS[3]]]
    response = iris_server.post({"source": 1, "data": {"dtype": "double", "values": nested, "shape": [1, 4]}})
    refused(
        response,
        400,
        "shape: [1, 4] does not match the shape of the nested values, [2, 2]; send values nested as `shape` says, "
        "or flat",
    )
    flat = iris_server.post({"source": 1, "data": {"dtype": "double", "values": IRIS, "shape": [1, 4]}})
    assert flat.status_code == 200, flat.text
    # The Open Inference Protocol's data is the elements in row-major order, nested or not: `shape` decides.
    tensor = {"name": "x", "datatype": "FP64", "data": nested, "shape": [1, 4]}
    response = v2(iris_server, {"inputs": [tensor]})
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == flat.json()["values"][0]


# --- refusals in JSON's words ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, kind",
    [(b"null", "null"), (b'"x"', "a string"), (b"[1]", "an array"), (b"3", "a number"), (b"true", "true")],
)
def test_a_body_that_is_no_object_is_named_in_json_words(iris_server, body, kind):
    response = requests.post(f"{iris_server.url}/service_output", data=body, timeout=30)
    refused(response, 400, f"body must be a JSON object, got {kind}")
    v2_refused(v2(iris_server, body), 400, f"body must be a JSON object, got {kind}")


@pytest.mark.parametrize(
    "body, description",
    [
        (b'{"source": 1, "data": {}}', "dtype: missing"),
        (b'{"source": 1, "data": {"values": [[1, 2, 3, 4]]}}', "dtype: missing"),
        (b'{"source": 1, "data": {"dtype": true, "values": [[1, 2, 3, 4]]}}', "dtype: unknown dtype true; expected"),
        (b'{"source": 1, "data": {"dtype": "quad", "values": [[1]]}}', 'dtype: unknown dtype "quad"; expected'),
        (b'{"source": 1, "data": {"dtype": "float", "values": 3}}', "values: expected a (nested) list of numbers, "
                                                                       "got a number"),
        (b'{"source": 18446744073709551616, "data": {}}', "source: an integer beyond 64 bits is out of range"),
        (b'{"source": 1, "data": {"dtype": "float", "values": [1], "shape": "4"}}',
         "shape: expected a list of non-negative integers, got a string"),
    ],
)  # fmt: skip
def test_refusals_name_what_was_sent_in_json_words(iris_server, body, description):
    response = requests.post(f"{iris_server.url}/service_output", data=body, timeout=30)
    assert_contract_error(response, 400)
    assert response.json()["description"].startswith(description), response.json()


def test_invalid_utf8_is_named_plainly_on_both_routes(iris_server):
    body = b'{"source": 1, "data": {"dtype": "\xff"}}'
    refused(
        requests.post(f"{iris_server.url}/service_output", data=body, timeout=30),
        400,
        "body is not valid UTF-8: byte 0xff at offset 33",
    )
    v2_refused(v2(iris_server, body), 400, "body is not valid UTF-8: byte 0xff at offset 33")
