"""The Open Inference Protocol (KServe v2) routes: the datatype mapping and the request/answer conversion in-process,
then the real clients users run (tritonclient's HTTP client, the KServe SDK's REST client) against `bentoml serve`.

The KServe SDK runs in its own venv (.venv-kserve, `make kserve-venv`), driven through tests/kserve_support.py in a
subprocess: its pins (psutil<6, its own fastapi, grpcio and protobuf) would change the service's environment.
"""

from __future__ import annotations

import gzip
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import orjson
import pytest
import requests
import torch
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from core.errors import StartupError
from core.model_call import UNASKED
from core.settings import ServiceSettings
from public import open_inference as oip
from public.open_inference import ProtocolError, answer, read_request, split_body
from tests.kserve_support import IRIS_ROW, run_in_kserve_venv
from workflows import tensors

MAX_ELEMENTS = 1000
EXPECTED_DATATYPES = {
    "FP32": torch.float32,
    "FP64": torch.float64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "UINT8": torch.uint8,
    "BOOL": torch.bool,
}
SAMPLES = {
    "FP32": [1.5, -2.25, 3.0, 0.125],
    "FP64": [1.0380048, 0.5586108, 1.1037828, 1.712096],
    "FP16": [0.5, -1.0, 2048.0, 0.099975586],
    "BF16": [1.0, -0.5, 3.140625, 256.0],
    "INT8": [-128, 0, 5, 127],
    "INT16": [-32768, 1, 2, 32767],
    "INT32": [-(2**31), 7, 8, 2**31 - 1],
    "INT64": [-(2**63), 9, 10, 2**63 - 1],
    "UINT8": [0, 1, 200, 255],
    "BOOL": [True, False, False, True],
}


def request(datatype: str = "FP32", data=None, shape=(2, 2), **extra) -> dict:
    tensor = {"name": "input_0", "shape": list(shape), "datatype": datatype, "data": data or SAMPLES[datatype]}
    return {"inputs": [tensor], **extra}


def as_torch(values: list, datatype: str) -> torch.Tensor:
    return torch.tensor(values, dtype=EXPECTED_DATATYPES[datatype])


def wire_bytes(values: list, datatype: str) -> bytes:
    if datatype == "BF16":
        return as_torch(values, datatype).view(torch.int16).numpy().astype("<i2").tobytes()
    return np.array(values, dtype=oip._WIRE[datatype]).tobytes()


def contract_answer(values, dtype: str = "float") -> dict:
    array = np.asarray(values)
    return {"dtype": dtype, "shape": list(array.shape), "values": array}


# --- datatypes and requests -------------------------------------------------------------------------------------


def test_each_protocol_datatype_becomes_the_contract_dtype_of_the_same_tensor_type():
    assert set(oip.DATATYPES) == set(EXPECTED_DATATYPES)
    for datatype, torch_dtype in EXPECTED_DATATYPES.items():
        assert tensors.DTYPES[oip.DATATYPES[datatype]] == torch_dtype, datatype
        assert oip.CONTRACT_DATATYPES[oip.DATATYPES[datatype]] == datatype


@pytest.mark.parametrize("datatype", ["BYTES", "UINT16", "UINT32", "UINT64", "fp32", None])
def test_other_datatypes_are_refused_naming_the_supported_ones(datatype):
    with pytest.raises(ProtocolError) as refused:
        read_request(request("FP32") | {"inputs": [{"name": "x", "shape": [1], "datatype": datatype, "data": [1]}]},
                     b"", MAX_ELEMENTS)  # fmt: skip
    assert refused.value.status == 400
    assert f"inputs[0].datatype: {json.dumps(datatype)} is not supported" in refused.value.description
    assert "FP32" in refused.value.description and "INT64" in refused.value.description


@pytest.mark.parametrize("datatype", list(EXPECTED_DATATYPES))
def test_json_data_decodes_to_the_tensor_sent(datatype):
    read = read_request(request(datatype, id="req-1"), b"", MAX_ELEMENTS)
    assert read.id == "req-1" and read.outputs is None and not read.binary_by_default
    assert read.data["dtype"] == oip.DATATYPES[datatype]
    decoded = tensors.decode(read.data)
    assert torch.equal(decoded, as_torch(SAMPLES[datatype], datatype).reshape(2, 2))


