"""A default-path request's tensor decoded by the API worker (core/tensor_values.py ``SentTensor``) reaches the model
as the runner's own decoding made it, and every refusal keeps its words and stays the request's own
(docs/performance.md, section 27). In this process: the codec across both forms of the hop, and the real
``PublicApp`` bound to the stand-in runner of the real iris workflow (tests/fixtures/public_app.py)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from _bentoml_impl.serde import Payload, PickleSerde

from core import model_call
from core.crash_records import request_digest
from core.tensor_values import SentTensor, sent_tensor
from tests.test_public_app import IRIS_VECTOR, assert_error, offchain
from workflows import tensors
from workflows.base import InferenceWorkflow, TensorWorkflow, run_batch, takes_sent_tensors

# One request of each dtype the API workers decode (bfloat16 goes as sent: numpy has none), in the forms the contract
# allows: nested, flat with a shape, complex as nested or flat pairs, integers written as floats, booleans as 0/1.
SENT = [
    {"dtype": "float", "values": [[0.1, -2.5, 3.0e38, -0.0]]},
    {"dtype": "double", "values": [[0.1, -2.5, 1e308, -0.0, 5e-324]]},
    {"dtype": "half", "values": [[0.1, 65504.0, -0.0, 6e-8]]},
    {"dtype": "cfloat", "values": [[[1.5, -0.0], [3.0, 4.25]]]},
    {"dtype": "cdouble", "shape": [1, 2], "values": [1.0, 2.0, -0.0, 4.0]},
    {"dtype": "uint8", "values": [[0, 255, 7.0]]},
    {"dtype": "int8", "values": [[-128, 127, 0]]},
    {"dtype": "short", "values": [[-32768, 32767, 3.0]]},
    {"dtype": "int", "values": [[-(2**31), 2**31 - 1]]},
    {"dtype": "long", "values": [[-(2**63), 2**63 - 1, 2**53 + 1]]},
    {"dtype": "bool", "values": [[True, False, 1, 0]]},
    {"dtype": "float", "shape": [2, 1, 2], "values": [1, 2, 3, 4]},
    {"dtype": "double", "values": [[0.25] * 3000]},  # large enough to cross out of band
]


@pytest.fixture
def public(in_process):
    return in_process()


def _fast_path(item):
    """``item`` across the fast path's hop: BentoML's pickle serde, its buffers read from the received bytes."""
    serde = PickleSerde()
    payload = serde.serialize_value([item])
    [back] = serde.deserialize_value(Payload((b"".join(payload.data),), metadata=payload.metadata))
    return back


def _sealed(item):
    """``item`` across BentoML's public path (INFERNET_FAST_PATH off): one pickle, no buffers."""
    [back] = model_call.unseal(model_call.seal([item]))
    return back


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (so -0.0 and 0.0, or two NaNs, are told apart as the answer would tell them)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


@pytest.mark.parametrize("data", SENT, ids=lambda d: f"{d['dtype']}{d.get('shape', '')}")
@pytest.mark.parametrize("hop", [_fast_path, _sealed])
def test_a_sent_tensor_decodes_to_the_runners_own_tensor(data, hop):
    sent = sent_tensor(data, 4_000_000)
    assert type(sent) is SentTensor
    back = hop(sent)
    own = tensors.decode(data)
    decoded = tensors.decode(back)
    assert _same(decoded, own), (decoded, own)
    assert decoded.numpy().flags.writeable  # its own memory, not the call's received bytes: a model may write to it
    assert request_digest(back) == request_digest(sent)  # CrashWatch knows it on both sides of the hop


@pytest.mark.parametrize(
    "data",
    [
        {"dtype": "bfloat16", "values": [[1.0]]},
        {"dtype": "quad", "values": [[1]]},
        {"dtype": "float", "values": [[1, 2], [3]]},
        {"dtype": "float", "values": [1, 2, 3], "shape": [1, 4]},
        {"dtype": "int", "values": [[1.5]]},
        {"dtype": "half", "values": [[1e6]]},
        {"dtype": "float", "values": [[True]]},
        {"dtype": "float", "values": []},
        {"dtype": "float", "values": [[1.0] * 5]},  # over the limit below
        {"values": [[1.0]]},
        "not an object",
    ],
)
def test_what_the_api_worker_does_not_decode_goes_as_sent(data):
    # The runner's decoder then says what is wrong in its own words, as before.
    assert sent_tensor(data, 4) is None


def test_the_api_worker_sends_the_tensor_decoded(public):
    response = public.post(offchain([IRIS_VECTOR], dtype="float"))
    assert response.status_code == 200, response.text
    [item] = public.runner.received
    assert type(item) is SentTensor and item.array.dtype == np.float32 and item.array.shape == (1, 4)


def test_a_refused_cast_keeps_its_words_and_fails_alone(public, iris_workflow):
    """16777217 does not fit the iris model's float: the message names the value as written, which the decoded
    array cannot, so the runner asks for the data as sent and answers it as it always did."""
    bad = offchain([[16777217, 1, 2, 3]], dtype="long")
    [expected] = run_batch(iris_workflow[0], [bad["data"]])
    assert expected.status == 400
    *good, refused = public.post_together([offchain([IRIS_VECTOR], dtype="float")] * 3 + [bad])
    assert [r.status_code for r in good] == [200, 200, 200]
    body = assert_error(refused, 400)
    assert body["description"] == expected.description
    assert "values[0][0]: 16777217 does not fit float" in body["description"]
    kinds = [type(item) for item in public.runner.received]
    assert kinds.count(SentTensor) == 4 and kinds.count(dict) == 1  # only the refused one went again, as sent


def test_a_workflow_limit_below_the_api_workers_keeps_its_words(public, iris_workflow, monkeypatch):
    monkeypatch.setattr(iris_workflow[0], "max_elements", 4)
    assert public.post(offchain([IRIS_VECTOR], dtype="float")).status_code == 200
    assert_error(
        public.post(offchain([IRIS_VECTOR * 2], dtype="float")), 400, "values: 8 elements exceed the limit of 4"
    )


def test_only_the_built_in_preprocess_takes_sent_tensors(iris_workflow):
    class Kept(TensorWorkflow):
        def run_model(self, batch):
            return batch

    class OwnPreprocess(Kept):
        def preprocess(self, data):
            return torch.tensor(data["values"])

    class Plain(InferenceWorkflow):
        def run_model(self, batch):
            return batch

    assert takes_sent_tensors(iris_workflow[0]) and takes_sent_tensors(Kept())
    assert not takes_sent_tensors(OwnPreprocess()) and not takes_sent_tensors(Plain())


def test_a_sent_tensor_pickles_small_arrays_in_band():
    small = sent_tensor({"dtype": "double", "values": [[0.5] * 69]}, 100)
    buffers: list[pickle.PickleBuffer] = []
    pickle.dumps(small, protocol=5, buffer_callback=buffers.append)
    assert buffers == []
