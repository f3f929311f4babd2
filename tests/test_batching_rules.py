"""Batching never changes an answer: a request gets the same answer alone or in a batch.

Requests share a forward only when their leading axis is a batch axis (rank >= 2, equal dtype and trailing shape);
a model that mixes the rows of a batch is caught at start-up by running its warm-up input alone and as a batch of
two, and then serves every request alone. The models here break naive batching in different ways.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import StartupError
from core.settings import EMBEDDED_MODEL, EMBEDDED_WARMUP_INPUT, ServiceSettings, TorchSettings
from tests.fixtures.server import serving
from tests.hubserver import Hub, Repo, make_repo
from tests.models import Affine, save
from tests.test_batching_http import batch_histogram, batches_larger_than_one, fire_together
from tests.test_onnx_workflow import sum_then_centre, sum_then_centre_onnx
from tests.test_startup_progress import startup_lines
from workflows import startup
from workflows.base import InferenceWorkflow, forward_all, run_batch
from workflows.torch_workflow import TorchInferenceWorkflow


class SoftmaxLast(torch.nn.Module):
    """The reported model: softmax over the last (for a rank-1 request, the only) axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(x, dim=-1)


class SumEverywhere(torch.nn.Module):
    """Every element becomes the sum of all elements: a batch would sum its neighbours' values too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x) + x.sum()


class SumScalar(torch.nn.Module):
    """One number for the whole input: a batch's output cannot be split back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum()


class NormaliseDim0(torch.nn.Module):
    """Each column divided by its sum over the rows: a batch's rows change every row's answer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / x.sum(0)


class CentreDim0(torch.nn.Module):
    """Each column minus its mean over the rows: two copies of one request leave it unchanged, other rows do not."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0, keepdim=True)


class SumThenCentre(torch.nn.Module):
    """Each row's sum minus the batch's mean of those sums: a row with its values reversed has the same sum, so a
    batch with that variant looked like two copies (explore_kinds K1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.sum(-1, keepdim=True)
        return y - y.mean(0, keepdim=True)


class SortThenCentre(torch.nn.Module):
    """Each row sorted, minus the batch's mean of the sorted rows: blind to a reversal, like any per-row sort."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.sort(-1).values
        return y - y.mean(0, keepdim=True)


class MaxPoolThenNormalise(torch.nn.Module):
    """Each row's largest value over the batch's: max-pooling, then a norm over dim 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.amax(-1, keepdim=True)
        return y / y.abs().amax(0, keepdim=True)


class SortedIdsMinusSmallest(torch.nn.Module):
    """Integer inputs (ids): each row sorted, minus the batch's smallest sorted row; integers stay integers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.sort(-1).values
        return y - y.min(0, keepdim=True).values


