"""The contract end to end, against a real ``bentoml serve`` serving the embedded iris model, once per BentoML path:
what crosses the real hop to the runner, BentoML's routing, middleware and metrics. The contract's cases that need
no server (validation, CHAIN, dtypes, routes, limits, gzip, auth, /info's shape) run in-process in
tests/test_public_app.py."""

from __future__ import annotations

import hashlib
import http.client
from urllib.parse import urlparse

import pytest
import requests
import torch
from eth_abi import decode, encode

from core.settings import EMBEDDED_MODEL, MiB
from public.infernet_ml_layouts import encode_vector_v1, encode_vector_v2
from tests.test_batching_http import CALLERS, batch_histogram, batches_larger_than_one, fire_together, rows_for
from tests.test_public_app import IRIS_VECTOR, MODEL_FAILED, assert_error, expected_iris, offchain, sd59x18


@pytest.fixture(params=["fast path", "public path"])
def server(request):
    """Every test here runs once per path: BentoML's fast path (core/bentoml_seam.py) and its public path
    (INFERNET_FAST_PATH=0, as on another BentoML version). Not named ``iris_server``: a fixture overriding the
    session's of the same name passes its param on to it, and pytest restarted that server whenever the param
    changed, once per test (~8 s each)."""
    return request.getfixturevalue("iris_server" if request.param == "fast path" else "public_path_server")


def test_public_path_says_why_the_fast_path_is_off(public_path_server):
    assert "fast path off (INFERNET_FAST_PATH is off)" in public_path_server.log()
    response = public_path_server.post({"source": 1, "data": {"dtype": "double", "values": [IRIS_VECTOR] * 2}})
    assert response.status_code == 200, response.text
    assert response.json()["shape"] == [2, 3]


def test_iris_vector_is_class_2(server):
    response = server.post(offchain([IRIS_VECTOR]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dtype"] == "float" and body["shape"] == [1, 3]
    assert max(range(3), key=body["values"][0].__getitem__) == 2
    assert body["values"][0] == pytest.approx(expected_iris([IRIS_VECTOR])[0], rel=1e-6, abs=1e-12)


def test_chain_in_chain_out_matches_offchain(server):
    reference = server.post(offchain([IRIS_VECTOR])).json()["values"][0]
    response = server.post({"source": 0, "data": "0x" + sd59x18(IRIS_VECTOR), "destination": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"raw_input", "processed_input", "raw_output", "processed_output", "proof"}
    (numbers,) = decode(["int256[]"], bytes.fromhex(body["raw_output"]))
    assert [n / 10**18 for n in numbers] == pytest.approx(reference, abs=1e-6)


def test_refusals_of_either_side_of_the_hop_are_contract_errors(server):
    raw = requests.post(f"{server.url}/service_output", data=b"{not json", timeout=30)
    assert_error(raw, 400, "body is not valid JSON")  # the API worker's
    body = assert_error(server.post({"source": 7, "data": 3}), 400)
    assert {tuple(e["loc"]) for e in body["errors"]} == {("source",), ("data",)}
    assert_error(server.post(offchain([[1]], dtype="quad")), 400, 'unknown dtype "quad"')  # the workflow's
    assert_error(server.post(offchain([[1.0, 2.0, 3.0]])), 422, MODEL_FAILED)  # the model's


def test_a_flat_row_is_told_the_shape_the_model_takes_on_every_route(server):
    """Explorer F5d: a rank-1 row got only torch's "Dimension out of range" (422), no hint that the model takes
    [1, 4] (batch, features). Every route's 422 comes from the runner's one message (workflows/base.py)."""
    flat = IRIS_VECTOR
    hint = (
        "the input had shape [4] float; the model was warmed up with shape [1, 4] float (batch first); "
        "to send one row, send shape [1, 4] (a batch of one)"
    )
    v1_vector = encode_vector_v1("float", [4], flat)
    v2_vector = encode_vector_v2("float", [4], flat)
    bodies = {
        "today's OFFCHAIN": {"source": 1, "data": {"dtype": "float", "values": flat}},
        "1.x OFFCHAIN": {"source": 1, "data": {"input": {"dtype": "float", "values": flat}}},
        "2.0 OFFCHAIN": {"source": 1, "data": {"dtype": 1, "values": flat}},
        "1.x CHAIN": {
            "source": 0,
            "data": encode(["uint8", "string", "string", "string", "bytes"], [0, "", "", "", v1_vector]).hex(),
        },
        "2.0 CHAIN": {"source": 0, "data": encode(["bytes", "bytes"], [b"", v2_vector]).hex()},
    }
    for route, body in bodies.items():
        description = assert_error(server.post(body), 422, MODEL_FAILED, "Dimension out of range", hint)["description"]
        assert description.startswith(MODEL_FAILED), (route, description)
    v2 = {"inputs": [{"name": "input_0", "datatype": "FP32", "shape": [4], "data": flat}]}
    response = requests.post(f"{server.url}/v2/models/model/infer", json=v2, timeout=30)
    assert response.status_code == 422, response.text
    assert "Dimension out of range" in response.json()["error"] and hint in response.json()["error"]


def test_body_over_max_request_bytes_is_413_before_it_is_read(server):
    address = urlparse(server.url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    try:
        connection.putrequest("POST", "/service_output")
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(32 * MiB + 1))
        connection.endheaders()  # no body sent: the answer must not wait for it
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    assert response.status == 413 and response.getheader("connection") == "close"
    assert b"(MAX_REQUEST_BYTES)" in body and b'"code":"413"' in body.replace(b" ", b"")


def test_concurrent_callers_are_batched_and_get_their_own_rows(server):
    before = batch_histogram(server)
    bodies = [{"source": 1, "data": {"dtype": "float", "values": rows_for(i)}} for i in range(CALLERS)]
    responses = fire_together(server, bodies)
    for caller, response in enumerate(responses):
        assert response.status_code == 200, response.text
        own = torch.tensor(expected_iris(rows_for(caller)))
        assert torch.allclose(torch.tensor(response.json()["values"]), own, atol=1e-6)
    assert batches_larger_than_one(before, batch_histogram(server)) >= 1


def test_unknown_routes_and_methods_are_json(server):
    assert_error(server.get("/nowhere"), 404, "/nowhere")
    assert_error(server.get("/service_output"), 405, "POST")
    assert_error(requests.post(f"{server.url}/livez", timeout=10), 405)


def test_health_and_metrics_endpoints(server):
    assert server.get("/livez").status_code == 200
    assert server.get("/readyz").status_code == 200
    metrics = server.get("/metrics")
    assert metrics.status_code == 200 and "infernet_batch_size_bucket" in metrics.text


def test_info_comes_from_the_runner(server):
    info = server.get("/info").json()
    assert info["workflow"] == "workflows.torch_workflow.TorchInferenceWorkflow"
    assert info["model"]["sha256"] == hashlib.sha256(EMBEDDED_MODEL.read_bytes()).hexdigest()
    assert server.get("/service-resources").status_code == 200
