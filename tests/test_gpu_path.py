"""The GPU path, as far as it runs without a GPU: the device choice, the batch's copy to the device and the output's
copy back, half and bfloat16 execution, and what /info and /service-resources say about them.

This machine has no CUDA (torch is the CPU wheel): the forward runs on the CPU here, and where a test needs CUDA's
branch it says how it stands in for it. scripts/gpu_check.py runs the same workflow on a real GPU.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from core.errors import StartupError
from core.settings import EMBEDDED_MODEL, TorchSettings
from public import resources
from tests.fixtures.server import REPO, run_to_exit, serving
from tests.models import save
from workflows import torch_workflow
from workflows.base import run_batch
from workflows.torch_workflow import TorchInferenceWorkflow

TOLERANCE = {"float16": 1e-2, "bfloat16": 5e-2}  # of the largest |answer|: 11 and 8 significant bits
ROWS = [[0.5, -1.25, 2.0, 0.75], [1.5, 0.25, -0.5, 3.0], [-2.0, 1.0, 0.125, -0.75]]


class SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Labelled(torch.nn.Module):
    """Outputs of several dtypes in a nested structure: only the floating ones are the model's precision."""

    def __init__(self) -> None:
        super().__init__()
        self.net = SmallNet()

    def forward(self, x: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        logits = self.net(x)
        return {"scores": [logits, logits.sum(dim=1)], "label": [logits.argmax(dim=1)]}


class Doubler(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def built(tmp_path: Path, model: torch.nn.Module, kind: str = "torchscript", **kwargs) -> TorchInferenceWorkflow:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = save(model, tmp_path / f"model.{kind}", kind, torch.zeros(2, 4))
    flow = TorchInferenceWorkflow(model_path=str(path), settings=TorchSettings(model_cache_dir=tmp_path), **kwargs)
    flow.setup()
    return flow


def answer(flow: TorchInferenceWorkflow, rows=ROWS) -> list[dict]:
    outcomes = run_batch(flow, [{"dtype": "float", "values": [row]} for row in rows])  # one batch of len(rows)
    assert [o.status for o in outcomes] == [200] * len(rows), outcomes
    return [o.body for o in outcomes]


@pytest.mark.parametrize("kind", ["torchscript", "pickle", "export"])
@pytest.mark.parametrize("precision", ["float16", "bfloat16"])
def test_lowered_precision_answers_float_within_tolerance(tmp_path, precision, kind):
    reference = answer(built(tmp_path / "ref", SmallNet(), kind, device="cpu"))
    flow = built(tmp_path / "low", SmallNet(), kind, device="cpu", precision=precision)
    assert next(flow.model.parameters()).dtype == torch_workflow.PRECISIONS[precision]  # converted at load
    lowered = answer(flow)
    scale = max(1.0, max(abs(v) for body in reference for v in body["values"].ravel()))
    for want, got in zip(reference, lowered, strict=True):
        assert got["dtype"] == "float" and got["shape"] == want["shape"] == [1, 3]  # cast back to the model's own
        assert abs(got["values"] - want["values"]).max() <= TOLERANCE[precision] * scale
    assert any((got["values"] != want["values"]).any() for want, got in zip(reference, lowered))  # it ran lowered


def test_only_floating_outputs_are_cast_back_in_nested_outputs(tmp_path):
    flow = built(tmp_path, Labelled(), "pickle", device="cpu", precision="bfloat16", batching=False)
    [outcome] = run_batch(flow, [{"dtype": "float", "values": ROWS}])
    body = outcome.body
    assert [t["dtype"] for t in body["scores"]] == ["float", "float"]
    assert body["label"][0]["dtype"] == "long" and body["label"][0]["shape"] == [3]


def test_default_precision_is_the_models_own(tmp_path):
    flow = built(tmp_path, SmallNet(), device="cpu")
    info = flow.describe()
    assert (info["dtype"], info["precision"]) == ("float", "float32")
    assert (info["device"], info["device_name"], info["gpu"]) == ("cpu", None, None)


def test_precision_float64_runs_a_float_model_in_double(tmp_path):
    flow = built(tmp_path, SmallNet(), device="cpu", precision="float64")
    assert flow.describe()["precision"] == "float64"
    assert {body["dtype"] for body in answer(flow)} == {"float"}


@pytest.mark.parametrize(
    ("precision", "values", "refusal"),
    [
        ("bfloat16", {"dtype": "long", "values": [[1, 2, 3, 257]]}, "values[0][3]: 257 does not fit bfloat16"),
        ("float16", {"dtype": "long", "values": [[2049, 2, 3, 4]]}, "values[0][0]: 2049 does not fit half"),
        ("float16", {"dtype": "double", "values": [[1, 2, 7e4, 4]]}, "values[0][2]: 70000.0 does not fit half"),
    ],
)
def test_inputs_the_lowered_precision_cannot_hold_are_refused(tmp_path, precision, values, refusal):
    # K2: the forward runs in the precision, so its cast is held to the contract's fit rules as the model's own.
    flow = built(tmp_path, SmallNet(), device="cpu", precision=precision, batching=False)
    [outcome] = run_batch(flow, [values])
    assert outcome.status == 400 and refusal in outcome.description, outcome
    assert "(the precision the model runs in)" in outcome.description


@pytest.mark.parametrize(
    ("model", "precision", "message"),
    [
        (SmallNet(), "float8", "precision: unknown precision 'float8'; expected one of float64, float32, float16"),
        (Doubler(), "float16", "precision: the model has no floating-point parameters to convert"),
    ],
)
def test_precision_that_cannot_apply_is_a_startup_error(tmp_path, model, precision, message):
    with pytest.raises(StartupError, match="^" + message.replace("(", r"\(")):
        built(tmp_path, model, device="cpu", precision=precision)


def test_device_auto_is_the_cpu_here_and_cuda_is_refused():
    assert torch_workflow.resolve("auto") == torch.device("cpu")  # no CUDA on this machine
    for name in ("cuda", "cuda:1"):
        with pytest.raises(StartupError, match=f"^device: {name} requested but CUDA is not available$"):
            torch_workflow.resolve(name)
    with pytest.raises(StartupError, match=r"^device: "):
        torch_workflow.resolve("gpu please")


def test_batch_stays_put_on_its_own_device_and_moves_once_elsewhere():
    batch = torch.ones(2, 3)
    assert torch_workflow.to_device(batch, torch.device("cpu")) is batch  # no copy
    # "meta" stands in for a device other than the CPU (CUDA cannot run here): one copy, same shape and dtype.
    moved = torch_workflow.to_device(batch, torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == batch.shape and moved.dtype == batch.dtype


def test_batch_goes_to_cuda_through_pinned_memory_without_blocking(monkeypatch):
    # CUDA cannot run here: pin_memory and the copy to "cuda" are stood in for by recorders of what is asked.
    calls: list[tuple] = []

    def pin_memory(self):
        calls.append(("pin_memory",))
        return self

    def to(self, *args, **kwargs):
        calls.append(("to", *args, kwargs))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    torch_workflow.to_device(torch.ones(2, 3), torch.device("cuda"))
    assert calls == [("pin_memory",), ("to", torch.device("cuda"), {"non_blocking": True})]


def test_output_comes_back_whole_with_only_the_compute_dtype_cast():
    Pair = namedtuple("Pair", "a b")
    half = torch.tensor([1.5, 2.25], dtype=torch.float16)
    output = {"x": [half, (half, torch.tensor([3]))], "p": Pair(half, "label"), "n": 7}
    back = torch_workflow.to_host(output, {torch.float16: torch.float32})
    assert back["x"][0].dtype == torch.float32 and back["x"][0].tolist() == [1.5, 2.25]
    assert isinstance(back["x"][1], tuple) and back["x"][1][1].dtype == torch.int64
    assert isinstance(back["p"], Pair) and back["p"].a.dtype == torch.float32 and back["p"].b == "label"
    assert back["n"] == 7
    assert torch_workflow.to_host(half) is half  # already on the CPU, nothing to cast


def test_service_resources_report_the_models_gpu_without_nvidia_smi():
    if shutil.which("nvidia-smi"):
        pytest.skip("nvidia-smi is present: it describes the GPUs itself")
    # The runner's figures as torch_workflow.gpu_info writes them on a GPU (no GPU here to measure).
    gpu = {
        "name": "NVIDIA H200",
        "index": 0,
        "capability": "9.0",
        "cuda_version": "12.8",
        "memory_total_bytes": 150_000_000_000,
        "memory_used_bytes": 2_000_000_000,
        "memory_allocated_bytes": 40_000_000,
    }
    answer = resources.resources("svc", {"model": {"source": "local", "repo": "m/model.torch", "gpu": gpu}})
    capabilities = {c["capability_id"]: c for c in answer["hardware_capabilities"]}
    assert capabilities["gpu"] == {
        "capability_id": "gpu",
        "driver_version": "N/A",
        "cuda_version": "12.8",
        "gpu_info": [
            {"name": "NVIDIA H200", "memory_total": 150_000_000_000, "memory_used": 2_000_000_000, "cuda_device_id": 0}
        ],
    }
    cpu_only = resources.resources("svc", {"model": {"source": "local", "repo": "m/model.torch", "gpu": None}})
    assert [c["capability_id"] for c in cpu_only["hardware_capabilities"]] == ["base"]


@pytest.mark.slow
def test_served_bfloat16_model_reports_device_and_precision_and_answers_float(tmp_path):
    reference = torch.jit.load(str(EMBEDDED_MODEL))
    with torch.inference_mode():
        expected = reference(torch.tensor(ROWS))
    kwargs = f'{{"model_path": "{EMBEDDED_MODEL}", "device": "cpu", "precision": "bfloat16"}}'
    with serving({"CLASSIC_INF_WORKFLOW_KW_ARGS": kwargs}, tmp_path) as server:
        model = server.get("/info").json()["model"]
        response = server.post({"source": 1, "data": {"dtype": "double", "values": ROWS}})
        resources_answer = server.get("/service-resources").json()
    assert (model["device"], model["device_name"], model["precision"], model["dtype"]) == (
        "cpu",
        None,
        "bfloat16",
        "float",
    )
    assert model["gpu"] is None
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dtype"] == "float" and body["shape"] == [3, 3]
    got = torch.tensor(body["values"])
    assert (got - expected).abs().max() <= TOLERANCE["bfloat16"] * max(1.0, expected.abs().max().item())
    assert not torch.equal(got, expected)  # computed in bfloat16, not float32
    assert "gpu" not in {c["capability_id"] for c in resources_answer["hardware_capabilities"]}


@pytest.mark.slow
def test_device_cuda_without_cuda_stops_the_server_with_one_line(tmp_path):
    kwargs = f'{{"model_path": "{EMBEDDED_MODEL}", "device": "cuda"}}'
    code, output = run_to_exit({"CLASSIC_INF_WORKFLOW_KW_ARGS": kwargs}, tmp_path)
    assert code == 2, output
    assert "start-up failed (workflow): device: cuda requested but CUDA is not available" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_gpu_check_script_runs_on_the_cpu_without_pydantic(tmp_path):
    # As on the GPU machines, whose image has torch and numpy but no pydantic (the script stands in for it).
    script = REPO / "scripts" / "gpu_check.py"
    run = (
        "import runpy, sys; sys.modules['pydantic'] = None; "
        f"sys.argv = [{str(script)!r}, '--quick', '--models-dir', {str(tmp_path)!r}]; "
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "CUDA not available: skipping every CUDA row" in out
    for model in ("tiny", "heavy", "iris"):
        for precision in ("float16", "bfloat16"):
            assert f"| {model} | cpu | {precision} | " in out and "**OFF**" not in out
        assert f"| {model} | cuda | - | skipped: no CUDA |" in out
    assert "| model | device | precision | batch 1 | batch 32 | batch 256 |" in out