class Twice(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class BatchNoise(torch.nn.Module):
    """Adds ``scale`` per row of the batch: a stand-in for kernels that round differently for 1 and 2 rows."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * x.shape[0]


class Counting(torch.nn.Module):
    """Wraps a loaded model and records the input shape of each forward."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[tuple[int, ...]] = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.inner(x)


# The reported mix: alone, [1, 2, 3] -> [0.0900, 0.2447, 0.6652] and [1, 1, 1, 1, 1] -> [0.2] * 5.
RANK_1 = [{"dtype": "float", "values": [1, 2, 3]}, {"dtype": "float", "values": [1, 1, 1, 1, 1]}] * 4
ROWS_WARMUP = {"dtype": "float", "values": [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]}
ONE_ROW_WARMUP = {"dtype": "float", "values": [[1.0, 2.0, 3.0]]}
MIRRORED_WARMUP = {"dtype": "float", "values": [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]}  # the same rows reversed
VARIANTS = "its values reversed along the last axis; its values times 2 plus 1; its values times -3 plus 0.5"


def rows(caller: int, dtype: str = "float") -> dict:
    values = [[caller + 1, 2, 3], [4, caller + 5, 6]][: 1 + caller % 2]
    return {"dtype": dtype, "values": [[float(v) for v in row] for row in values] if dtype == "float" else values}


def model_file(tmp_path, model: torch.nn.Module) -> str:
    path = tmp_path / f"{type(model).__name__.lower()}.torch"
    return str(save(model, path, "torchscript", torch.zeros(1, 3)))


def workflow_for(tmp_path, model: torch.nn.Module, **kwargs) -> TorchInferenceWorkflow:
    workflow = TorchInferenceWorkflow(
        model_path=model_file(tmp_path, model), settings=TorchSettings(model_cache_dir=tmp_path), **kwargs
    )
    workflow.setup()
    workflow.warmup()
    return workflow


def values(outcome: dict) -> torch.Tensor:
    assert outcome.status == 200, outcome
    return torch.as_tensor(np.asarray(outcome.body["values"]))


def assert_solo_answers(workflow, datas: list[dict]) -> None:
    """Every request's answer in one batch equals the answer it gets when it runs by itself."""
    together = run_batch(workflow, datas)
    for data, outcome in zip(datas, together, strict=True):
        [alone] = run_batch(workflow, [data])
        assert outcome.body["shape"] == alone.body["shape"]
        assert torch.allclose(values(outcome), values(alone), rtol=1e-5, atol=1e-6), (data, outcome, alone)


@pytest.mark.parametrize("model", [SoftmaxLast(), SumEverywhere()], ids=["softmax-last-axis", "sum-everywhere"])
def test_rank_1_requests_are_never_concatenated(tmp_path, model):
    workflow = workflow_for(tmp_path, model)
    assert_solo_answers(workflow, RANK_1)
    if isinstance(model, SoftmaxLast):
        [short, long] = run_batch(workflow, RANK_1[:2])
        assert torch.allclose(values(short), torch.tensor([0.0900, 0.2447, 0.6652]), atol=1e-4)
        assert torch.allclose(values(long), torch.full((5,), 0.2))


def test_rank_1_requests_each_run_their_own_forward(tmp_path):
    workflow = workflow_for(tmp_path, SoftmaxLast())
    counting = Counting(workflow.model)
    workflow.model = counting
    run_batch(workflow, [{"dtype": "float", "values": [1, 2, 3]}] * 3)
    assert counting.calls == [(3,), (3,), (3,)]


def test_a_model_that_mixes_rows_gets_batching_off_at_warmup(tmp_path):
    workflow = workflow_for(tmp_path, NormaliseDim0(), warmup_input=ROWS_WARMUP)
    batching = workflow.describe()["batching"]
    assert batching["enabled"] is False and batching["checked"] is True
    assert "answered differently from each alone" in batching["reason"]
    counting = Counting(workflow.model)
    workflow.model = counting
    assert_solo_answers(workflow, [rows(caller) for caller in range(6)])
    assert len(counting.calls) == 6 + 6  # each request alone, in the batch and then by itself


@pytest.mark.parametrize("model", [NormaliseDim0(), CentreDim0()], ids=["normalise-dim-0", "centre-dim-0"])
def test_the_warmup_check_batches_the_input_with_a_different_row(tmp_path, model):
    # Two copies of the warm-up input hid a model that subtracts the batch's mean (explorer P1): every request that
    # answered zeros alone got another's rows in its answer once batched.
    workflow = workflow_for(tmp_path, model, warmup_input=ROWS_WARMUP)
    batching = workflow.describe()["batching"]
    assert batching["enabled"] is False and batching["checked"] is True
    assert f"a batch of the warm-up input and variants of it ({VARIANTS})" in batching["reason"]
    assert_solo_answers(workflow, [rows(caller) for caller in range(6)])


@pytest.mark.parametrize(
    ("model", "warmup", "dtype"),
    [
        (SumThenCentre(), ONE_ROW_WARMUP, "float"),
        (SortThenCentre(), ONE_ROW_WARMUP, "float"),
        (MaxPoolThenNormalise(), ONE_ROW_WARMUP, "float"),
        (CentreDim0(), MIRRORED_WARMUP, "float"),
        (SortedIdsMinusSmallest(), {"dtype": "long", "values": [[1, 2, 3]]}, "long"),
    ],
    ids=["sum-then-centre", "sort-then-centre", "max-pool-then-normalise", "mirrored-warmup", "integer-ids"],
)
def test_the_warmup_check_catches_mixing_that_a_reversed_variant_hides(tmp_path, model, warmup, dtype):
    # A variant with its values reversed is the same input to a model whose per-row features ignore the order, and
    # mirrored warm-up rows are their own reversal: batching stayed on and rows mixed (explore_kinds K1).
    workflow = workflow_for(tmp_path, model, warmup_input=warmup)
    batching = workflow.describe()["batching"]
    assert batching["enabled"] is False and batching["checked"] is True, batching
    assert "answered differently from each alone" in batching["reason"]
    assert_solo_answers(workflow, [rows(caller, dtype) for caller in range(6)])


@pytest.mark.parametrize(
    ("warmup", "checked_with"),
    [
        ({"dtype": "float", "values": [[2.0, 2.0, 2.0]]}, "variants of it (its values times 2 plus 1; its"),
        ({"dtype": "long", "values": [[3, 3, 3]]}, "a variant of it (its values halved)"),
        ({"dtype": "long", "values": [[0, 0, 0]]}, "two copies of the warm-up input"),
    ],
    ids=["same-reversed-float", "same-reversed-integer", "all-zero-integer"],
)
def test_inputs_that_read_the_same_reversed_get_another_variant_or_two_copies(tmp_path, warmup, checked_with):
    model = Affine(features=3) if warmup["dtype"] == "float" else Twice()  # Twice keeps integers integers
    workflow = workflow_for(tmp_path, model, warmup_input=warmup)
    batching = workflow.describe()["batching"]
    assert batching["enabled"] is True and checked_with in batching["reason"]


def test_a_model_that_cannot_split_a_batch_gets_batching_off_at_warmup(tmp_path):
    workflow = workflow_for(tmp_path, SumScalar(), warmup_input=ROWS_WARMUP)
    batching = workflow.describe()["batching"]
    assert batching["enabled"] is False
    assert "the model failed on a batch of the warm-up input and variants of it" in batching["reason"]
    assert "does not split into 4 items" in batching["reason"]
    assert_solo_answers(workflow, [rows(caller) for caller in range(4)])


def test_a_row_wise_model_keeps_batching_and_shares_forwards(tmp_path):
    workflow = workflow_for(tmp_path, Affine(features=3), warmup_input=ROWS_WARMUP)
    assert workflow.describe()["batching"] == {
        "enabled": True,
        "checked": True,
        "reason": f"a batch of the warm-up input and variants of it ({VARIANTS}) gave each the answer it gets alone",
    }
    counting = Counting(workflow.model)
    workflow.model = counting
    datas = [rows(caller) for caller in range(6)]
    assert_solo_answers(workflow, datas)
    assert counting.calls[0] == (9, 3)  # the batch: 1 + 2 + 1 + 2 + 1 + 2 rows in one forward


@pytest.mark.parametrize(("scale", "enabled"), [(1e-7, True), (1e-2, False)], ids=["rounding-noise", "real-difference"])
def test_float_rounding_is_not_a_different_answer(tmp_path, scale, enabled):
    workflow = workflow_for(tmp_path, BatchNoise(scale), warmup_input=ROWS_WARMUP)
    assert workflow.describe()["batching"]["enabled"] is enabled


def test_a_rank_1_warmup_input_cannot_check_batching(tmp_path):
    workflow = workflow_for(tmp_path, SoftmaxLast(), warmup_input={"dtype": "float", "values": [1, 2, 3]})
    batching = workflow.describe()["batching"]
    assert batching["enabled"] is True and batching["checked"] is False
    assert "rank 1" in batching["reason"]


def test_batching_false_turns_it_off_and_says_so(tmp_path):
    workflow = workflow_for(tmp_path, Affine(features=3), batching=False, warmup_input=ROWS_WARMUP)
    assert workflow.describe()["batching"] == {
        "enabled": False,
        "checked": False,
        "reason": "turned off by CLASSIC_INF_WORKFLOW_KW_ARGS batching=false",
    }
    counting = Counting(workflow.model)
    workflow.model = counting
    run_batch(workflow, [rows(caller) for caller in range(3)])
    assert counting.calls == [(1, 3), (2, 3), (1, 3)]


def test_batching_must_be_a_json_boolean(tmp_path):
    with pytest.raises(StartupError, match='batching: expected true or false, got "false"'):
        TorchInferenceWorkflow(model_path=model_file(tmp_path, Affine(features=3)), batching="false")


def test_the_embedded_model_checks_batching_with_a_built_in_warmup_input():
    workflow = TorchInferenceWorkflow(model_path=str(EMBEDDED_MODEL))
    assert workflow.warmup_input == EMBEDDED_WARMUP_INPUT
    workflow.setup()
    assert workflow.warmup() is True
    assert workflow.describe()["batching"]["enabled"] is True
    assert workflow.describe()["batching"]["checked"] is True


def test_the_start_up_log_says_batching_is_off_and_why(tmp_path, capsys):
    kwargs = {"model_path": model_file(tmp_path, NormaliseDim0()), "warmup_input": ROWS_WARMUP}
    startup.build(ServiceSettings(workflow_kwargs=kwargs))
    [warmup] = [line for line in startup_lines(capsys.readouterr().err) if line[1] == "warmup"]
    assert warmup[2] == "ok"
    assert " batching=off batching_reason=" in warmup[4]
    assert "answered differently from each alone" in warmup[4]


# --- over HTTP, against the real server --------------------------------------------------------------------------


def kw_args(path: str, **extra) -> dict[str, str]:
    return {"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": path, **extra})}