def test_nested_json_data_is_taken_in_row_major_order():
    read = read_request(request("INT32", data=[[1, 2], [3, 4]], shape=(2, 2)), b"", MAX_ELEMENTS)
    assert tensors.decode(read.data).tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize("datatype", list(EXPECTED_DATATYPES))
def test_binary_data_decodes_to_the_tensor_sent(datatype):
    values = SAMPLES[datatype]
    binary = wire_bytes(values, datatype)
    tensor = {"name": "in", "shape": [4, 1], "datatype": datatype, "parameters": {"binary_data_size": len(binary)}}
    read = read_request({"inputs": [tensor]}, binary, MAX_ELEMENTS)
    assert torch.equal(tensors.decode(read.data), as_torch(values, datatype).reshape(4, 1))


def test_tritonclients_binary_request_body_is_read():
    x = np.array([IRIS_ROW], dtype=np.float32)
    tensor = triton.InferInput("input_0", [1, 4], "FP32")
    tensor.set_data_from_numpy(x)  # binary by default
    body, header_length = triton.InferenceServerClient.generate_request_body([tensor], request_id="t-1")
    header, binary = split_body(body, str(header_length).encode())
    read = read_request(orjson.loads(header), binary, MAX_ELEMENTS)
    assert read.id == "t-1" and read.binary_by_default  # tritonclient asks for binary outputs when it names none
    assert torch.equal(tensors.decode(read.data), torch.from_numpy(x))


@pytest.mark.parametrize(
    "body, binary, message",
    [
        ([1], b"", "body must be a JSON object, got an array"),
        ({"inputs": []}, b"", "inputs: expected a list of one input tensor"),
        ({"inputs": [{}, {}]}, b"", "inputs: this model takes one input tensor, got 2"),
        (request(shape=(2, -1)), b"", "inputs[0].shape: expected a list of non-negative integers"),
        (request(shape=(100, 100)), b"", "10000 elements exceed the limit of 1000"),
        (request() | {"id": 5}, b"", "id: expected a string"),
        (request() | {"parameters": {"binary_data_output": "yes"}}, b"", "binary_data_output: expected true or false"),
        (request(), b"\x00\x01", "2 bytes of binary data follow the JSON but no input claims them"),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}, b"", "inputs[0].data: missing"),
        # A bare number was taken as a one-element array (explorer P8); Triton refuses it
        (
            request(data=5, shape=(1,)),
            b"",
            "inputs[0].data: expected an array of the tensor's elements (row-major), got a number",
        ),
        ({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": None}]}, b"", "inputs[0].data: missing"),
        (  # it said "give either 'data' or parameters.binary_data_size, not both": the bytes are what is missing
            {
                "inputs": [
                    {"name": "x", "shape": [2], "datatype": "FP32", "data": None, "parameters": {"binary_data_size": 8}}
                ]
            },
            b"",
            "binary_data_size: 8 bytes claimed, but no binary data follows the JSON: send the tensor's bytes after the "
            "JSON, and the JSON's length in the Inference-Header-Content-Length header",
        ),
        (
            {"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]},
            b"\x00" * 4,
            "8 bytes claimed, 4 bytes follow",
        ),
        (
            {"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]},
            b"\x00" * 8,
            "shape [3] of FP32 takes 12 bytes, got 8",
        ),
        (
            {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "parameters": {"shared_memory_region": "r"}}]},
            b"",
            "shared memory is not supported",
        ),
        (request() | {"outputs": [{"nom": "y"}]}, b"", "outputs: expected a list of objects with a 'name'"),
        (
            request() | {"outputs": [{"name": "output_0", "parameters": {"classification": 2}}]},
            b"",
            "the classification extension is not supported",
        ),
        (  # it was answered twice (explorer P6); Triton refuses it
            request() | {"outputs": [{"name": "output_0"}, {"name": "output_0", "parameters": {"binary_data": True}}]},
            b"",
            'outputs[1]: output "output_0" is asked for twice',
        ),
    ],
)
def test_malformed_requests_are_refused_with_the_place_named(body, binary, message):
    with pytest.raises(ProtocolError) as refused:
        read_request(body, binary, MAX_ELEMENTS)
    assert refused.value.status == 400
    assert message in refused.value.description


