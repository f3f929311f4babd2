"""The built-in ONNX workflow: real ONNX models built here with onnx.helper, run by onnxruntime, in process through
the workflow's hooks and through the real ``bentoml serve``.

torch.onnx.export is not used: torch 2.13's exporter needs onnxscript, which is not installed; the iris graph is
written node by node from the TorchScript weights of models/iris/model.torch instead (Linear-ReLU-Linear-ReLU-Linear,
softmax over classes), so it answers what the torch model answers.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import aiohttp
import numpy as np
import onnx
import pytest
import requests
import torch
from eth_abi import decode
from onnx import TensorProto, helper, numpy_helper

from core.errors import InputError, StartupError
from core.settings import EMBEDDED_MODEL, ServiceSettings, TorchSettings
from tests.fixtures.server import serving
from tests.test_batching_http import batch_histogram, fire_together
from workflows.base import run_batch
from workflows.onnx_workflow import ONNXInferenceWorkflow, is_onnx

IRIS_VECTOR = [1.0380048, 0.5586108, 1.1037828, 1.712096]
LEGACY_ONNX_CLASS = "infernet_ml.workflows.inference.onnx_inference_workflow.ONNXInferenceWorkflow"
ONNX_CLASS = "workflows.onnx_workflow.ONNXInferenceWorkflow"
CALLERS = 40


def save(graph: onnx.GraphProto, path: Path) -> Path:
    # Opset 17 and IR 8: what onnxruntime of any recent version runs; onnx's newest defaults may be ahead of it.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def iris_onnx(path: Path, batch: str | int = "batch", features: str | int = 4) -> Path:
    """The embedded iris model as ONNX: input "input" [batch, 4] float, output "output" [batch, 3] (probabilities).
    ``features`` named: the declaration lets any row length through to the forward, which then fails."""
    weights = torch.jit.load(str(EMBEDDED_MODEL)).state_dict()
    initializers, nodes, current = [], [], "input"
    for i, layer in enumerate((0, 2, 4)):
        w, b = f"w{i}", f"b{i}"
        initializers.append(numpy_helper.from_array(weights[f"layers.{layer}.weight"].numpy(), w))
        initializers.append(numpy_helper.from_array(weights[f"layers.{layer}.bias"].numpy(), b))
        nodes.append(helper.make_node("Gemm", [current, w, b], [f"linear{i}"], transB=1))
        current = f"linear{i}"
        if layer != 4:
            nodes.append(helper.make_node("Relu", [current], [f"relu{i}"]))
            current = f"relu{i}"
    nodes.append(helper.make_node("Softmax", [current], ["output"], axis=1))
    graph = helper.make_graph(
        nodes,
        "iris",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, features])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, 3])],
        initializers,
    )
    return save(graph, path)


def two_input_onnx(path: Path) -> Path:
    """a [n, 3] float and b [n, 3] long -> "sum" = a + b (float), "count" = b summed per row (long, [n, 1])."""
    nodes = [
        helper.make_node("Cast", ["b"], ["b_float"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["a", "b_float"], ["sum"]),
        helper.make_node("ReduceSum", ["b", "axes"], ["count"], keepdims=1),
    ]
    graph = helper.make_graph(
        nodes,
        "two_inputs",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("b", TensorProto.INT64, ["n", 3]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("count", TensorProto.INT64, ["n", 1]),
        ],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")],
    )
    return save(graph, path)


def row_mixing_onnx(path: Path, centre: bool = False) -> Path:
    """Declares a dynamic first axis but divides by the sum over it, or (``centre``) subtracts the mean over it: a
    batch changes every row's answer. The mean is what two copies of the warm-up input could not show (explorer P1)."""
    reduce = (
        helper.make_node("ReduceMean", ["x"], ["total"], axes=[0], keepdims=1)  # opset 13: axes an attribute
        if centre
        else helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=1)
    )
    nodes = [reduce, helper.make_node("Sub" if centre else "Div", ["x", "total"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "row_mixing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(np.array([0], dtype=np.int64), "axes")],
    )
    return save(graph, path)


def sum_then_centre_onnx(path: Path) -> Path:
    """x [batch, 3] float -> y [batch, 1]: each row's sum minus the batch's mean of those sums. A row's sum ignores
    the order of its values, so a batch with the input reversed read as two copies (explore_kinds K1)."""
    nodes = [
        helper.make_node("ReduceSum", ["x", "last"], ["sums"], keepdims=1),
        helper.make_node("ReduceMean", ["sums"], ["mean"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["sums", "mean"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sum_then_centre",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.array([-1], dtype=np.int64), "last")],
    )
    return save(graph, path)


def sum_then_centre(rows: list[list[float]]) -> list[list[float]]:
    """What ``sum_then_centre_onnx`` answers for ``rows`` alone."""
    sums = np.asarray(rows, dtype=np.float32).sum(-1, keepdims=True)
    return (sums - sums.mean(0, keepdims=True)).tolist()


def square_onnx(path: Path) -> Path:
    """x [n, n] float -> y = x (Identity): one input naming one dimension twice."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "square",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "n"])],
    )
    return save(graph, path)


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("onnx-models")
    return {
        "iris": iris_onnx(folder / "iris.onnx"),
        "static": iris_onnx(folder / "iris-static.onnx", batch=1),
        "any-features": iris_onnx(folder / "iris-any-features.onnx", features="features"),
        "two": two_input_onnx(folder / "two.onnx"),
        "mixing": row_mixing_onnx(folder / "mixing.onnx"),
        "centring": row_mixing_onnx(folder / "centring.onnx", centre=True),
        "sum-then-centre": sum_then_centre_onnx(folder / "sum-then-centre.onnx"),
        "square": square_onnx(folder / "square.onnx"),
    }


def torch_iris(rows: list[list[float]]) -> list[list[float]]:
    with torch.inference_mode():
        return torch.jit.load(str(EMBEDDED_MODEL))(torch.tensor(rows, dtype=torch.float32)).tolist()


def build(path: Path, tmp_path: Path, **kwargs) -> ONNXInferenceWorkflow:
    """What the runner does at start-up: construct, setup, warmup."""
    settings = TorchSettings(model_cache_dir=tmp_path / "cache", num_threads=1)
    workflow = ONNXInferenceWorkflow(model_path=str(path), settings=settings, **kwargs)
    workflow.setup()
    workflow.warmup()
    return workflow


def answer(workflow: ONNXInferenceWorkflow, data) -> object:
    """One request alone, JSON-shaped as a client reads it."""
    return json.loads(json.dumps(workflow.inference(data), default=lambda a: a.tolist()))


# --- in process, through the workflow's hooks ---------------------------------------------------------------------


def test_iris_onnx_gives_class_2_in_every_input_form(onnx_models, tmp_path):
    workflow = build(onnx_models["iris"], tmp_path)
    forms = [
        {"input": [IRIS_VECTOR]},  # the original ONNX service's request
        {"inputs": {"input": {"dtype": "float", "shape": [1, 4], "values": IRIS_VECTOR}}},  # infernet-ml 2.0
        {"dtype": "double", "values": [IRIS_VECTOR]},  # the contract's single tensor
    ]
    expected = torch_iris([IRIS_VECTOR])[0]
    for data in forms:
        body = answer(workflow, data)
        assert body["dtype"] == "float" and body["shape"] == [1, 3], data
        assert int(np.argmax(body["values"][0])) == 2
        assert body["values"][0] == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_describe_names_inputs_outputs_and_a_checked_batch(onnx_models, tmp_path):
    workflow = build(onnx_models["iris"], tmp_path, warmup_input={"input": [IRIS_VECTOR]})
    info = workflow.describe()
    assert info["format"] == "onnx" and info["device"] == "cpu" and info["providers"] == ["CPUExecutionProvider"]
    assert info["inputs"] == [{"name": "input", "dtype": "float", "shape": ["batch", 4]}]
    assert info["outputs"] == [{"name": "output", "dtype": "float", "shape": ["batch", 3]}]
    assert info["batching"]["enabled"] and info["batching"]["checked"], info["batching"]


def test_a_batch_gives_each_request_its_solo_answer(onnx_models, tmp_path):
    workflow = build(onnx_models["iris"], tmp_path)
    requests_ = [{"input": [[i / 7, -i / 5, 0.5, i / 3]] * (1 + i % 3)} for i in range(6)]
    items = [workflow.preprocess(data) for data in requests_]
    assert len({workflow.batch_key(item) for item in items}) == 1
    outputs = workflow.unbatch(workflow.run_model(workflow.batch(items)), items)
    for data, output in zip(requests_, outputs, strict=True):
        batched = workflow.postprocess(output)
        solo = workflow.inference(data)
        assert batched["shape"] == solo["shape"] == [len(data["input"]), 3]
        np.testing.assert_allclose(batched["values"], solo["values"], rtol=1e-5, atol=1e-7)


def test_two_inputs_by_name_answer_each_output_by_name(onnx_models, tmp_path):
    workflow = build(onnx_models["two"], tmp_path)
    data = {
        "inputs": {
            "a": {"dtype": "float", "shape": [2, 3], "values": [0.5, 1, 2, 3, 4, 5]},
            "b": {"dtype": "int", "values": [[1, 2, 3], [4, 5, 6]]},  # int, cast to the model's long
        }
    }
    body = answer(workflow, data)
    assert body == {
        "sum": {"dtype": "float", "shape": [2, 3], "values": [[1.5, 3, 5], [7, 9, 11]]},
        "count": {"dtype": "long", "shape": [2, 1], "values": [[6], [15]]},
    }
    # The original service's form: input names mapped to values, in the model's own dtypes.
    assert answer(workflow, {"a": [[0.5, 1, 2], [3, 4, 5]], "b": [[1, 2, 3], [4, 5, 6]]}) == body
    assert workflow.describe()["inputs"] == [
        {"name": "a", "dtype": "float", "shape": ["n", 3]},
        {"name": "b", "dtype": "long", "shape": ["n", 3]},
    ]


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"inputs": {"a": {"dtype": "float", "values": [[1, 2, 3]]}}}, ["missing input 'b'", "'a' float [n, 3]"]),
        (
            {"inputs": {"a": {"dtype": "float", "values": [[1, 2, 3]]}, "c": {"dtype": "float", "values": [1]}}},
            ["inputs.c: the model has no input 'c'", "'a' float [n, 3], 'b' long [n, 3]"],
        ),
        (
            {"inputs": {"a": {"dtype": "float", "values": [[1, 2]]}, "b": {"dtype": "long", "values": [[1, 2, 3]]}}},
            ["inputs.a: shape [1, 2] does not fit the model's input 'a' [n, 3]"],
        ),
        (
            {"inputs": {"a": {"dtype": "float", "values": [1, 2, 3]}, "b": {"dtype": "long", "values": [[1, 2, 3]]}}},
            ["inputs.a: shape [3] does not fit the model's input 'a' [n, 3]"],
        ),
        (
            {
                "inputs": {
                    "a": {"dtype": "float", "values": [[1, 2, 3]]},
                    "b": {"dtype": "double", "values": [[1, 2.5, 3]]},
                }
            },
            ["inputs.b.values[0][1]: 2.5 does not fit long"],
        ),
        (  # both declared [n, 3]: onnxruntime would broadcast a's one row onto b's two (explorer P4)
            {"a": [[1, 2, 3]], "b": [[1, 2, 3], [4, 5, 6]]},
            ["data: inputs 'a' and 'b' differ in the model's dimension 'n' (1 in 'a', 2 in 'b')", "'a' float [n, 3]"],
        ),
        ({"a": [[1, 2, 3]], "b": [[1, True, 3]]}, ["b[0][1]: long expects numbers, got true"]),
        ({"a": [[1, 2, 3]], "b": [[1, 2.5, 3]]}, ["b[0][1]: long expects integers, got 2.5"]),
        ({"dtype": "float", "values": [[1, 2, 3]]}, ["the model takes 2 inputs", "'b' long [n, 3]"]),
        ({"input": [[1, 2, 3]]}, ["missing input 'b'"]),  # "input" names the first input, "a"
        ({"inputs": {"a": [1, 2, 3]}}, ["inputs.a: expected an object with 'dtype' and 'values'"]),
        ({"inputs": {"a": {"dtype": "float128", "values": [1]}}}, ['inputs.a.dtype: unknown dtype "float128"']),
        ([1, 2, 3], ["data: expected an object"]),
    ],
)
def test_malformed_requests_name_what_the_model_expects(onnx_models, tmp_path, data, fragments):
    workflow = build(onnx_models["two"], tmp_path)
    with pytest.raises(InputError) as raised:
        workflow.preprocess(data)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_a_forward_that_fails_names_the_input_and_the_declared_inputs(onnx_models, tmp_path):
    """Explorer F5d's kind for ONNX: a shape the declaration lets through but the graph refuses was a 422 with
    onnxruntime's words alone; it also says what the input was and what the model declares."""
    workflow = build(onnx_models["any-features"], tmp_path)
    [outcome] = run_batch(workflow, [{"input": [[1.0, 2.0, 3.0]]}])
    assert outcome.status == 422
    assert outcome.description.startswith("the model failed on this input: ")
    assert outcome.description.endswith(
        "; the input was 'input' float [1, 3]; the model declares 'input' float [batch, features]"
    )
    assert (
        str(tmp_path) not in outcome.description and str(onnx_models["any-features"].parent) not in outcome.description
    )


def test_one_input_naming_a_dimension_twice_must_be_square(onnx_models, tmp_path):
    workflow = build(onnx_models["square"], tmp_path)
    # The contract's single tensor: the form /v2 requests reach the workflow in.
    assert answer(workflow, {"dtype": "float", "values": [[1, 2], [3, 4]]})["values"] == [[1, 2], [3, 4]]
    with pytest.raises(InputError, match=r"data: input 'x' differs in the model's dimension 'n' \(1 and 2\)"):
        workflow.preprocess({"dtype": "float", "values": [[1, 2]]})


def test_a_fixed_first_dimension_runs_alone(onnx_models, tmp_path):
    workflow = build(onnx_models["static"], tmp_path, warmup_input={"input": [IRIS_VECTOR]})
    item = workflow.preprocess({"input": [IRIS_VECTOR]})
    assert workflow.batch_key(item) is None
    batching = workflow.describe()["batching"]
    assert not batching["enabled"] and "fixed or no first dimension on input, output" in batching["reason"]
    assert answer(workflow, {"input": [IRIS_VECTOR]})["values"][0] == pytest.approx(
        torch_iris([IRIS_VECTOR])[0], rel=1e-5
    )
    with pytest.raises(InputError, match=r"shape \[2, 4\] does not fit the model's input 'input' \[1, 4\]"):
        workflow.preprocess({"input": [IRIS_VECTOR, IRIS_VECTOR]})


@pytest.mark.parametrize(
    ("model", "warmup"),
    [
        ("mixing", [[1, 3]]),
        ("centring", [[1, 3]]),
        ("centring", [[1, 3], [3, 1]]),  # rows that are each other reversed: the reversed variant is the same batch
        ("sum-then-centre", [[1, 2, 3]]),
    ],
    ids=["mixing", "centring", "centring-mirrored-warmup", "sum-then-centre"],
)
def test_start_up_turns_batching_off_for_a_model_that_mixes_rows(onnx_models, tmp_path, model, warmup):
    workflow = build(onnx_models[model], tmp_path, warmup_input={"inputs": {"x": {"dtype": "float", "values": warmup}}})
    batching = workflow.describe()["batching"]
    assert (
        batching
        == {
            "enabled": False,
            "checked": True,
            "reason": batching["reason"],
        }
        and "answered differently from each alone" in batching["reason"]
    )
    assert workflow.batch_key(workflow.preprocess({"x": [[1, 3, 5][: len(warmup[0])]]})) is None


def test_is_onnx_tells_onnx_bytes_from_torch_files(onnx_models, tmp_path):
    assert is_onnx(onnx_models["iris"])
    renamed = shutil.copy(onnx_models["iris"], tmp_path / "model.bin")  # no extension to go by: the bytes decide
    assert is_onnx(renamed)
    assert not is_onnx(EMBEDDED_MODEL)  # TorchScript (a zip archive)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.torch")
    assert not is_onnx(tmp_path / "pickled.torch")
    (tmp_path / "notes.txt").write_text("hello")
    assert not is_onnx(tmp_path / "notes.txt") and not is_onnx(tmp_path / "absent.bin")


def test_start_up_errors_name_the_problem(onnx_models, tmp_path):
    with pytest.raises(StartupError, match=r"output_names: the model has no output 'probs' \(its outputs: output\)"):
        build(onnx_models["iris"], tmp_path, output_names=["probs"])
    with pytest.raises(StartupError, match=r"cannot load model\.torch as ONNX"):
        build(EMBEDDED_MODEL, tmp_path)
    with pytest.raises(StartupError, match="providers: NoSuchExecutionProvider not available"):
        build(onnx_models["iris"], tmp_path, providers=["NoSuchExecutionProvider"])


def test_output_names_choose_the_outputs(onnx_models, tmp_path):
    workflow = build(onnx_models["two"], tmp_path, output_names="count")
    body = answer(workflow, {"a": [[0, 0, 0]], "b": [[1, 2, 3]]})
    assert body == {"dtype": "long", "shape": [1, 1], "values": [[6]]}  # one output chosen: one tensor


def test_the_original_librarys_class_path_maps_to_the_onnx_workflow():
    env = {"CLASSIC_INF_WORKFLOW_CLASS": LEGACY_ONNX_CLASS, "CLASSIC_INF_WORKFLOW_KW_ARGS": "{}"}
    assert ServiceSettings.from_env(env).workflow_class == ONNX_CLASS


# --- through the real service ---------------------------------------------------------------------------------------


def offchain(data) -> dict:
    return {"source": 1, "data": data}


@pytest.fixture(scope="module")
def onnx_server(onnx_models, tmp_path_factory):
    kwargs = {"model_path": str(onnx_models["iris"]), "warmup_input": {"input": [IRIS_VECTOR]}}
    env = {"CLASSIC_INF_WORKFLOW_CLASS": ONNX_CLASS, "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps(kwargs)}
    with serving(env, tmp_path_factory.mktemp("onnx-server")) as server:
        yield server


def test_served_iris_onnx_is_class_2_in_both_forms(onnx_server):
    expected = torch_iris([IRIS_VECTOR])[0]
    for data in (
        {"input": [IRIS_VECTOR]},
        {"inputs": {"input": {"dtype": "float", "shape": [1, 4], "values": IRIS_VECTOR}}},
    ):
        response = onnx_server.post(offchain(data))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["dtype"] == "float" and body["shape"] == [1, 3]
        assert int(np.argmax(body["values"][0])) == 2
        assert body["values"][0] == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_served_iris_onnx_takes_2_0_named_inputs(onnx_server):
    # C7: infernet-ml 2.0's ONNX service took {"model_id"?, "inputs": {name: RitualVector}} (dtype codes, flat values)
    # and answered {"result": [vector per output]}; its requests were a 400 here. Posted with aiohttp, as the node.
    vector = {"dtype": 1, "shape": [1, 4], "values": IRIS_VECTOR}

    async def ask() -> list[tuple[int, dict]]:
        bodies = [
            offchain({"model_id": None, "inputs": {"input": vector}}),
            offchain({"inputs": {"x": vector}}),
            {"source": 1, "destination": 0, "data": {"inputs": {"input": vector}}},
        ]
        async with aiohttp.ClientSession() as session:
            answers = []
            for body in bodies:
                async with session.post(f"{onnx_server.url}/service_output", json=body) as response:
                    answers.append((response.status, await response.json()))
            return answers

    (ok, answer), (bad, error), (chain_ok, chain) = asyncio.run(ask())
    assert ok == 200, answer
    [result] = answer["result"]
    assert result["dtype"] == 1 and result["shape"] == [1, 3]  # float32, flat values
    assert result["values"] == pytest.approx(torch_iris([IRIS_VECTOR])[0], rel=1e-5, abs=1e-7)
    assert bad == 400 and error["description"].startswith(
        "inputs.x: the model has no input 'x'; its inputs: 'input' float [batch, 4]"
    ), error
    assert chain_ok == 200, chain
    words = decode(["uint8", "uint8", "uint8", "uint16[]", "int32[]"], bytes.fromhex(chain["raw_output"]))
    assert words[:4] == (0, 18, 1, (1, 3))  # a 2.0 float32 vector, IEEE


def test_served_info_describes_the_onnx_model(onnx_server):
    info = onnx_server.get("/info").json()
    assert info["workflow"] == ONNX_CLASS
    model = info["model"]
    assert model["format"] == "onnx" and model["file"] == "iris.onnx" and len(model["sha256"]) == 64
    assert model["inputs"] == [{"name": "input", "dtype": "float", "shape": ["batch", 4]}]
    assert model["outputs"] == [{"name": "output", "dtype": "float", "shape": ["batch", 3]}]
    assert model["batching"]["enabled"] and model["batching"]["checked"]
    # The Open Inference Protocol's metadata says the same (it said platform "python" and one FP32 input_0)
    assert onnx_server.get("/v2/models/model").json() == {
        "name": "model",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 3]}],
    }


def test_v2_names_a_lone_output_as_the_metadata_does(onnx_server):
    # K9: the metadata lists "output", and inference called it "output_0" (asking for "output" was a 400).
    v2 = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": IRIS_VECTOR}]}
    url = f"{onnx_server.url}/v2/models/model/infer"
    for body in (v2, {**v2, "outputs": [{"name": "output"}]}):
        response = requests.post(url, json=body, timeout=30)
        assert response.status_code == 200, response.text
        [output] = response.json()["outputs"]
        assert output["name"] == "output" and output["shape"] == [1, 3], output
        assert output["data"] == pytest.approx(torch_iris([IRIS_VECTOR])[0], rel=1e-5, abs=1e-7)
    response = requests.post(url, json={**v2, "outputs": [{"name": "output_0"}]}, timeout=30)
    assert response.status_code == 400 and "this model's outputs are output" in response.text, response.text


def test_served_concurrent_callers_batch_and_get_their_solo_answers(onnx_server):
    def rows_for(caller: int) -> list[list[float]]:
        return [[caller / 10, -caller / 20, (caller % 7) / 3, row / 5] for row in range(1 + caller % 3)]

    before = batch_histogram(onnx_server)
    responses = fire_together(onnx_server, [offchain({"input": rows_for(i)}) for i in range(CALLERS)])
    for caller, response in enumerate(responses):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["shape"] == [len(rows_for(caller)), 3]
        np.testing.assert_allclose(body["values"], torch_iris(rows_for(caller)), rtol=1e-5, atol=1e-7)
    after = batch_histogram(onnx_server)
    assert (after["+Inf"] - before.get("+Inf", 0.0)) - (after["1.0"] - before.get("1.0", 0.0)) >= 1


def test_served_errors_are_400_naming_the_expected_input(onnx_server):
    response = onnx_server.post(offchain({"inputs": {"x": {"dtype": "float", "values": [[1, 2, 3, 4]]}}}))
    assert response.status_code == 400, response.text
    body = response.json()
    assert (
        body["code"] == "400"
        and "no input 'x'" in body["description"]
        and "'input' float [batch, 4]" in body["description"]
    )
    response = onnx_server.post(offchain({"input": [[1, 2, 3]]}))
    assert response.status_code == 400, response.text
    assert "shape [1, 3] does not fit the model's input 'input' [batch, 4]" in response.json()["description"]


def test_served_sum_then_centre_model_answers_each_caller_alone(onnx_models, tmp_path):
    # Passed the start-up check (its input reversed has the same sums) and answered most concurrent callers with
    # values from the others' rows (explore_kinds K1).
    kwargs = {"model_path": str(onnx_models["sum-then-centre"]), "warmup_input": {"x": [[1.0, 2.0, 3.0]]}}
    env = {"CLASSIC_INF_WORKFLOW_CLASS": ONNX_CLASS, "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps(kwargs)}

    def rows_for(caller: int) -> list[list[float]]:
        return [[caller, 2.0 * caller, 0.5 - caller + row] for row in range(1 + caller % 2)]

    with serving(env, tmp_path) as server:
        assert server.get("/info").json()["model"]["batching"]["enabled"] is False
        for _ in range(2):
            responses = fire_together(server, [offchain({"x": rows_for(i)}) for i in range(20)])
            for caller, response in enumerate(responses):
                assert response.status_code == 200, response.text
                np.testing.assert_allclose(response.json()["values"], sum_then_centre(rows_for(caller)), atol=1e-5)


def test_served_two_input_model_by_the_original_class_path(onnx_models, tmp_path):
    env = {
        "CLASSIC_INF_WORKFLOW_CLASS": LEGACY_ONNX_CLASS,
        "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": str(onnx_models["two"])}),
    }
    with serving(env, tmp_path) as server:
        assert server.get("/info").json()["workflow"] == ONNX_CLASS
        data = {
            "inputs": {"a": {"dtype": "float", "values": [[1, 2, 3]]}, "b": {"dtype": "long", "values": [[4, 5, 6]]}}
        }
        response = server.post(offchain(data))
        assert response.status_code == 200, response.text
        assert response.json() == {
            "sum": {"dtype": "float", "shape": [1, 3], "values": [[5, 7, 9]]},
            "count": {"dtype": "long", "shape": [1, 1], "values": [[15]]},
        }
        # 2.0's ONNX request (dtype codes: 1 float32, 8 int64): OFFCHAIN, a vector per output; on chain a 422 that
        # says why (raw_output is one vector) and what to send instead, where 1.x's ONNX service put result[0] there.
        v2_inputs = {
            "a": {"dtype": 1, "shape": [1, 3], "values": [1, 2, 3]},
            "b": {"dtype": 8, "shape": [1, 3], "values": [4, 5, 6]},
        }
        response = server.post(offchain({"inputs": v2_inputs}))
        assert response.status_code == 200, response.text
        assert [(r["dtype"], r["shape"], r["values"]) for r in response.json()["result"]] == [
            (1, [1, 3], [5, 7, 9]),
            (8, [1, 1], [15]),
        ]
        response = server.post({"source": 1, "destination": 0, "data": {"inputs": v2_inputs}})
        assert response.status_code == 422, response.text
        assert response.json()["description"] == (
            "the answer does not fit the request's layout: output: the answer holds 2 tensors (an object with keys "
            "sum, count); a 2.0 CHAIN answer holds one vector (raw_output is one RitualVector), and putting only the "
            'first on chain would drop the others unseen: ask with destination 1 (OFFCHAIN) for {"result": [a vector '
            "per output]}, or serve one output (the ONNX workflow's output_names)"
        )
        response = server.post(offchain({"a": [[1, 2, 3]]}))
        assert response.status_code == 400 and "missing input 'b'" in response.json()["description"]
        # a and b share the declared first dimension n: one row and two rows was answered 200, broadcast (explorer P4)
        response = server.post(offchain({"a": [[1, 2, 3]], "b": [[4, 5, 6], [7, 8, 9]]}))
        assert response.status_code == 400, response.text
        assert response.json()["description"].startswith(
            "data: inputs 'a' and 'b' differ in the model's dimension 'n' (1 in 'a', 2 in 'b'), which must be one size"
        )


def test_the_start_up_log_names_the_onnx_workflow_for_an_onnx_file(onnx_models, capsys):
    # The load line named the torch workflow, which had handed the file on (explorer P8).
    from tests.test_startup_progress import startup_lines
    from workflows import startup

    startup.build(ServiceSettings(workflow_kwargs={"model_path": str(onnx_models["iris"])}))
    [load] = [line for line in startup_lines(capsys.readouterr().err) if line[1] == "load"]
    assert f"workflow={ONNX_CLASS}" in load[4] and "format=onnx" in load[4], load


def test_a_failed_load_of_an_onnx_file_names_the_onnx_workflow(tmp_path, capsys):
    # The load line named the ONNX workflow only once the load had succeeded; a failed one named the torch workflow,
    # which had handed the file on (explorer P8).
    from tests.test_startup_progress import startup_lines
    from workflows import startup

    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(b"\x08\x07" + bytes(range(256)))
    with pytest.raises(StartupError, match=r"cannot load damaged\.onnx as ONNX"):
        startup.build(ServiceSettings(workflow_kwargs={"model_path": str(damaged)}))
    [load] = [line for line in startup_lines(capsys.readouterr().err) if line[1] == "load"]
    assert load[2] == "failed" and f"workflow={ONNX_CLASS}" in load[4], load