def assert_concurrent_answers_are_solo_answers(server, datas: list[dict], rounds: int = 3) -> None:
    bodies = [{"source": 1, "data": data} for data in datas]
    solo = {}
    for body in bodies:
        key = json.dumps(body)
        if key not in solo:
            response = server.post(body)
            assert response.status_code == 200, response.text
            solo[key] = response.json()
    for _ in range(rounds):  # several rounds: each one that forms a batch could expose a mix-up
        for body, response in zip(bodies, fire_together(server, bodies), strict=True):
            assert response.status_code == 200, response.text
            answer, expected = response.json(), solo[json.dumps(body)]
            assert answer["shape"] == expected["shape"]
            assert np.allclose(answer["values"], expected["values"], rtol=1e-5, atol=1e-6), (body, answer, expected)


@pytest.mark.slow
@pytest.mark.parametrize("model", [SoftmaxLast(), SumEverywhere()], ids=["softmax-last-axis", "sum-everywhere"])
def test_concurrent_rank_1_requests_get_their_solo_answers_over_http(tmp_path, model):
    with serving(kw_args(model_file(tmp_path, model)), tmp_path) as server:
        assert_concurrent_answers_are_solo_answers(server, RANK_1 * 4)


@pytest.mark.slow
@pytest.mark.parametrize("model", [NormaliseDim0(), CentreDim0()], ids=["normalise-dim-0", "centre-dim-0"])
def test_a_model_that_mixes_rows_serves_every_request_alone_over_http(tmp_path, model):
    env = kw_args(model_file(tmp_path, model), warmup_input=ROWS_WARMUP)
    with serving(env, tmp_path) as server:
        batching = server.get("/info").json()["model"]["batching"]
        assert batching["enabled"] is False
        assert "answered differently from each alone" in batching["reason"]
        assert "batching=off" in server.log()
        assert_concurrent_answers_are_solo_answers(server, [rows(caller) for caller in range(32)])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "warmup"),
    [(SumThenCentre(), ONE_ROW_WARMUP), (CentreDim0(), MIRRORED_WARMUP)],
    ids=["sum-then-centre", "centre-dim-0-mirrored-warmup"],
)
def test_mixing_that_a_reversed_variant_hides_serves_every_request_alone_over_http(tmp_path, model, warmup):
    # Both passed the start-up check with batching on, and concurrent callers got each other's rows (explore_kinds K1).
    with serving(kw_args(model_file(tmp_path, model), warmup_input=warmup), tmp_path) as server:
        assert server.get("/info").json()["model"]["batching"]["enabled"] is False
        datas = [rows(caller) for caller in range(20)]
        assert_concurrent_answers_are_solo_answers(server, datas)
        with torch.inference_mode():  # and the solo answers are the model's own, run here in-process
            for data, answer in zip(datas, (server.post({"source": 1, "data": d}).json() for d in datas), strict=True):
                assert np.allclose(answer["values"], model(torch.tensor(data["values"])).numpy(), atol=1e-5)