@pytest.mark.parametrize("length, expected", [(None, (b"ab", b"")), (b"1", (b"a", b"b")), (b"2", (b"ab", b""))])
def test_the_header_length_splits_json_from_binary_data(length, expected):
    assert split_body(b"ab", length) == expected


@pytest.mark.parametrize("length", [b"3", b"-1", b"x"])
def test_a_bad_header_length_is_refused(length):
    with pytest.raises(ProtocolError, match="Inference-Header-Content-Length"):
        split_body(b"ab", length)


def test_runner_messages_speak_of_the_protocols_fields():
    assert oip.in_protocol_terms("shape: [1, 4] holds 4 elements but values has 3") == (
        "inputs[0].shape: [1, 4] holds 4 elements but data has 3"
    )
    assert (
        oip.in_protocol_terms("values[1]: expected a number, got null")
        == "inputs[0].data[1]: expected a number, got null"
    )
    assert oip.in_protocol_terms("model failed: RuntimeError") == "model failed: RuntimeError"


@pytest.mark.parametrize("name", ["iris", "Iris-v1.2_b", "m" * 128])
def test_model_name_setting(name):
    assert ServiceSettings.from_env({}).model_name == "model"
    assert ServiceSettings.from_env({"MODEL_NAME": name}).model_name == name


@pytest.mark.parametrize("name", ["a/b", "-x", "with space", "{{.Name}}", "m" * 129])
def test_a_model_name_that_is_no_url_segment_is_refused(name):
    with pytest.raises(StartupError, match=r"^MODEL_NAME: expected up to 128 letters"):
        ServiceSettings.from_env({"MODEL_NAME": name})


# --- answers ----------------------------------------------------------------------------------------------------


