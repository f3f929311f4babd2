"""The built-in torch workflow, configured with an ONNX model file, serves it with the ONNX workflow (start-up's
``build`` in-process: what the runner does; torch-only keyword arguments are dropped)."""

from __future__ import annotations

import pytest

from core.settings import BUILTIN_TORCH_WORKFLOW, ServiceSettings
from tests.test_onnx_workflow import iris_onnx
from workflows import startup
from workflows.base import run_batch
from workflows.onnx_workflow import ONNXInferenceWorkflow

IRIS = [1.0380048, 0.5586108, 1.1037828, 1.712096]


def test_default_workflow_hands_an_onnx_file_to_the_onnx_workflow(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
    path = iris_onnx(tmp_path / "iris.onnx")
    settings = ServiceSettings(
        workflow_class=BUILTIN_TORCH_WORKFLOW,
        workflow_kwargs={"model_path": str(path), "use_jit": False, "device": "cpu", "cast_inputs": True},
    )
    workflow = startup.build(settings)
    assert isinstance(workflow, ONNXInferenceWorkflow)
    [outcome] = run_batch(workflow, [{"dtype": "float", "values": [IRIS]}])
    assert outcome.status == 200, outcome.description
    probabilities = outcome.body["values"][0] if "values" in outcome.body else outcome.body
    assert max(range(3), key=probabilities.__getitem__) == 2