@pytest.fixture(scope="module")
def per_request_server(tmp_path_factory):
    """ALLOWED_MODELS on, and a loopback Hub (tests/hubserver.py) holding models a client may name: two that mix the
    rows of a batch (TorchScript and ONNX) and a row-wise one."""
    root = tmp_path_factory.mktemp("per-request-batching")
    files = {
        "org/centre": ("model.pt", model_file(root, CentreDim0())),
        "org/sum-centre": ("model.pt", model_file(root, SumThenCentre())),
        "org/affine": ("model.pt", model_file(root, Affine(features=3))),
        "org/sum-centre-onnx": ("model.onnx", str(sum_then_centre_onnx(root / "sum-centre.onnx"))),
    }
    repos = {
        repo: Repo(make_repo(root / repo.replace("/", "-"), [{name: Path(path).read_bytes()}]))
        for repo, (name, path) in files.items()
    }
    hub = Hub(repos).start()
    try:
        env = {"HF_ENDPOINT": hub.url, "ALLOWED_MODELS": json.dumps(["huggingface/org/*"])}
        with serving(env, root) as server:
            yield server
    finally:
        hub.stop()


def per_request_rows(caller: int) -> list[list[float]]:
    return [[float(caller), 2.0 * caller, 0.5 - caller + row] for row in range(1 + caller % 2)]


