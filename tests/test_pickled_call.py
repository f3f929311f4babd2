"""The runner's POST /infer fast path (core/bentoml_seam.py PickledCall) speaks BentoML's own client format.

In-process: a small BentoML service with ``service_class=RunnerService``; requests are built and answers read with
the same serde calls BentoML's client makes, so a mismatch with ``bentoml.depends`` shows here. Over HTTP, every
test that POSTs /service_output goes through this route; the last test checks its calls are still counted.
"""

from __future__ import annotations

import asyncio
from typing import Any

import bentoml
import orjson
import pytest
from _bentoml_impl.serde import Payload, PickleSerde
from _bentoml_sdk.service import set_current_service

from core.bentoml_seam import PICKLE, FastRoute, PickledCall, RunnerService, is_pickled_call
from tests.test_fast_route import delta, route_series


@bentoml.service(service_class=RunnerService)
class Doubler:
    @bentoml.api
    async def infer(self, datas: list[Any]) -> list[Any]:
        if any(isinstance(value, str) and value == "boom" for value in datas):
            raise RuntimeError("boom")
        return [value * 2 for value in datas]


def client_request(datas: list[Any]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """What BentoML's client sends for ``client.call("infer", datas)`` with the pickle serde."""
    payload = PickleSerde().serialize_model(Doubler.apis["infer"].input_spec.from_inputs(datas=datas))
    headers = [(b"content-type", PICKLE.encode())]
    headers += [(name.encode(), value.encode()) for name, value in payload.headers.items()]
    return b"".join(payload.data), headers


async def call(handler, body: bytes, headers) -> tuple[int, dict[str, str], bytes]:
    sent: list[dict] = []
    # in two parts, as a server may deliver it
    messages = [
        {"type": "http.request", "body": body[:7], "more_body": True},
        {"type": "http.request", "body": body[7:]},
    ]

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/infer", "headers": headers}
    status = await handler(scope, receive, send)
    assert sent[0]["status"] == status
    return status, {k.decode(): v.decode() for k, v in sent[0]["headers"]}, sent[1]["body"]


@pytest.fixture
def doubler():
    instance = Doubler()
    set_current_service(instance)
    yield instance
    set_current_service(None)


def test_a_pickled_call_reaches_the_method_and_answers_in_bentomls_format(doubler):
    import numpy as np

    datas = [1, 2.5, np.arange(3.0), "ab"]
    status, headers, body = asyncio.run(call(PickledCall("infer"), *client_request(datas)))
    assert status == 200 and headers["content-type"] == PICKLE
    assert int(headers["content-length"]) == len(body)
    # read back as BentoML's client does
    answer = PickleSerde().deserialize_model(Payload((body,), headers), Doubler.apis["infer"].output_spec)
    result = answer.root
    assert result[:2] == [2, 5.0] and result[3] == "abab"
    assert np.array_equal(result[2], np.arange(3.0) * 2)


def test_a_failing_call_is_a_500_with_a_text_error(doubler):
    status, headers, body = asyncio.run(call(PickledCall("infer"), *client_request([1, "boom"])))
    assert status == 500 and headers["content-type"] == "application/json"
    assert orjson.loads(body) == {"error": "infer failed; see the runner's log"}


def test_only_pickled_posts_take_the_fast_path():
    pickled = [(b"content-type", PICKLE.encode() + b"; charset=binary")]
    assert is_pickled_call({"method": "POST", "headers": pickled})
    assert not is_pickled_call({"method": "GET", "headers": pickled})
    assert not is_pickled_call({"method": "POST", "headers": [(b"content-type", b"application/json")]})
    assert not is_pickled_call({"method": "POST", "headers": []})


def test_the_runner_service_class_puts_the_route_in_front_only_as_a_dependency():
    app = Doubler.to_asgi(is_main=False)
    assert isinstance(app, FastRoute) and app.route == "/infer"
    # A service that faces clients never unpickles what they send (BentoML's endpoint refuses it with 415).
    assert not isinstance(Doubler.to_asgi(is_main=True), FastRoute)


def test_an_api_worker_that_went_away_gets_no_answer(doubler):
    sent = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/infer", "headers": client_request([1])[1]}
    assert asyncio.run(PickledCall("infer")(scope, receive, send)) == 499
    assert sent == []


def test_runner_calls_are_still_counted_in_bentomls_series(iris_server):
    # Sequential requests: each is one runner call to /infer.
    before = route_series(iris_server, "/infer")
    for _ in range(4):
        assert iris_server.post({"source": 1, "data": {"dtype": "double", "values": [[1.0, 0.5, 1.1, 1.7]]}}).ok
    after = route_series(iris_server, "/infer")
    assert delta(after, before, "bentoml_service_request_total", "200") == 4
    assert delta(after, before, "bentoml_service_request_duration_seconds_count", "200") == 4


def _arrays():
    import numpy as np

    numeric = [np.dtype(c) for c in "?bBhHiIlLqQefdFD"] + [np.dtype(">f8"), np.dtype(">i4")]
    arrays = [np.arange(6).astype(dtype).reshape(2, 3) for dtype in numeric]
    arrays += [
        np.array(2.5),  # 0-d
        np.zeros((0, 3)),  # empty
        np.arange(512.0),  # 4096 bytes: the first size that goes out of band
        np.arange(511.0),
        np.arange(12.0).reshape(3, 4).T,  # not C order
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.array([[1.0, np.nan, -np.inf]]),
        np.array(["a", "bc"]),
        np.array([1, "x", None], dtype=object),
        np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
        np.array(["2026-12-01"], dtype="datetime64[D]"),
        np.ma.masked_array([1.0, 2.0], mask=[False, True]),  # a subclass: numpy's own pickling
    ]
    return arrays


def test_an_answers_arrays_load_as_bentomls_own_pickling_loads_them():
    # pickled_answer puts small numeric arrays in the pickle; BentoML's serde sends each contiguous array out of band.
    # Either way the API worker (or BentoML's client) gets the same arrays: dtype, shape, order, values, read-only.
    import numpy as np

    from core.bentoml_seam import pickled_answer

    serde = PickleSerde()
    answer = [{"values": array, "n": i} for i, array in enumerate(_arrays())]
    ours, theirs = pickled_answer(answer), serde.serialize_value(answer)
    loaded = serde.deserialize_value(Payload((b"".join(ours.data),), metadata=ours.metadata))
    expected = serde.deserialize_value(Payload((b"".join(theirs.data),), metadata=theirs.metadata))
    assert [entry["n"] for entry in loaded] == list(range(len(answer)))
    for got, want in zip(loaded, expected):
        got, want = got["values"], want["values"]
        assert type(got) is type(want) and got.dtype == want.dtype and got.shape == want.shape
        assert got.flags.writeable == want.flags.writeable and got.flags.f_contiguous == want.flags.f_contiguous
        if want.dtype.kind in "fc":
            assert np.array_equal(got, want, equal_nan=True)
        else:
            assert (got == want).all() if want.size else got.size == 0
        if isinstance(want, np.ma.MaskedArray):
            assert got.mask.tolist() == want.mask.tolist()
    # Out of band still: the 4 KiB array, the two in Fortran order, the masked array's data and mask (numpy's own
    # pickling); the metadata names each buffer's length, as BentoML's does.
    lengths = [int(n) for n in ours.metadata["buffer-lengths"].split(",")]
    assert lengths[1:] == [4096, 96, 96, 16, 12] and lengths == [len(part) for part in ours.data]


def test_an_answer_of_arrays_reaches_a_bentoml_client_through_the_route(doubler):
    import numpy as np

    datas = [np.arange(3.0), np.arange(600.0), np.array([[1, 2]], dtype=np.uint8)]
    status, headers, body = asyncio.run(call(PickledCall("infer"), *client_request(datas)))
    assert status == 200
    answer = PickleSerde().deserialize_model(Payload((body,), headers), Doubler.apis["infer"].output_spec)
    result = answer.root
    assert np.array_equal(result[0], np.arange(3.0) * 2) and np.array_equal(result[1], np.arange(600.0) * 2)
    assert result[2].dtype == np.uint8 and result[2].tolist() == [[2, 4]]
