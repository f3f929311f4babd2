"""The contract over HTTP, against a real ``bentoml serve`` serving the embedded iris model."""

from __future__ import annotations

import hashlib
import json

import pytest
import requests
import torch
from eth_abi import decode, encode

from core.settings import EMBEDDED_MODEL, model_threads
from core.terms import PROOFS_NOT_SUPPORTED

IRIS_VECTOR = [1.0380048, 0.5586108, 1.1037828, 1.712096]


@pytest.fixture(params=["fast path", "public path"])
def iris_server(request, iris_server):
    """Every contract test runs once per path: BentoML's fast path (core/bentoml_seam.py) and its public path
    (INFERNET_FAST_PATH=0, as on another BentoML version)."""
    return iris_server if request.param == "fast path" else request.getfixturevalue("public_path_server")


def test_public_path_says_why_the_fast_path_is_off(public_path_server):
    assert "fast path off (INFERNET_FAST_PATH is off)" in public_path_server.log()
    response = public_path_server.post({"source": 1, "data": {"dtype": "double", "values": [IRIS_VECTOR] * 2}})
    assert response.status_code == 200, response.text
    assert response.json()["shape"] == [2, 3]


def offchain(values, dtype="double", **data):
    return {"source": 1, "data": {"dtype": dtype, "values": values, **data}}


def expected_iris(rows):
    model = torch.jit.load(str(EMBEDDED_MODEL))
    with torch.inference_mode():
        return model(torch.tensor(rows, dtype=torch.float32)).tolist()


def assert_error(response, status, *fragments):
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict), body
    assert body["code"] == str(status) and isinstance(body["name"], str) and body["name"]
    for fragment in fragments:
        assert fragment in body["description"], body
    assert "Traceback" not in response.text
    return body