def test_a_lone_tensor_answers_as_output_0_with_flat_data():
    read = read_request(request(id="a-1"), b"", MAX_ELEMENTS)
    response, binary = answer(contract_answer([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]), read, "iris")
    assert binary is None
    assert response["model_name"] == "iris" and response["model_version"] == "1" and response["id"] == "a-1"
    (output,) = response["outputs"]
    assert output["name"] == "output_0" and output["datatype"] == "FP32" and output["shape"] == [2, 3]
    assert output["data"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_outputs_in_dicts_and_lists_are_named_by_their_place():
    body = {"logits": contract_answer([1.0]), "extra": [contract_answer([1], "long"), contract_answer([True], "bool")]}
    assert [name for name, _ in oip.output_tensors(body)] == ["logits", "extra.0", "extra.1"]
    assert [name for name, _ in oip.output_tensors([contract_answer([1.0]), contract_answer([2.0])])] == [
        "output_0",
        "output_1",
    ]
    response, _ = answer(body, read_request(request(), b"", MAX_ELEMENTS), "m")
    assert [(o["name"], o["datatype"]) for o in response["outputs"]] == [
        ("logits", "FP32"),
        ("extra.0", "INT64"),
        ("extra.1", "BOOL"),
    ]


def test_requested_outputs_come_in_the_order_asked_and_unknown_ones_are_refused():
    body = {"a": contract_answer([1.0]), "b": contract_answer([2.0])}
    asked = read_request(request(outputs=[{"name": "b"}]), b"", MAX_ELEMENTS)
    response, _ = answer(body, asked, "m")
    assert [o["name"] for o in response["outputs"]] == ["b"]
    with pytest.raises(ProtocolError) as refused:
        answer(body, read_request(request(outputs=[{"name": "c"}]), b"", MAX_ELEMENTS), "m")
    assert refused.value.status == 400 and 'unknown output "c"; this model\'s outputs are a, b' in str(refused.value)


@pytest.mark.parametrize(
    "contract_dtype, values",
    [("float", [[0.5, -1.5]]), ("double", [[1e-300, 2.0]]), ("half", [[0.5, 2048.0]]), ("long", [[-(2**62), 3]]),
     ("int", [[5, -6]]), ("short", [[7, 8]]), ("int8", [[-1, 1]]), ("uint8", [[0, 255]]), ("bool", [[True, False]])],
)  # fmt: skip
def test_binary_answers_read_back_with_tritonclient(contract_dtype, values):
    array = tensors.encode(torch.tensor(values, dtype=tensors.DTYPES[contract_dtype]))
    read = read_request(request(parameters={"binary_data_output": True}), b"", MAX_ELEMENTS)
    response, binary = answer(array, read, "m")
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    result = triton.InferResult.from_response_body(header + binary, header_length=len(header))
    assert result.get_output("output_0")["parameters"]["binary_data_size"] == len(binary)
    np.testing.assert_array_equal(result.as_numpy("output_0"), np.array(values))


@pytest.mark.parametrize(
    "dtype, datatype, values",
    [
        (torch.uint16, "UINT16", [0, 65535]),
        (torch.uint32, "UINT32", [1, 2**32 - 1]),
        (torch.uint64, "UINT64", [2, 2**63 - 1]),
    ],
)
def test_unsigned_outputs_answer_in_their_own_datatype(dtype, datatype, values):
    # The contract's vocabulary names them int or long; the protocol has their own datatypes (explorer P7).
    array = tensors.encode(torch.tensor(values, dtype=dtype))
    read = read_request(request(parameters={"binary_data_output": True}), b"", MAX_ELEMENTS)
    response, binary = answer(array, read, "m")
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    result = triton.InferResult.from_response_body(header + binary, header_length=len(header))
    assert result.get_output("output_0")["datatype"] == datatype
    assert result.as_numpy("output_0").tolist() == values


def test_bfloat16_answers_as_bf16_in_json_and_binary():
    array = tensors.encode(torch.tensor([1.0, -0.5, 3.140625], dtype=torch.bfloat16))
    response, _ = answer(array, read_request(request(), b"", MAX_ELEMENTS), "m")
    assert response["outputs"][0]["datatype"] == "BF16" and response["outputs"][0]["data"].tolist() == [
        1.0,
        -0.5,
        3.140625,
    ]
    response, binary = answer(
        array, read_request(request(parameters={"binary_data_output": True}), b"", MAX_ELEMENTS), "m"
    )
    assert binary == wire_bytes([1.0, -0.5, 3.140625], "BF16")


def test_an_output_binary_data_false_overrides_binary_data_output():
    body = {"a": contract_answer([1.0]), "b": contract_answer([2.0])}
    read = read_request(
        request(
            parameters={"binary_data_output": True},
            outputs=[{"name": "a", "parameters": {"binary_data": False}}, {"name": "b"}],
        ),
        b"",
        MAX_ELEMENTS,
    )
    response, binary = answer(body, read, "m")
    assert response["outputs"][0]["data"].tolist() == [1.0] and "data" not in response["outputs"][1]
    assert binary == np.float32(2.0).tobytes()


@pytest.mark.parametrize(
    "body, message",
    [
        (tensors.encode(torch.tensor([1 + 2j])), "the protocol has no datatype for cfloat"),
        ({"label": "setosa"}, "the model's output label is a string, not a tensor"),
        ([1.0, 2.0], "the model's output output_0 is a number, not a tensor"),
        (  # one protocol name for two tensors: one was dropped (explorer P6)
            {"a": {"b": tensors.encode(torch.tensor([1.0]))}, "a.b": tensors.encode(torch.tensor([2.0]))},
            'the model\'s answer has two tensors named "a.b"',
        ),
    ],
)
def test_answers_the_protocol_cannot_carry_are_422(body, message):
    # The model's answer, not a fault of the service (they were 500s; explorer P5): /service_output carries them.
    with pytest.raises(ProtocolError) as refused:
        answer(body, read_request(request(), b"", MAX_ELEMENTS), "m")
    assert refused.value.status == 422 and message in refused.value.description


@pytest.mark.parametrize(
    "body",
    [
        {"y": contract_answer([1.0]), "label": "setosa"},  # no tensor
        {"y": contract_answer([1.0]), "a": {"b": contract_answer([2.0])}, "a.b": contract_answer([3.0])},  # one name
        {"y": contract_answer([1.0]), "z": UNASKED},  # left out by the runner
    ],
    ids=["not-a-tensor", "two-named-alike", "unasked"],
)
def test_only_the_outputs_asked_for_are_checked(body):
    # The protocol lets a client ask for some outputs: one it did not ask for must not fail its answer (K11).
    read = read_request(request(outputs=[{"name": "y"}]), b"", MAX_ELEMENTS)
    response, _ = answer(body, read, "m")
    assert [(o["name"], o["data"].tolist()) for o in response["outputs"]] == [("y", [1.0])]
    with pytest.raises(ProtocolError) as refused:
        answer(body, read_request(request(outputs=[{"name": "nope"}]), b"", MAX_ELEMENTS), "m")
    named = ", ".join(dict.fromkeys(name for name, _ in oip.output_tensors(body)))  # every output, asked or not
    assert refused.value.status == 400
    assert refused.value.description == f'outputs: unknown output "nope"; this model\'s outputs are {named}'


def test_asking_for_no_outputs_answers_every_output():
    # The protocol: outputs not given (or none asked for) means every output of the model.
    body = {"a": contract_answer([1.0]), "b": contract_answer([2.0])}
    for outputs in (None, []):
        extra = {} if outputs is None else {"outputs": outputs}
        response, _ = answer(body, read_request(request(**extra), b"", MAX_ELEMENTS), "m")
        assert [o["name"] for o in response["outputs"]] == ["a", "b"], outputs


# --- the real service, with the real clients --------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton_client(iris_server):
    client = triton.InferenceServerClient(iris_server.url.removeprefix("http://"))
    yield client
    client.close()


@pytest.mark.slow
def test_tritonclient_sees_a_live_ready_server_and_the_models_metadata(iris_server, triton_client):
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready("model") and triton_client.is_model_ready("model", model_version="1")
    assert not triton_client.is_model_ready("iris") and not triton_client.is_model_ready("model", model_version="2")
    server = triton_client.get_server_metadata()
    assert server["name"] == "infernet-torch-service" and "binary_tensor_data" in server["extensions"]
    metadata = triton_client.get_model_metadata("model")
    assert metadata == {
        "name": "model",
        "versions": ["1"],
        "platform": "pytorch_torchscript",
        "inputs": [{"name": "input_0", "datatype": "FP32", "shape": [-1]}],
        "outputs": [],
    }
    assert iris_server.get("/v2/health/live").json() == {"live": True}
    assert iris_server.get("/v2/health/ready").json() == {"ready": True}
    assert iris_server.get("/v2/models/model/ready").json() == {"name": "model", "ready": True}


@pytest.mark.slow
@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infers_the_iris_class(iris_server, triton_client, datatype, binary):
    rows = np.array([IRIS_ROW, IRIS_ROW], dtype=np.float32 if datatype == "FP32" else np.float64)
    tensor = triton.InferInput("input_0", list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows, binary_data=binary)
    outputs = [triton.InferRequestedOutput("output_0", binary_data=binary)]
    result = triton_client.infer("model", [tensor], outputs=outputs, request_id="iris-1")
    response = result.get_response()
    assert response["model_name"] == "model" and response["id"] == "iris-1"
    probabilities = result.as_numpy("output_0")
    assert probabilities.shape == (2, 3) and probabilities.dtype == np.float32
    assert probabilities.argmax(axis=1).tolist() == [2, 2]
    same = iris_server.post({"source": 1, "data": {"dtype": "float", "values": [IRIS_ROW]}}).json()
    np.testing.assert_allclose(probabilities[0], same["values"][0], atol=1e-6)  # batch sizes differ


@pytest.mark.slow
def test_tritonclient_reaches_the_model_by_each_id_it_is_advertised_by(iris_server, triton_client):
    # C-v2: /service-resources and the Infernet layouts take the model by its Ritual id, repository, file and
    # sha256; /v2/models/{name} knew MODEL_NAME only (404 for the id the node reads from /service-resources).
    advertised = iris_server.get("/service-resources").json()["compute_capability"][0]["models"][0]
    assert advertised["repo_id"] == "local/local/iris:model.torch"
    tensor = triton.InferInput("input_0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.array([IRIS_ROW], dtype=np.float32))
    for name in (advertised["repo_id"], "local/local/iris", "model.torch", advertised["sha256"]):
        assert triton_client.is_model_ready(name) and triton_client.is_model_ready(name, model_version="1"), name
        assert triton_client.get_model_metadata(name)["name"] == name  # the name asked by, as Triton answers
        result = triton_client.infer(name, [tensor], model_version="1")
        assert result.get_response()["model_name"] == name
        assert result.as_numpy("output_0").argmax() == 2, name
    assert not triton_client.is_model_ready("local/local/other")
    assert requests.get(f"{iris_server.url}/v2/models/local/local/iris/versions", timeout=30).status_code == 404


@pytest.mark.slow
def test_tritonclient_defaults_and_versioned_routes(triton_client):
    tensor = triton.InferInput("input_0", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.array([IRIS_ROW], dtype=np.float32))  # binary in, binary out: the client's defaults
    result = triton_client.infer("model", [tensor], model_version="1")
    assert result.as_numpy("output_0").argmax() == 2
    with pytest.raises(InferenceServerException) as refused:
        triton_client.infer("model", [tensor], model_version="2")
    assert refused.value.status() == "404" and "has no version '2'" in refused.value.message()
    with pytest.raises(InferenceServerException) as refused:
        triton_client.infer("resnet", [tensor])
    assert refused.value.status() == "404" and "unknown model 'resnet'" in refused.value.message()


@pytest.mark.slow
def test_tritonclient_hears_why_a_request_is_refused(triton_client):
    tensor = triton.InferInput("input_0", [1, 3], "FP32")
    tensor.set_data_from_numpy(np.array([[1.0, 2.0, 3.0]], dtype=np.float32), binary_data=False)
    with pytest.raises(InferenceServerException) as refused:
        triton_client.infer("model", [tensor])
    assert refused.value.status() == "422" and refused.value.message().startswith("the model failed on this input: ")
    tensor = triton.InferInput("input_0", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"setosa"], dtype=np.object_), binary_data=False)
    with pytest.raises(InferenceServerException) as refused:
        triton_client.infer("model", [tensor])
    assert refused.value.status() == "400" and '"BYTES" is not supported' in refused.value.message()


