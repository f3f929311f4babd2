"""The workflow API a user extends (workflows/base.py): TensorWorkflow's batching defaults, mistakes caught when the
class is defined or built (with the fix in the message), and classes that only define ``inference``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from core.errors import StartupError
from tests.fixtures.server import REPO, run_to_exit
from workflows import InferenceWorkflow, Outcome, TensorWorkflow, run_batch


class Doubler(TensorWorkflow):
    """Only setup and run_model: the contract's tensors in and out, batched by TensorWorkflow."""

    def setup(self):
        self.forwards = []

    def run_model(self, batch):
        self.forwards.append(tuple(batch.shape))
        return batch * 2


def tensor(values, dtype="double"):
    return {"dtype": dtype, "values": values}


def test_tensor_workflow_needs_only_setup_and_run_model():
    workflow = Doubler()
    workflow.setup()
    requests = [tensor([[1.0, 2.0]]), tensor([[3.0, 4.0], [5.0, 6.0]]), tensor([7.0, 8.0]), {"values": [1]}]
    outcomes = run_batch(workflow, requests)
    assert [o.status for o in outcomes] == [200, 200, 200, 400]
    assert outcomes[0].body["shape"] == [1, 2] and outcomes[0].body["values"].tolist() == [[2.0, 4.0]]
    assert outcomes[1].body["values"].tolist() == [[6.0, 8.0], [10.0, 12.0]]
    assert outcomes[2].body["values"].tolist() == [14.0, 16.0]
    assert outcomes[3].description.startswith("dtype: missing")
    # rank 2 with equal dtype and width share one forward; the rank-1 request runs alone
    assert sorted(workflow.forwards) == [(2,), (3, 2)]


def test_tensor_workflow_keeps_dtypes_and_widths_apart_and_can_be_switched_off():
    workflow = Doubler()
    workflow.setup()
    requests = [tensor([[1.0, 2.0]]), tensor([[1.0, 2.0]], "float"), tensor([[1.0, 2.0, 3.0]]), tensor([[3.0, 4.0]])]
    assert [o.status for o in run_batch(workflow, requests)] == [200] * 4
    assert sorted(workflow.forwards) == [(1, 2), (1, 3), (2, 2)]
    workflow.forwards.clear()
    workflow.batching = False
    run_batch(workflow, [tensor([[1.0, 2.0]]), tensor([[3.0, 4.0]])])
    assert workflow.forwards == [(1, 2), (1, 2)]


def test_an_output_that_does_not_split_fails_with_422_per_request():
    class Summer(TensorWorkflow):
        def run_model(self, batch):
            return batch.sum()

    outcomes = run_batch(Summer(), [tensor([[1.0, 2.0]]), tensor([[3.0, 4.0]])])
    # the shared forward's output cannot split; each request then runs alone and gets its own answer
    assert [o.status for o in outcomes] == [200, 200]
    assert [(o.body["shape"], o.body["values"].tolist()) for o in outcomes] == [([], [3.0]), ([], [7.0])]


def test_a_class_without_run_model_or_inference_is_refused_when_built():
    class OnlySetup(InferenceWorkflow):
        def setup(self):
            self.model = None

    with pytest.raises(StartupError, match=r"OnlySetup defines neither run_model nor inference: add 'def run_model"):
        OnlySetup()


def test_a_hook_with_the_wrong_parameters_is_refused_when_defined():
    with pytest.raises(StartupError) as caught:

        class Forgetful(InferenceWorkflow):
            def run_model(self):
                return None

    assert str(caught.value) == (
        "Forgetful.run_model(self): the runner calls run_model(self, batch); "
        "define it as: def run_model(self, batch): return self.model(batch)"
    )
    with pytest.raises(StartupError, match=r"unbatch\(self, output, items\)"):

        class OneArgument(TensorWorkflow):
            def unbatch(self, output):
                return list(output)


def test_batch_without_unbatch_is_refused_when_built():
    class Stacker(TensorWorkflow):
        def batch(self, items):
            return torch.stack(list(items))

        def run_model(self, batch):
            return batch

    with pytest.raises(StartupError, match=r"Stacker overrides batch but not unbatch: .*def unbatch"):
        Stacker()


def test_hooks_with_defaults_or_varargs_are_accepted():
    class Flexible(InferenceWorkflow):
        def preprocess(self, data, scale=1):
            return data * scale

        def run_model(self, *args):
            return args[0] + 1

    assert run_batch(Flexible(), [1]) == [Outcome(200, 2)]


def test_inference_only_classes_run_one_request_at_a_time():
    class Plain:
        def setup(self):
            pass

        def inference(self, data):
            return {"got": data}

    class Subclassed(InferenceWorkflow):
        def inference(self, data):
            if data == "bad":
                raise ValueError("bad data")
            if data == {}:
                return data["x"]
            return {"got": data}

    assert run_batch(Plain(), [1, 2]) == [Outcome(200, {"got": 1}), Outcome(200, {"got": 2})]
    # Explorer F5c: a KeyError's text is only the key, so the 422 said "'x'"; it says which error it was.
    assert run_batch(Subclassed(), [{}]) == [Outcome(422, None, "the model failed on this input: KeyError: 'x'")]
    assert run_batch(Subclassed(), [1, "bad"]) == [
        Outcome(200, {"got": 1}),
        Outcome(422, None, "the model failed on this input: bad data"),
    ]


def test_warmup_is_declared_on_the_base_and_does_nothing_by_default():
    assert Doubler().warmup() is False
    assert Doubler().describe() == {}


def test_importing_workflows_does_not_import_torch():
    code = "import sys, workflows; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_a_misdefined_workflow_stops_start_up_with_the_fix(tmp_path):
    package = tmp_path / "user_code"
    package.mkdir()
    source = "from workflows import TensorWorkflow\n\nclass Broken(TensorWorkflow):\n    def run_model(self): ...\n"
    (package / "broken_workflow.py").write_text(source)
    python_path = os.pathsep.join(filter(None, [str(package), os.environ.get("PYTHONPATH")]))
    env = {"CLASSIC_INF_WORKFLOW_CLASS": "broken_workflow.Broken", "PYTHONPATH": python_path}
    status, output = run_to_exit(env, tmp_path)
    assert status != 0
    [line] = [line for line in output.splitlines() if "start-up failed" in line]
    assert "Broken.run_model(self): the runner calls run_model(self, batch); define it as:" in line
    assert "Traceback" not in output
