"""run_batch: compatible items share one forward, outputs split back, failures stay with their own item."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest
import torch

from core.errors import Outcome
from core.settings import TorchSettings
from runner.batch_runner import BatchRunner
from tests.models import Affine, save
from workflows.base import InferenceWorkflow, run_batch
from workflows.torch_workflow import TorchInferenceWorkflow


def torch_workflow(tmp_path, model=None) -> TorchInferenceWorkflow:
    path = save(model or Affine(), tmp_path / "affine.torch", "torchscript", torch.zeros(1, 4))
    workflow = TorchInferenceWorkflow(model_path=str(path), settings=TorchSettings(model_cache_dir=tmp_path))
    workflow.setup()
    return workflow


class CountingModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Affine()
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.inner(x)


def test_equal_trailing_shapes_share_one_forward_and_split_back(tmp_path):
    workflow = torch_workflow(tmp_path)
    counting = CountingModel()
    workflow.model = counting
    rows = [[[float(i), 1.0, 2.0, 3.0]] for i in range(5)] + [[[1.0] * 4, [2.0] * 4]]
    outcomes = run_batch(workflow, [{"dtype": "float", "values": r} for r in rows])
    assert counting.calls == [7]  # one forward for 5 single rows and one 2-row item
    for r, outcome in zip(rows, outcomes, strict=True):
        expected = Affine()(torch.tensor(r)).tolist()
        assert outcome.status == 200
        assert outcome.body["shape"] == [len(r), 3]
        assert torch.allclose(torch.tensor(outcome.body["values"]), torch.tensor(expected))


def test_different_dtypes_or_shapes_form_their_own_groups(tmp_path):
    workflow = torch_workflow(tmp_path)
    counting = CountingModel()
    workflow.model = counting
    workflow.cast_inputs = False
    datas = [
        {"dtype": "float", "values": [[1, 2, 3, 4]]},
        {"dtype": "float", "values": [[[1, 2, 3, 4]]]},  # another trailing shape
        {"dtype": "float", "values": [[5, 6, 7, 8]]},
    ]
    outcomes = run_batch(workflow, datas)
    assert sorted(counting.calls) == [1, 2]
    assert [o.status for o in outcomes] == [200, 200, 200]


def test_one_bad_item_never_fails_its_neighbours(tmp_path):
    workflow = torch_workflow(tmp_path)
    datas = [{"dtype": "double", "values": [[1, 2, 3, 4]]} for _ in range(6)]
    datas[2] = {"dtype": "double", "values": [[1, 2, 3]]}  # wrong feature count: the model raises
    datas[4] = {"dtype": "double", "values": [[1, 2], [3]]}  # ragged: refused before the model
    outcomes = run_batch(workflow, datas)
    assert [o.status for o in outcomes] == [200, 200, 422, 200, 400, 200]
    assert outcomes[2].description.startswith("the model failed on this input: ")  # our words, not torch's
    assert "row 1 has 1 elements, expected 2" in outcomes[4].description
    expected = Affine()(torch.tensor([[1.0, 2, 3, 4]])).tolist()
    assert torch.allclose(torch.tensor(outcomes[0].body["values"]), torch.tensor(expected))


class MeanOverBatch(torch.nn.Module):
    """Returns one row however many it gets: a batch cannot be split back."""

    def forward(self, x):
        return x.mean(dim=0, keepdim=True)


def test_output_that_does_not_split_is_retried_item_by_item(tmp_path):
    workflow = torch_workflow(tmp_path, MeanOverBatch())
    outcomes = run_batch(workflow, [{"dtype": "float", "values": [[float(i)] * 4]} for i in range(3)])
    assert [o.status for o in outcomes] == [200, 200, 200]
    assert [o.body["values"].tolist() for o in outcomes] == [[[0.0] * 4], [[1.0] * 4], [[2.0] * 4]]


def test_inputs_are_cast_to_the_model_dtype(tmp_path):
    workflow = torch_workflow(tmp_path)
    [outcome] = run_batch(workflow, [{"dtype": "long", "values": [[1, 2, 3, 4]]}])
    assert outcome.status == 200 and outcome.body["dtype"] == "float"


class OriginalStyle:
    """A workflow like the original library's: only setup() and inference(), no base class."""

    def setup(self):
        self.ready = True

    def inference(self, data):
        if "boom" in data:
            raise ValueError("boom requested")
        return {"echo": data, "ready": self.ready}


def test_workflows_with_only_setup_and_inference_run_item_by_item():
    workflow = OriginalStyle()
    workflow.setup()
    outcomes = run_batch(workflow, [{"a": 1}, {"boom": 1}, {"b": 2}])
    assert outcomes[0] == Outcome(200, {"echo": {"a": 1}, "ready": True})
    assert outcomes[1].status == 422 and "boom requested" in outcomes[1].description
    assert outcomes[2].body["echo"] == {"b": 2}