@pytest.mark.slow
def test_kserve_sdk_rest_client(iris_server):
    seen = run_in_kserve_venv("client", iris_server.url, "model")
    assert seen["live"] is True and seen["ready"] is True
    assert seen["model_ready"] is True and seen["unknown_model_ready"] is False
    for key, rows in (("json", 1), ("binary", 2)):
        answer = seen[key]
        assert answer["id"] == f"kserve-{key}" and answer["model_name"] == "model"
        assert (answer["name"], answer["datatype"], answer["shape"]) == ("output_0", "FP32", [rows, 3])
        assert np.argmax(answer["values"], axis=1).tolist() == [2] * rows
    assert (
        seen["unknown_model"]["status"] == 404 and "unknown model 'no-such-model'" in seen["unknown_model"]["message"]
    )


@pytest.mark.slow
def test_v2_errors_are_the_protocols_json(iris_server):
    url = f"{iris_server.url}/v2/models/model/infer"
    cases = [
        (requests.post(url, data=b"{not json", timeout=30), 400, "body is not valid JSON"),
        (requests.get(url, timeout=30), 405, "use POST"),
        (requests.post(f"{iris_server.url}/v2/models/model", timeout=30), 405, "use GET"),
        (requests.get(f"{iris_server.url}/v2/repository/index", timeout=30), 404, "no route /v2/repository/index"),
        (requests.get(f"{iris_server.url}/v2/models/other", timeout=30), 404, "unknown model 'other'"),
        (
            requests.post(url, json=request("FP64", data=[1.0, 2.0, 3.0], shape=(1, 4)), timeout=30),
            400,
            "inputs[0].shape: [1, 4] holds 4 elements but data has 3",
        ),
        (  # a bare number was answered 200 (explorer P8)
            requests.post(url, json=request("FP32", data=5, shape=(1,)), timeout=30),
            400,
            "inputs[0].data: expected an array of the tensor's elements (row-major), got a number",
        ),
        (
            requests.post(url, data=b"{}", headers={"Content-Encoding": "br"}, timeout=30),
            415,
            "Content-Encoding",
        ),
        (
            requests.post(url, data=b"{}", headers={"Content-Encoding": "gzip"}, timeout=30),
            400,
            "body is not valid gzip",
        ),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == "application/json"
        assert set(response.json()) == {"error"} and message in response.json()["error"]
    assert cases[1][0].headers["allow"] == "POST" and cases[2][0].headers["allow"] == "GET, HEAD"


@pytest.mark.slow
def test_v2_and_service_output_share_the_model(iris_server):
    v2_body = request("FP64", data=IRIS_ROW, shape=(1, 4))

    def both(_):
        v2 = requests.post(f"{iris_server.url}/v2/models/model/infer", json=v2_body, timeout=60)
        contract = iris_server.post({"source": 1, "data": {"dtype": "double", "values": [IRIS_ROW]}}, timeout=60)
        return v2.json()["outputs"][0]["data"], contract.json()["values"][0]

    with ThreadPoolExecutor(8) as pool:
        for v2_values, contract_values in pool.map(both, range(16)):
            np.testing.assert_allclose(v2_values, contract_values, atol=1e-6)
            assert int(np.argmax(v2_values)) == 2


@pytest.fixture(scope="module")
def named_server(tmp_path_factory):
    from tests.fixtures.server import serving

    env = {"MODEL_NAME": "iris", "MAX_REQUEST_BYTES": "4096"}
    with serving(env, tmp_path_factory.mktemp("named-v2-server")) as server:
        yield server


@pytest.mark.slow
def test_model_name_and_body_limit_settings(named_server):
    client = triton.InferenceServerClient(named_server.url.removeprefix("http://"))
    try:
        assert client.is_model_ready("iris") and not client.is_model_ready("model")
        assert client.get_model_metadata("iris")["name"] == "iris"
        tensor = triton.InferInput("input_0", [1, 4], "FP32")
        tensor.set_data_from_numpy(np.array([IRIS_ROW], dtype=np.float32))
        assert client.infer("iris", [tensor]).as_numpy("output_0").argmax() == 2
        big = triton.InferInput("input_0", [300, 4], "FP32")
        big.set_data_from_numpy(np.tile(np.float32(IRIS_ROW), (300, 1)), binary_data=False)
        with pytest.raises(InferenceServerException) as refused:
            client.infer("iris", [big])
        assert refused.value.status() == "413" and "MAX_REQUEST_BYTES" in refused.value.message()
    finally:
        client.close()


def test_v2_takes_a_gzipped_body_like_service_output(iris_server):
    body = orjson.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": IRIS_ROW}]})
    response = requests.post(
        f"{iris_server.url}/v2/models/model/infer",
        data=gzip.compress(body),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    [output] = response.json()["outputs"]
    assert int(np.argmax(output["data"])) == 2


def test_v2_refusal_before_the_body_is_read_closes_the_connection(iris_server):
    # An unknown model's infer is refused before its body is read: the unread body must not be taken for a request.
    host, port = iris_server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v2/models/other/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        answer_bytes = b""
        while chunk := sock.recv(65536):
            answer_bytes += chunk
    head = answer_bytes.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 404") and b"connection: close" in head


# --- outputs asked for: a model with an output the protocol refuses beside ones it carries (explore_kinds K11) -------


class ThreeOutputs(torch.nn.Module):
    """x -> (x reshaped to 33 dimensions, one more than an answer may have; {"b": x > 0, "i8": x as int8}; 7)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        return x.reshape([1] * 31 + x.shape), {"b": x > 0, "i8": x.to(torch.int8)}, 7


def three_outputs_onnx(path):
    """The same as ONNX: x INT64 [n, 2] -> r33 (33 dimensions), b (BOOL), i8 (INT8)."""
    from onnx import TensorProto, helper, numpy_helper

    from tests.test_onnx_workflow import save

    graph = helper.make_graph(
        [
            helper.make_node("Reshape", ["x", "shape33"], ["r33"]),
            helper.make_node("Greater", ["x", "zero"], ["b"]),
            helper.make_node("Cast", ["x"], ["i8"], to=TensorProto.INT8),
        ],
        "three_outputs",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["n", 2])],
        [
            helper.make_tensor_value_info("r33", TensorProto.INT64, [1] * 31 + ["n", 2]),
            helper.make_tensor_value_info("b", TensorProto.BOOL, ["n", 2]),
            helper.make_tensor_value_info("i8", TensorProto.INT8, ["n", 2]),
        ],
        [
            numpy_helper.from_array(np.array([1] * 31 + [-1, 2], dtype=np.int64), "shape33"),
            numpy_helper.from_array(np.array(0, dtype=np.int64), "zero"),
        ],
    )
    return save(graph, path)


# The protocol's names of each served model's outputs: (33 dimensions, bool, int8, every output in order).
OUTPUT_NAMES = {
    "torch": ("output_0", "output_1.b", "output_1.i8", "output_0, output_1.b, output_1.i8, output_2"),
    "onnx": ("r33", "b", "i8", "r33, b, i8"),
}


@pytest.fixture(scope="module", params=["torch", "torch-public-path", "onnx"])
def outputs_server(request, tmp_path_factory):
    from tests.fixtures.server import serving

    folder = tmp_path_factory.mktemp(f"outputs-{request.param}")
    if request.param == "onnx":
        kwargs = {"model_path": str(three_outputs_onnx(folder / "three.onnx")), "batching": False}
        env = {"CLASSIC_INF_WORKFLOW_CLASS": "workflows.onnx_workflow.ONNXInferenceWorkflow"}
    else:
        path = folder / "three.pt"
        torch.jit.save(torch.jit.script(ThreeOutputs()), str(path))
        kwargs = {"model_path": str(path), "batching": False}
        env = {"INFERNET_FAST_PATH": "0"} if request.param == "torch-public-path" else {}
    env["CLASSIC_INF_WORKFLOW_KW_ARGS"] = json.dumps(kwargs)
    with serving(env, folder) as server:
        yield OUTPUT_NAMES[request.param.removesuffix("-public-path")], server


@pytest.mark.slow
def test_v2_answers_the_outputs_asked_for_whatever_the_others_are(outputs_server):
    (r33, b, i8, every), server = outputs_server
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    tensor = triton.InferInput("x", [1, 2], "INT64")
    tensor.set_data_from_numpy(np.array([[-1, 2]], dtype=np.int64), binary_data=False)
    try:
        # Asked for b and i8 only: the 33-dimension output nobody asked for failed the answer (422).
        asked = [triton.InferRequestedOutput(b, binary_data=False), triton.InferRequestedOutput(i8)]
        result = client.infer("model", [tensor], outputs=asked)
        assert [o["name"] for o in result.get_response()["outputs"]] == [b, i8]
        assert result.as_numpy(b).tolist() == [[False, True]] and result.as_numpy(b).dtype == np.bool_
        assert result.as_numpy(i8).tolist() == [[-1, 2]] and result.as_numpy(i8).dtype == np.int8
        # Asked for it, or for every output: it is answered, so the answer is the model's 422.
        for outputs in ([triton.InferRequestedOutput(r33)], None):
            with pytest.raises(InferenceServerException) as refused:
                client.infer("model", [tensor], outputs=outputs)
            assert refused.value.status() == "422" and "33 dimensions exceed the limit of 32" in refused.value.message()
        with pytest.raises(InferenceServerException) as refused:
            client.infer("model", [tensor], outputs=[triton.InferRequestedOutput("nope")])
        assert refused.value.status() == "400"
        assert refused.value.message() == f'outputs: unknown output "nope"; this model\'s outputs are {every}'
    finally:
        client.close()
    # The finding's own request, in JSON; and none asked for is every output.
    url = f"{server.url}/v2/models/model/infer"
    x = {"name": "x", "datatype": "INT64", "shape": [1, 2], "data": [-1, 2]}
    response = requests.post(url, json={"inputs": [x], "outputs": [{"name": b}]}, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"] == [{"name": b, "datatype": "BOOL", "shape": [1, 2], "data": [False, True]}]
    response = requests.post(url, json={"inputs": [x], "outputs": []}, timeout=30)
    assert response.status_code == 422 and "33 dimensions" in response.json()["error"], response.text
    # /service_output answers every output: the whole answer is 422, the contract's rule.
    response = server.post({"source": 1, "data": {"dtype": "long", "shape": [1, 2], "values": [-1, 2]}})
    assert response.status_code == 422 and "33 dimensions exceed the limit of 32" in response.text, response.text
    if r33 == "output_0":  # the TorchScript model's fourth output is a number: answered only when asked for
        response = requests.post(url, json={"inputs": [x], "outputs": [{"name": "output_2"}]}, timeout=30)
        assert response.status_code == 422, response.text
        assert response.json()["error"] == (
            "the model's output output_2 is a number, not a tensor; use /service_output, or have the workflow's "
            "postprocess return tensors (workflows.tensors.encode_output)"
        )