def test_iris_vector_is_class_2(iris_server):
    response = iris_server.post(offchain([IRIS_VECTOR]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dtype"] == "float" and body["shape"] == [1, 3]
    assert max(range(3), key=body["values"][0].__getitem__) == 2
    assert body["values"][0] == pytest.approx(expected_iris([IRIS_VECTOR])[0], rel=1e-6, abs=1e-12)


def test_seed_readme_example_shape_works_without_content_type(iris_server):
    """curl users forget the header; extra keys such as the seed's "bot" are ignored."""
    body = {"source": 1, "data": {"bot": "\U0001f60c hello", "dtype": "float", "values": [IRIS_VECTOR, IRIS_VECTOR]}}
    response = requests.post(f"{iris_server.url}/service_output", data=json.dumps(body), timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["shape"] == [2, 3]


def test_output_is_valid_input_for_the_next_container(iris_server):
    first = iris_server.post(offchain([IRIS_VECTOR])).json()
    # Fed back as-is, the output passes validation and reaches the model (which wants 4 features, not 3).
    assert_error(iris_server.post({"source": 1, "data": first}), 422, "(1x3 and 4x50)")
    padded = {**first, "values": [[*row, 0.0] for row in first["values"]], "shape": [1, 4]}
    second = iris_server.post({"source": 1, "data": padded})
    assert second.status_code == 200, second.text


def test_shape_with_flat_values(iris_server):
    response = iris_server.post(offchain(IRIS_VECTOR * 2, shape=[2, 4]))
    assert response.status_code == 200 and response.json()["shape"] == [2, 3]


def sd59x18(values):
    return encode(["int256[]"], [[round(v * 10**18) for v in values]]).hex()


def test_chain_in_chain_out_matches_offchain(iris_server):
    reference = iris_server.post(offchain([IRIS_VECTOR])).json()["values"][0]
    response = iris_server.post({"source": 0, "data": "0x" + sd59x18(IRIS_VECTOR), "destination": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"raw_input", "processed_input", "raw_output", "processed_output", "proof"}
    (numbers,) = decode(["int256[]"], bytes.fromhex(body["raw_output"]))
    assert [n / 10**18 for n in numbers] == pytest.approx(reference, abs=1e-6)


def test_chain_in_offchain_out(iris_server):
    response = iris_server.post({"source": 0, "data": sd59x18(IRIS_VECTOR)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["shape"] == [1, 3] and max(range(3), key=body["values"][0].__getitem__) == 2


def test_offchain_in_chain_out(iris_server):
    response = iris_server.post({**offchain([IRIS_VECTOR]), "destination": 0})
    (numbers,) = decode(["int256[]"], bytes.fromhex(response.json()["raw_output"]))
    assert len(numbers) == 3 and max(range(3), key=numbers.__getitem__) == 2


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"{not json", 400, "body is not valid JSON"),
        (b"[1, 2]", 400, "body must be a JSON object"),
        (b'{"data": {}}', 400, "source: Field required"),
        (b'{"source": 1}', 400, "data: Field required"),
        (b'{"source": 0, "data": {"dtype": "float", "values": [1]}}', 400, "CHAIN source needs a hex string"),
        (b'{"source": 1, "data": "00ff"}', 400, "OFFCHAIN source needs a JSON object"),
        (b'{"source": 0, "data": "0xzz"}', 400, "must be a hex string"),
        (b'{"source": 0, "data": "00"}', 400, "not an ABI-encoded int256[]"),
        (b'{"source": 1, "data": {"dtype": "quad", "values": [[1]]}}', 400, "unknown dtype 'quad'"),
        (b'{"source": 1, "data": {"dtype": "float", "values": [[1,2,3,4],[1,2,3]]}}', 400, "row 1 has 3 elements"),
        (b'{"source": 1, "data": {"dtype": "float", "values": [1,2,3], "shape": [1,4]}}', 400, "shape: [1, 4] holds 4"),
        (b'{"source": 1, "data": {"dtype": "int", "values": [[1.5,2,3,4]]}}', 400, "int expects integers"),
        (b'{"source": 1, "data": {"dtype": "uint8", "values": [[300,2,3,4]]}}', 400, "300 is out of range for uint8"),
        (b'{"source": 1, "data": {"dtype": "half", "values": [[1e6,2,3,4]]}}', 400, "1000000.0 overflows half"),
        (b'{"source": 1, "data": {"dtype": "float", "values": [[NaN,2,3,4]]}}', 400, "body is not valid JSON"),
        (b'{"source": 1, "data": {"dtype": "float", "values": [[Infinity,2,3,4]]}}', 400, "body is not valid JSON"),
        (b'{"source": 1, "data": {"dtype": "float", "values": []}}', 400, "values: empty"),
        (b'{"source": 1, "data": {}, "requires_proof": true}', 400, PROOFS_NOT_SUPPORTED),
        (b'{"source": 1, "data": {}, "requires_proof": "yes"}', 400, "requires_proof"),
        (b'{"source": 1, "data": {}, "destination": 2}', 400, "STREAM (2) is not supported"),
        (b'{"source": 1, "data": {}, "destination": 9}', 400, "destination"),
        (
            b'{"source": 1, "data": {"dtype": "float", "values": [[1,2,3]]}}',
            422,
            "mat1 and mat2 shapes cannot be multiplied",
        ),
        (b'{"source": 1, "data": {"dtype": "float", "values": [1,2,3,4]}}', 422, "Dimension out of range"),
    ],
)
def test_error_table(iris_server, body, status, fragment):
    response = requests.post(
        f"{iris_server.url}/service_output", data=body, headers={"content-type": "application/json"}, timeout=30
    )
    assert_error(response, status, fragment)


def test_validation_errors_carry_locations(iris_server):
    body = assert_error(iris_server.post({"source": 7, "data": 3}), 400)
    assert {tuple(e["loc"]) for e in body["errors"]} == {("source",), ("data",)}


def test_unknown_routes_and_methods_are_json(iris_server):
    assert_error(iris_server.get("/nowhere"), 404, "/nowhere")
    assert_error(iris_server.get("/service_output"), 405, "POST")
    assert_error(requests.post(f"{iris_server.url}/livez", timeout=10), 405)
    assert_error(requests.post(f"{iris_server.url}/info", timeout=10), 405)


def test_health_endpoints(iris_server):
    assert iris_server.get("/livez").status_code == 200
    assert iris_server.get("/readyz").status_code == 200


def test_info_describes_workflow_model_and_batching(iris_server):
    info = iris_server.get("/info").json()
    assert info["workflow"] == "workflows.torch_workflow.TorchInferenceWorkflow"
    assert info["version"]
    model = info["model"]
    assert model["source"] == "local" and model["file"] == "model.torch" and model["format"] == "torchscript"
    assert model["dtype"] == "float"
    assert model["threads"] == model_threads()  # TORCH_NUM_THREADS unset: a core is left to the HTTP side
    assert model["sha256"] == hashlib.sha256(EMBEDDED_MODEL.read_bytes()).hexdigest()
    assert info["batching"]["max_batch_size"] >= 2 and info["batching"]["max_latency_ms"] > 0
    assert info["limits"]["max_request_bytes"] == 32 * 1024 * 1024


def test_service_resources(iris_server):
    response = iris_server.get("/service-resources")
    assert response.status_code == 200 and isinstance(response.json(), dict)
