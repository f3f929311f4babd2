"""Start-up over real servers: custom workflow classes from the environment, readiness, one-line refusals,
and the three model formats."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import requests
import torch

from core.errors import StartupError
from tests.fixtures import server as server_fixture
from tests.fixtures.server import run_to_exit, serving, start, stop, wait_ready
from tests.models import Affine, EmbeddingSum, save
from tests.test_public_app import assert_error


def error(response, status):
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == str(status)
    return body["description"]


# Both paths: BentoML's public one (INFERNET_FAST_PATH=0) answered the health routes in plain text (explorer F-i).
@pytest.mark.parametrize("fast_path", ["1", "0"], ids=["fast-path", "public-path"])
def test_custom_workflow_from_env(tmp_path, fast_path):
    env = {
        "CLASSIC_INF_WORKFLOW_CLASS": "tests.workflows_for_tests.Toolbox",
        "CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS": '["hello"]',
        "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"scale": 3, "setup_seconds": 6}),
        "MAX_REQUEST_BYTES": "4096",
        "INFERNET_FAST_PATH": fast_path,
    }
    server = start(env, tmp_path)
    try:
        # While the workflow sets up, the service is alive but not ready, and says so in JSON.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{server.url}/livez", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.2)
        # Not ready: the contract's JSON 503 (BentoML's own was plain text naming `.__is_ready__()`).
        loading = requests.get(f"{server.url}/readyz", timeout=15)
        assert "still loading" in error(loading, 503)
        assert loading.headers["retry-after"] == "1"
        assert "still loading" in error(server.post({"source": 1, "data": {"echo": 1}}), 503)
        for path in ("/livez", "/healthz"):  # alive while loading; /healthz is BentoML's other name for /livez
            live = server.get(path)
            assert (live.status_code, live.headers["content-type"], live.json()) == (
                200,
                "application/json",
                {"live": True},
            )

        wait_ready(server)
        ready = server.get("/readyz")
        assert (ready.status_code, ready.headers["content-type"], ready.json()) == (
            200,
            "application/json",
            {"ready": True},
        )
        response = server.post({"source": 1, "data": {"echo": [1, "two"]}})
        assert response.status_code == 200, response.text
        assert response.json() == {"prefix": "hello", "scale": 3, "echo": [1, "two"]}

        assert "not JSON-serialisable" in error(server.post({"source": 1, "data": {"set": 1}}), 500)
        assert "kaput" in error(server.post({"source": 1, "data": {"fail": "kaput"}}), 422)
        assert "expected one of echo, set, fail" in error(server.post({"source": 1, "data": {}}), 400)
        assert "exceeds the limit of 4096" in error(server.post({"source": 1, "data": {"echo": "x" * 5000}}), 413)
        chunked = requests.post(
            f"{server.url}/service_output",
            data=iter([b'{"source": 1, "data": {"echo": "', b"y" * 5000, b'"}}']),
            timeout=30,
        )
        assert "exceeds the limit of 4096" in error(chunked, 413)

        info = server.get("/info").json()
        assert info["workflow"] == "tests.workflows_for_tests.Toolbox" and info["model"] == {"prefix": "hello"}
        # Explorer F15: its description names no model repository, so there is no model a node could name; it was
        # listed as a blank one (name "", repo_id "local/local", an id the service itself refuses).
        compute = server.get("/service-resources").json()["compute_capability"][0]
        assert (compute["models"], compute["cached_models"]) == ([], [])
    finally:
        stop(server)


def test_a_tensor_workflow_of_its_own_keeps_the_element_limit_and_its_warmup_line_points_at_warmup(tmp_path):
    # Explorer F14: a TensorWorkflow that never set max_elements decoded any number of values while /info reported
    # MAX_REQUEST_ELEMENTS as the limit. F2: its warm-up line pointed at KW_ARGS warmup_input, which it cannot take.
    env = {"CLASSIC_INF_WORKFLOW_CLASS": "tests.workflows_for_tests.Doubler", "MAX_REQUEST_ELEMENTS": "10"}
    with serving(env, tmp_path) as server:
        assert server.get("/info").json()["limits"]["max_request_elements"] == 10
        small = server.post({"source": 1, "data": {"dtype": "float", "values": [[1, 2, 3, 4]]}})
        assert small.status_code == 200, small.text
        assert small.json()["values"] == [[2, 4, 6, 8]]
        values = [list(range(20))]
        for data in ({"dtype": "float", "values": values}, {"input": {"dtype": "float", "values": values}}):
            refused = error(server.post({"source": 1, "data": data}), 400)
            assert refused == "values: 20 elements exceed the limit of 10 per request", data
        [warmup] = [line for line in server.log().splitlines() if "stage=warmup" in line]
        assert (
            "status=skipped" in warmup
            and 'reason="Doubler.warmup() ran no sample (define warmup() to run one)"' in warmup
        )
        assert "KW_ARGS warmup_input" not in warmup


def test_a_workflows_own_hooks_and_errors_on_both_routes(tmp_path):
    # Lead findings: a workflow's own ModelError (and a shape or dtype check of its own in preprocess) reached the
    # client without the input's shape and dtype that the service's own checks give; and /v2 ran the workflow's
    # own postprocess with no word of it in the docs, so its 422 for labels pointed at /service_output alone.
    # /v2 runs the workflow's hooks as /service_output does (docs/contract.md, "Shapes, ranks and BOOL bytes").
    with serving({"CLASSIC_INF_WORKFLOW_CLASS": "tests.workflows_for_tests.OwnHooks"}, tmp_path) as server:
        sent = {"dtype": "float", "values": [[1, 2, 3]]}
        ok = server.post({"source": 1, "data": sent})
        assert ok.status_code == 200, ok.text
        assert ok.json() == {
            "scored": {"dtype": "float", "shape": [1, 3], "values": [[104.0, 106.0, 108.0]]},
            "labels": ["small", "small", "small"],
        }
        # The workflow's own ModelError from its forward: 422, its words, then the input as sent (never its values).
        wide = {"dtype": "float", "values": [[1.5, 2.5, 3.5, 4.5], [5.5, 6.5, 7.5, 8.5]]}
        described = error(server.post({"source": 1, "data": wide}), 422)
        assert described == "OwnHooks takes 3 features, got 4; the input had shape [2, 4] float", described
        # The workflow's own check in preprocess: 400, its words, then the request's tensor as sent.
        ints = {"dtype": "long", "shape": [1, 3], "values": [7, 8, 9]}
        described = error(server.post({"source": 1, "data": ints}), 400)
        assert described == "OwnHooks takes float tensors, got torch.int64; the input had shape [1, 3] long"

        url = f"{server.url}/v2/models/model/infer"
        x = {"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}
        # Its preprocess (+1) and postprocess (+100) run on /v2 too: the tensor it answers is (x + 1) * 2 + 100.
        scored = requests.post(url, json={"inputs": [x], "outputs": [{"name": "scored"}]}, timeout=30)
        assert scored.status_code == 200, scored.text
        assert scored.json()["outputs"] == [
            {"name": "scored", "datatype": "FP32", "shape": [1, 3], "data": [104, 106, 108]}
        ]
        # Its labels are no tensor: the 422 names both fixes.
        labels = requests.post(url, json={"inputs": [x]}, timeout=30)
        assert labels.status_code == 422, labels.text
        assert labels.json()["error"] == (
            "the model's output labels.0 is a string, not a tensor; use /service_output, or have the workflow's "
            "postprocess return tensors (workflows.tensors.encode_output)"
        )
        # The same errors of its own on /v2, with the same note.
        wide_v2 = {"name": "x", "datatype": "FP32", "shape": [2, 4], "data": list(range(8))}
        refused = requests.post(url, json={"inputs": [wide_v2]}, timeout=30)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"] == "OwnHooks takes 3 features, got 4; the input had shape [2, 4] float"
        log = server.log()
        assert "1.5" not in log and "8.5" not in log  # the values sent are never echoed nor logged


def test_an_integer_id_model_under_cast_inputs_says_how_to_fix_it(tmp_path):
    # Explorer F11: the default cast_inputs casts the client's long ids to the model's float, and the model's error
    # blamed a FloatTensor the client never sent, with no word of cast_inputs, in the 422 and at start-up alike.
    path = save(EmbeddingSum(), tmp_path / "ids.torch", "torchscript", torch.tensor([[1, 2, 3]]))
    ids = {"dtype": "long", "values": [[1, 2, 3]]}
    hint = (
        "(cast_inputs is true, so inputs are cast to the model's float; for a model that takes integer ids set "
        '"cast_inputs": false in CLASSIC_INF_WORKFLOW_KW_ARGS)'
    )
    with serving({"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": str(path)})}, tmp_path) as server:
        described = error(server.post({"source": 1, "data": ids}), 422)
        assert "but got torch.FloatTensor instead" in described and described.endswith(hint), described
    env = {"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": str(path), "warmup_input": ids})}
    (tmp_path / "warmup").mkdir()
    status, output = run_to_exit(env, tmp_path / "warmup")
    assert status == 2, output[-2000:]
    [line] = [line for line in output.splitlines() if "start-up failed" in line]
    assert "warmup_input: RuntimeError: Expected tensor for argument #1 'indices'" in line and line.endswith(hint)


IRIS = "models/iris/model.torch"


@pytest.mark.parametrize(
    "env, expected",
    [
        (
            {"CLASSIC_INF_WORKFLOW_KW_ARGS": "{model_path: oops}"},
            "start-up failed (configuration): CLASSIC_INF_WORKFLOW_KW_ARGS: expected a JSON object, got malformed JSON",
        ),
        (
            {"CLASSIC_INF_WORKFLOW_CLASS": "no_such_module.Workflow"},
            "start-up failed (model): CLASSIC_INF_WORKFLOW_CLASS: cannot import 'no_such_module'",
        ),
        (
            {"CLASSIC_INF_WORKFLOW_KW_ARGS": '{"model_path": "/nonexistent/model.torch"}'},
            "start-up failed (model): model source=local repo=/nonexistent/model.torch file=model.torch: no such file",
        ),
        (
            {"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": "models/iris/model.torch", "sha256": "0" * 64})},
            "sha256 mismatch",
        ),
        ({"USE_ARWEAVE": "true", "CLASSIC_INF_WORKFLOW_KW_ARGS": '{"model_name": "a/b"}'}, "ALLOWED_ARWEAVE_OWNERS"),
        # JSON strings for booleans counted as true: "false" loaded a torch.export file as TorchScript ("corrupted")
        (
            {"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": IRIS, "use_jit": "false"})},
            'CLASSIC_INF_WORKFLOW_KW_ARGS: use_jit: expected true or false or null, got "false"',
        ),
        (
            {"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": IRIS, "cast_inputs": "no"})},
            'CLASSIC_INF_WORKFLOW_KW_ARGS: cast_inputs: expected true or false, got "no"',
        ),
        (
            {"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": IRIS, "num_threads": 1.5})},
            "CLASSIC_INF_WORKFLOW_KW_ARGS: num_threads: expected an integer or null, got 1.5",
        ),
        ({"CLASSIC_INF_WORKFLOW_KW_ARGS": '{"model_path": 5}'}, "KW_ARGS: model_path: expected a string, got 5"),
        ({"CLASSIC_INF_WORKFLOW_CLASS": "json.JSONDecoder"}, "json.JSONDecoder is not a workflow class"),
        (
            {"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": IRIS, "num_threads": 0})},
            "CLASSIC_INF_WORKFLOW_KW_ARGS: num_threads: expected an integer >= 1, got 0",
        ),
        (
            {"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": IRIS, "model_name": "Org/repo"})},
            "CLASSIC_INF_WORKFLOW_KW_ARGS: model_path and model_name both name a model; keep one of them",
        ),
        # Explorer F-h: the embedded model's built-in (double) warm-up input failed as if the operator had given it.
        (
            {"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": IRIS, "cast_inputs": False})},
            "the embedded model's built-in warm-up input (double; no warmup_input was given) failed: RuntimeError: "
            "mat1 and mat2 must have the same dtype, but got Double and Float; set cast_inputs to true, or give "
            'CLASSIC_INF_WORKFLOW_KW_ARGS a warmup_input of the requests you will send, e.g. "warmup_input": '
            '{"dtype":"float","values":[[1.0380048,0.5586108,1.1037828,1.712096]]}',
        ),
        # The operator's own warm-up input: the start-up line carried TorchScript's first line, not the reason.
        (
            {
                "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps(
                    {"model_path": IRIS, "cast_inputs": False, "warmup_input": {"dtype": "double", "values": [[1] * 4]}}
                )
            },
            "warmup_input: RuntimeError: mat1 and mat2 must have the same dtype, but got Double and Float",
        ),
        # Explorer F2: a workflow without __init__ (the README's Scaler) silently dropped every argument, because
        # InferenceWorkflow overrides __new__ and Python then never checks them.
        (
            {
                "CLASSIC_INF_WORKFLOW_CLASS": "tests.workflows_for_tests.Doubler",
                "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"warmup_input": {"dtype": "float", "values": [[1]]}}),
            },
            "CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS / _KW_ARGS do not fit Doubler: Doubler() takes no arguments; it "
            "defines no __init__: unset CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS and _KW_ARGS, or give Doubler an "
            "__init__(self, ...) that takes them",
        ),
        (
            {
                "CLASSIC_INF_WORKFLOW_CLASS": "tests.workflows_for_tests.Doubler",
                "CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS": "[2]",
            },
            "do not fit Doubler: Doubler() takes no arguments; it defines no __init__",
        ),
        # Explorer round 6: warmup_input carried over from the built-in workflows is not a custom class's argument.
        (
            {
                "CLASSIC_INF_WORKFLOW_CLASS": "tests.workflows_for_tests.Doubler",
                "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"warmup_input": {"dtype": "float", "values": [[1]]}}),
            },
            "Doubler() takes no arguments; it defines no __init__: unset CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS and "
            "_KW_ARGS, or give Doubler an __init__(self, ...) that takes them; warmup_input is the built-in "
            "workflows' argument: Doubler warms up in its own warmup() hook (README, custom workflows)",
        ),
        # Explorer round 6: Python's "takes from 2 to 3 positional arguments but 4 were given" counts self.
        (
            {
                "CLASSIC_INF_WORKFLOW_CLASS": "tests.workflows_for_tests.Strict",
                "CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS": "[1, 2, 3]",
            },
            "do not fit Strict: Strict takes at most 2 positional arguments (scale, bias); "
            "CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS gave 3; Strict takes (scale: float, /, bias: float = 0.0)",
        ),
        (
            {"CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS": '["models/iris/model.torch"]'},
            "do not fit TorchInferenceWorkflow: TorchInferenceWorkflow takes no positional arguments; "
            "CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS gave 1; TorchInferenceWorkflow takes (*, model_path",
        ),
        # Explorer F15: a describe() that /info cannot send started fine, then every /info was a 500 blaming "the
        # workflow's output".
        (
            {"CLASSIC_INF_WORKFLOW_CLASS": "tests.workflows_for_tests.BadDescribe"},
            "BadDescribe.describe() returned what GET /info cannot send as JSON (Type is not JSON serializable: Linear)"
            ": return names, numbers, lists and dicts of them",
        ),
        # Explorer F5a: the commonest newcomer mistake (the workflow's folder not on PYTHONPATH) got no hint.
        (
            {"CLASSIC_INF_WORKFLOW_CLASS": "my_workflows.scaler.Scaler"},
            "CLASSIC_INF_WORKFLOW_CLASS: cannot import 'my_workflows.scaler' (No module named 'my_workflows'); the "
            "folder that holds my_workflows/ (or my_workflows.py) must be on PYTHONPATH or be the repository folder",
        ),
        # A class with __init__: the line shows what it takes, so the typo is plain.
        (
            {
                "CLASSIC_INF_WORKFLOW_CLASS": "tests.workflows_for_tests.Toolbox",
                "CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS": '["p"]',
                "CLASSIC_INF_WORKFLOW_KW_ARGS": '{"scal": 2}',
            },
            "do not fit Toolbox: Toolbox.__init__() got an unexpected keyword argument 'scal'; "
            "Toolbox takes (prefix: str, *, scale: int = 1, setup_seconds: float = 0.0)",
        ),
    ],
)
def test_bad_configuration_stops_start_up_with_one_line(tmp_path, env, expected):
    status, output = run_to_exit(env, tmp_path)
    assert status != 0
    assert expected in output
    assert "Traceback" not in output
    [line] = [line for line in output.splitlines() if "start-up failed" in line]
    assert expected in line


@pytest.mark.parametrize("kind, suffix", [("torchscript", "torch"), ("pickle", "pkl"), ("export", "pt2")])
def test_model_formats_load_and_answer_the_same(tmp_path, kind, suffix):
    model = Affine(features=4, outputs=3, dtype=torch.float64)
    path = save(model, tmp_path / f"affine.{suffix}", kind, torch.zeros(2, 4, dtype=torch.float64))
    rows = [[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]]
    with torch.inference_mode():
        expected = model(torch.tensor(rows, dtype=torch.float64)).tolist()
    server = start({"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": str(path)})}, tmp_path)
    try:
        wait_ready(server)
        response = server.post({"source": 1, "data": {"dtype": "double", "values": rows}})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["dtype"] == "double" and body["shape"] == [2, 3]
        assert body["values"] == expected
        model_info = server.get("/info").json()["model"]
        assert (
            model_info["format"] == {"torchscript": "torchscript", "pickle": "pickle", "export": "torch.export"}[kind]
        )
        if kind == "pickle":
            assert "loaded a pickled module" in server.log()
        # Explorer F5d: the model's refusal said only torch's words ("tuple index out of range" for torch.export);
        # the 422 also says what the input was and, for torch.export, the input spec it was exported with.
        exported = "; the model was exported for shape [?, 4] double (batch first)" if kind == "export" else ""
        narrow = server.post({"source": 1, "data": {"dtype": "double", "values": [[1.0, 2.0, 3.0]]}})
        body = assert_error(
            narrow, 422, "the model failed on this input: ", f"the input had shape [1, 3] double{exported}"
        )
        assert str(tmp_path) not in body["description"]
        if kind == "export":
            flat = server.post({"source": 1, "data": {"dtype": "double", "values": rows[0]}})
            hint = f"the input had shape [4] double{exported}; to send one row, send shape [1, 4] (a batch of one)"
            assert str(tmp_path) not in assert_error(flat, 422, "the model failed on this input: ", hint)["description"]
    finally:
        stop(server)


def test_a_model_file_that_does_not_load_stops_the_server(tmp_path):
    garbage = tmp_path / "garbage.torch"
    garbage.write_bytes(bytes(range(256)) * 8)
    status, output = run_to_exit({"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": str(garbage)})}, tmp_path)
    assert status == 2
    [line] = [line for line in output.splitlines() if "start-up failed" in line]
    # Not "cannot load garbage.torch as pickle": a file that is no model is named as such (explorer F-e).
    reason = "garbage.torch: not a TorchScript, torch.export or pickle file"
    assert f"model source=local repo={garbage} file=garbage.torch: {reason}" in line
    assert "Traceback" not in output


def test_a_damaged_torchscript_archive_is_named_as_such(tmp_path):
    """Explorer F-e: a truncated TorchScript zip was "cannot load trunc.torch as pickle: ... central directory"."""
    from workflows import model_formats

    whole = save(Affine(), tmp_path / "whole.torch", "torchscript", torch.zeros(1, 4)).read_bytes()
    truncated = tmp_path / "trunc.torch"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(StartupError) as caught:
        model_formats.load(truncated, False, torch.device("cpu"), max_bytes=1 << 30)
    assert str(caught.value).startswith("trunc.torch: a damaged zip archive (truncated or corrupted TorchScript")


def test_an_archive_of_too_many_entries_is_refused_before_torch_opens_it(tmp_path):
    """S5: torch read the zip archive whatever its central directory declared; 10,001 empty entries is no model."""
    from workflows import model_formats

    many = tmp_path / "many.pt"
    with zipfile.ZipFile(many, "w") as archive:
        archive.writestr("model/constants.pkl", b"")
        for i in range(10_000):
            archive.writestr(f"model/code/{i}", b"")
    with pytest.raises(model_formats.ArchiveTooLarge) as caught:
        model_formats.load(many, False, torch.device("cpu"), max_bytes=1 << 30)
    assert str(caught.value) == "many.pt: its zip archive has 10001 entries, more than the 10000 a model may have"
    assert caught.value.status == 413


def test_a_pickle_of_a_class_only_its_script_knew_says_how_to_fix_it(tmp_path):
    """Explorer F-h: the usual notebook case was "Can't get attribute 'Lin' on <module '_bentoml_impl.worker...'>"."""
    saved = tmp_path / "lin.pt"
    script = (
        "import sys, torch\n"
        "class Lin(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x * 2\n"
        "torch.save(Lin(), sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(saved)], check=True, timeout=120)
    kw_args = json.dumps({"model_path": str(saved)})
    status, output = run_to_exit({"CLASSIC_INF_WORKFLOW_KW_ARGS": kw_args, "ALLOW_PICKLED_MODELS": "true"}, tmp_path)
    assert status == 2
    [line] = [line for line in output.splitlines() if "start-up failed" in line]
    assert "cannot load lin.pt as a pickle: it names class 'Lin', which cannot be imported here" in line
    assert "torch.jit.save" in line and "Traceback" not in output


def test_a_pinned_model_changed_in_place_is_refused_even_with_its_size_and_mtime_kept(tmp_path):
    """Explorer N6: the pin was checked against a hash remembered by size and mtime, which whoever can write the file
    keeps; a weight changed in place was served under the pin."""
    path = save(Affine(), tmp_path / "pinned.torch", "torchscript", torch.zeros(1, 4))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    kw_args = json.dumps({"model_path": str(path), "sha256": digest})
    env = {"CLASSIC_INF_WORKFLOW_KW_ARGS": kw_args, "MODEL_CACHE_DIR": str(tmp_path / "cache")}
    with serving(env, tmp_path) as server:  # the first start remembers the hash
        assert server.post({"source": 1, "data": {"dtype": "float", "values": [[1, 2, 3, 4]]}}).status_code == 200
    stat = path.stat()
    data = bytearray(path.read_bytes())
    weight = data.find(struct.pack("<f", 0.1))  # Affine's first weight, stored uncompressed in the archive
    assert weight > 0
    data[weight : weight + 4] = struct.pack("<f", 0.7)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    status, output = run_to_exit(env, tmp_path)
    assert status == 2
    [line] = [line for line in output.splitlines() if "start-up failed" in line]
    assert "sha256 mismatch" in line and digest in line


# Finding C0: the newer Infernet torch services' variables (core/legacy_env.py) were ignored, and the embedded iris
# model answered with status 200. A model named by them must answer with its own values.
@pytest.mark.parametrize("layout", ["2.0", "1.x"])
def test_legacy_variables_serve_the_model_they_name(tmp_path, layout):
    folder = tmp_path / "ritual" / "local" / "me" / "affine" / "default"  # 2.0's cache layout of a local id
    folder.mkdir(parents=True)
    path = save(Affine(), folder / "net.pt", "torchscript", torch.ones(1, 4))
    if layout == "2.0":
        env = {
            "TORCH_DEFAULT_MODEL_ID": "local/me/affine:net.pt",
            "TORCH_CACHE_DIR": str(tmp_path / "ritual"),
            "TORCH_USE_JIT": "yes",  # pydantic's bool, as 2.0 read it
            # Test servers set MODEL_CACHE_DIR; the same value under both names is no conflict.
            "MODEL_CACHE_DIR": str(tmp_path / "ritual"),
        }
    else:
        env = {"MODEL_SOURCE": "0", "LOAD_ARGS": json.dumps({"model_path": str(path)}), "USE_JIT": "true"}
    with serving(env, tmp_path) as server:
        answer = server.post({"source": 1, "data": {"dtype": "float", "values": [[1.0, 2.0, 3.0, 4.0]]}})
        assert answer.status_code == 200, answer.text
        expected = Affine()(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).tolist()[0]  # not iris's three class scores
        assert answer.json()["values"][0] == pytest.approx(expected)
        assert server.get("/info").json()["model"]["file"] == "net.pt"
        log = server.log()
        legacy = "TORCH_DEFAULT_MODEL_ID" if layout == "2.0" else "MODEL_SOURCE+LOAD_ARGS"
        assert f"[INFO] [startup] stage=config status=ok legacy={legacy}" in log
        if layout == "2.0":
            assert "legacy=TORCH_USE_JIT read_as=USE_JIT value=true" in log


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"TORCH_MODEL_LRU_CACHE_SIZE": "8"}, "TORCH_MODEL_LRU_CACHE_SIZE is not read here: the models kept loaded"),
        ({"TORCH_USE_JIT": "true", "USE_JIT": "false"}, "TORCH_USE_JIT and USE_JIT are both set and differ"),
        (
            {
                "TORCH_DEFAULT_MODEL_ID": "huggingface/Org/net:net.pt",
                "CLASSIC_INF_WORKFLOW_KW_ARGS": '{"model_path": "/m"}',
            },
            "TORCH_DEFAULT_MODEL_ID and CLASSIC_INF_WORKFLOW_KW_ARGS name different models",
        ),
    ],
    ids=["no-equivalent", "jit-conflict", "model-conflict"],
)
def test_legacy_variables_without_equivalent_or_in_conflict_stop_start_up(tmp_path, env, expected):
    status, output = run_to_exit(env, tmp_path)
    assert status != 0
    [line] = [line for line in output.splitlines() if "start-up failed" in line]
    assert expected in line
    assert "Traceback" not in output


def test_a_port_in_use_stops_start_up_with_one_line_naming_the_port_setting(tmp_path, monkeypatch):
    # The port already taken (another server, a previous one still stopping) printed circus' traceback
    # (OSError: [Errno 98] Address already in use) and two "Could not bind" lines.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        monkeypatch.setattr(server_fixture, "free_port", lambda: port)
        status, output = run_to_exit({}, tmp_path)
    assert status == 2, output[-3000:]
    lines = [line for line in output.splitlines() if line.startswith("start-up failed")]
    assert len(lines) == 1, output[-3000:]
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0] and "--port" in lines[0], lines[0]
    assert "BENTOML_PORT" in lines[0] and "make serve PORT=... HOST=..." in lines[0], lines[0]
    assert "Traceback" not in output and "Could not bind" not in output, output[-3000:]