def in_process_answer(model_id: str, rows_: list[list[float]]) -> np.ndarray:
    """What the Hub's model ``model_id`` answers for ``rows_`` run alone, here."""
    if model_id.endswith(".onnx"):
        return np.asarray(sum_then_centre(rows_))
    model = {"huggingface/org/centre:model.pt": CentreDim0(), "huggingface/org/sum-centre:model.pt": SumThenCentre()}
    with torch.inference_mode():
        return model[model_id](torch.tensor(rows_)).numpy()


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_id",
    [
        "huggingface/org/centre:model.pt",
        "huggingface/org/sum-centre:model.pt",
        "huggingface/org/sum-centre-onnx:model.onnx",
    ],
    ids=["torchscript-centre", "torchscript-sum-then-centre", "onnx-sum-then-centre"],
)
def test_a_per_request_model_that_mixes_rows_answers_each_caller_alone(per_request_server, model_id):
    # A per-request model has no warm-up input, and was batched unchecked: concurrent callers of a model that
    # mixes rows got each other's values (explore_kinds K3). Its first requests arrive together here.
    for _ in range(3):
        bodies = [
            {
                "source": 1,
                "data": {
                    "model_id": model_id,
                    "input": {"dtype": 1, "shape": [len(r), 3], "values": [v for row in r for v in row]},
                },
            }
            for r in map(per_request_rows, range(20))
        ]
        for caller, response in enumerate(fire_together(per_request_server, bodies)):
            assert response.status_code == 200, response.text
            expected = in_process_answer(model_id, per_request_rows(caller))
            assert np.allclose(np.reshape(response.json()["values"], expected.shape), expected, atol=1e-5), caller
    [loaded] = [m for m in per_request_server.get("/info").json()["models"]["loaded"] if m["model_id"] == model_id]
    assert loaded["batching"]["enabled"] is False and loaded["batching"]["checked"] is True, loaded
    assert "a batch of a request's input and variants of it" in loaded["batching"]["reason"]