class Doubler(InferenceWorkflow):
    """Base-class defaults: no batch key, so each item runs alone through run_model."""

    def preprocess(self, data):
        return data["x"]

    def run_model(self, x):
        return x * 2


def test_base_class_defaults_and_inference():
    workflow = Doubler()
    assert run_batch(workflow, [{"x": 2}, {"y": 1}]) == [
        Outcome(200, 4),
        Outcome(400, None, "KeyError: 'x'"),  # the bare key said nothing (explorer F5c)
    ]
    assert workflow.inference({"x": 5}) == 10


class Pipelined(InferenceWorkflow):
    """Records which thread runs each hook; its first forward is held until the test releases it."""

    def __init__(self) -> None:
        self.log: list[tuple[str, object, str]] = []
        self.busy, self.release = threading.Event(), threading.Event()

    def _record(self, hook: str, value: object) -> None:
        self.log.append((hook, value, threading.current_thread().name))

    def preprocess(self, data):
        self._record("preprocess", data)
        return data["x"]

    def batch_key(self, item):
        return "rows"

    def run_model(self, batch):
        self._record("run_model", list(batch))
        self.busy.set()
        self.release.wait(10)
        return [x * 10 for x in batch]

    def postprocess(self, output):
        self._record("postprocess", output)
        return {"y": output}


def test_a_call_is_preprocessed_while_the_model_runs_another_batch():
    """What the runner does (service.py, infer): preprocess and postprocess on the event loop, only the forward on the
    model thread, so a call's decoding overlaps the batch ahead of it."""
    workflow = Pipelined()
    runner = BatchRunner(workflow, max_items=64, max_wait_s=10)

    async def call(requests):
        return runner.postprocess(await runner.submit(runner.preprocess(requests)))

    async def scenario():
        first = asyncio.ensure_future(call([{"x": 1}]))
        assert await asyncio.to_thread(workflow.busy.wait, 10)
        second = asyncio.ensure_future(call([{"x": 2}, {"nope": 0}, {"x": 3}]))
        await asyncio.sleep(0.05)
        log_while_busy = list(workflow.log)
        workflow.release.set()
        return log_while_busy, await first, await second

    loop_thread = threading.current_thread().name
    log_while_busy, first, second = asyncio.run(scenario())
    assert log_while_busy == [
        ("preprocess", {"x": 1}, loop_thread),
        ("run_model", [1], "model"),
        ("preprocess", {"x": 2}, loop_thread),
        ("preprocess", {"nope": 0}, loop_thread),
        ("preprocess", {"x": 3}, loop_thread),
    ]
    assert first == [Outcome(200, {"y": 10})]
    assert second == [
        Outcome(200, {"y": 20}),
        Outcome(400, None, "KeyError: 'x'"),
        Outcome(200, {"y": 30}),
    ]
    # after the release the model thread may start the second batch before the loop finishes the first
    assert sorted(workflow.log[5:], key=str) == [
        ("postprocess", 10, loop_thread),
        ("postprocess", 20, loop_thread),
        ("postprocess", 30, loop_thread),
        ("run_model", [2, 3], "model"),  # the bad request never reached the model
    ]


def test_the_model_thread_computes_with_the_configured_torch_threads(tmp_path):
    """``num_threads`` (TORCH_NUM_THREADS) reaches the thread that runs the forward. MKL keeps its thread count per
    thread: set only where the model was loaded, it left the model thread's matrix products on every CPU, and each
    thread MKL starts for them shows in /proc."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("with one CPU MKL starts no thread of its own, set or not")
    model = Affine(features=69, outputs=64, dtype=torch.float64)
    path = save(model, tmp_path / "wide.torch", "torchscript", torch.zeros(1, 69, dtype=torch.float64))
    settings = TorchSettings(model_cache_dir=tmp_path)
    workflow = TorchInferenceWorkflow(model_path=str(path), num_threads=1, settings=settings)
    workflow.setup()
    runner = BatchRunner(workflow, max_items=64, max_wait_s=10)
    threads_before = len(os.listdir("/proc/self/task"))
    rows = [[float(i % 7) / 7] * 69 for i in range(8)]
    outcomes = asyncio.run(runner.infer([{"dtype": "double", "values": rows}] * 4))
    expected = model(torch.tensor(rows, dtype=torch.float64)).tolist()
    assert [(o.status, o.body["values"].tolist()) for o in outcomes] == [(200, expected)] * 4
    assert len(os.listdir("/proc/self/task")) == threads_before