@pytest.mark.slow
def test_a_row_wise_per_request_model_is_checked_and_keeps_batching(per_request_server):
    model_id = "huggingface/org/affine:model.pt"
    data = {"model_id": model_id, "input": {"dtype": 1, "shape": [1, 3], "values": [1.0, 2.0, 3.0]}}
    response = per_request_server.post({"source": 1, "data": data})
    assert response.status_code == 200, response.text
    [loaded] = [m for m in per_request_server.get("/info").json()["models"]["loaded"] if m["model_id"] == model_id]
    assert loaded["batching"]["enabled"] is True and loaded["batching"]["checked"] is True, loaded


@pytest.mark.slow
def test_the_embedded_model_still_batches_over_http(iris_server):
    batching = iris_server.get("/info").json()["model"]["batching"]
    assert batching["enabled"] is True and batching["checked"] is True
    before = batch_histogram(iris_server)
    datas = [{"dtype": "float", "values": [[c / 10, -c / 20, (c % 7) / 3, 0.5]] * (1 + c % 3)} for c in range(32)]
    assert_concurrent_answers_are_solo_answers(iris_server, datas)
    assert batches_larger_than_one(before, batch_histogram(iris_server)) >= 1


class ShiftInPlace(torch.nn.Module):
    """Row-wise, but changes its input in place first (as a model normalising x /= 255 does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.sub_(1.0)
        return x * 2.0


def test_the_batching_check_on_a_requests_input_leaves_that_input_as_sent(tmp_path):
    # A per-request model checks batching with its first request's input (workflows/per_request.py). The check ran
    # the model on the request's own tensor, so a model changing its input in place answered f(x - 2): 200 with
    # [[-2, 0, 2]] for [[1, 2, 3]], and batching was turned off for a row-wise model.
    from workflows.base import check_on_first_request, postprocess_all, preprocess_all

    workflow = workflow_for(tmp_path, ShiftInPlace())
    workflow.batching_check_pending = True
    data = {"dtype": "float", "values": [[1.0, 2.0, 3.0]]}
    prepared = check_on_first_request(workflow, preprocess_all(workflow, [data]))
    [outcome] = postprocess_all(workflow, forward_all(workflow, prepared), [data])
    assert values(outcome).tolist() == [[0.0, 2.0, 4.0]]
    assert workflow.info["batching"]["enabled"] is True, workflow.info["batching"]


class UnhashableKey(InferenceWorkflow):
    """A custom workflow whose batch key is a list for some inputs (a workflow author's mistake)."""

    def batch_key(self, item):
        return item.get("k")

    def run_model(self, batch):
        return [{"v": item["v"] * 10} for item in batch]


def test_an_unhashable_batch_key_fails_its_own_request_not_the_batch():
    # groups[key] raised TypeError on the model thread, failing every request batched with it.
    workflow = UnhashableKey()
    workflow.setup()
    good, other, bad = {"v": 1, "k": 1}, {"v": 3, "k": 1}, {"v": 2, "k": [1]}
    outcomes = run_batch(workflow, [good, other, bad])
    assert [o.status for o in outcomes] == [200, 200, 400]
    assert outcomes[0].body == {"v": 10} and outcomes[1].body == {"v": 30}
