"""Hostile input: generated bodies never get a 500, every error is the contract's JSON, and no worker dies.

In-process, hypothesis drives the request path (``parse_input``, the CHAIN decoder, ``tensors.decode``) with
arbitrary JSON and checks that only the contract's own errors come out. Against a real server, a bounded number of
generated bodies (hypothesis and schemathesis) and hand-made edge cases go over HTTP: deeply nested JSON, huge
numbers, NaN/Infinity literals, wrong types in every field, giant and empty arrays, invalid UTF-8, odd content types.
"""

from __future__ import annotations

import json
import socket
from collections import Counter
from urllib.parse import urlsplit

import hypothesis.strategies as st
import pytest
import requests
import schemathesis
import torch
from eth_abi import encode
from hypothesis import HealthCheck, example, given, settings

from core.errors import InputError, RequestError
from core.terms import DTYPE_NAMES, InfernetInput, error_body
from public import chain
from public.app import parse_input
from tests.fixtures.server import serving
from tests.reliability_support import assert_contract_error, figure, processes
from workflows import tensors

MAX_BYTES = 64 * 1024
MAX_ELEMENTS = 1000
IRIS = [[1.0380048, 0.5586108, 1.1037828, 1.712096]]
HTTP_EXAMPLES = 300  # generated bodies per generator sent over HTTP (bounded: a shared 2-core machine)

# What the server answered, by generator: the figures of docs/reliability.md.
TRIED: Counter[tuple[str, int]] = Counter()

# --- strategies ------------------------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
numbers = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(min_value=-10, max_value=10)
    | st.booleans()
)
nested_numbers = st.recursive(
    st.lists(numbers, max_size=6), lambda children: st.lists(children, max_size=4), max_leaves=40
)
rectangular = st.integers(1, 3).flatmap(
    lambda rows: st.lists(st.lists(st.floats(-10, 10), min_size=4, max_size=4), min_size=rows, max_size=rows)
)
tensor_data = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(DTYPE_NAMES) | st.text(max_size=8) | json_values,
        "values": rectangular | nested_numbers | json_values,
    },
    optional={"shape": st.lists(st.integers(-2, 12), max_size=4) | json_values, "bot": json_values},
)
hex_strings = st.binary(max_size=200).map(bytes.hex) | st.text("0123456789abcdefxX \n", max_size=80)
int256_arrays = st.lists(st.integers(-(2**255), 2**255 - 1), max_size=8).map(
    lambda values: encode(["int256[]"], [values]).hex()
)
bodies = st.fixed_dictionaries(
    {
        "source": st.sampled_from([0, 1]) | json_values,
        "data": tensor_data | hex_strings | int256_arrays | json_values,
    },
    optional={
        "destination": st.sampled_from([0, 1, 2]) | json_values,
        "requires_proof": st.booleans() | json_values,
        "extra": json_values,
    },
)
any_body = bodies | json_values

in_process = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
over_http = settings(
    max_examples=HTTP_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# --- in-process: the request path raises only the contract's errors -------------------------------------------


@in_process
@given(any_body)
def test_parse_input_accepts_or_answers_400(body):
    try:
        parsed = parse_input(body)
    except RequestError as e:
        assert e.status == 400 and e.description
        error_body(e.status, e.description, e.errors)  # always renderable
        return
    assert isinstance(parsed, InfernetInput)
    assert parsed.source in (0, 1) and parsed.destination in (0, 1) and parsed.requires_proof is False


@in_process
@given(hex_strings | int256_arrays)
def test_chain_decoder_accepts_or_answers_400(hex_data):
    try:
        parsed = parse_input({"source": 0, "data": hex_data})
        decoded = chain.decode_input(parsed.data)
    except RequestError as e:
        assert e.status == 400 and e.description
        return
    assert decoded["dtype"] == "double" and decoded["shape"] == [1, len(decoded["values"])]
    tensors.decode(decoded)  # the runner accepts what the API worker forwards


@in_process
@given(tensor_data | json_values, st.none() | st.integers(1, 50))
def test_tensor_decoder_accepts_or_answers_input_error(data, max_elements):
    try:
        tensor = tensors.decode(data, max_elements)
    except InputError as e:
        assert e.status == 400 and str(e)
        return
    assert isinstance(tensor, torch.Tensor) and tensor.numel() > 0
    assert tensor.dtype == tensors.DTYPES[data["dtype"]]
    if max_elements is not None:
        assert tensor.numel() <= max_elements * (2 if tensor.is_complex() else 1)


INTEGER_RANGES = {"uint8": (0, 255), "int8": (-128, 127), "short": (-(2**15), 2**15 - 1),
                  "int": (-(2**31), 2**31 - 1), "long": (-(2**63), 2**63 - 1)}  # fmt: skip


@in_process
@given(
    st.sampled_from(sorted(INTEGER_RANGES)),
    st.lists(
        st.integers(-(2**65), 2**65) | st.sampled_from([2**63, 2**63 - 1, -(2**63), 2**64 - 1]), min_size=1, max_size=6
    ),
)
@example("long", [2**63, 1])  # numpy reads this as float64, where 2**63 == float(int64 max)
def test_integer_values_arrive_exactly_or_are_refused(name, values):
    low, high = INTEGER_RANGES[name]
    try:
        tensor = tensors.decode({"dtype": name, "values": values})
    except InputError:
        assert not all(low <= v <= high for v in values)
        return
    assert tensor.tolist() == values  # never wrapped around or rounded


# --- over HTTP: a real server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    limits = {"MAX_REQUEST_BYTES": str(MAX_BYTES), "MAX_REQUEST_ELEMENTS": str(MAX_ELEMENTS)}
    with serving(limits, tmp) as server:
        server.pids = {p.pid for group in processes(server).values() for p in group}
        yield server


def check(response: requests.Response, generator: str) -> None:
    """No 5xx from input alone; every error is the contract's JSON."""
    TRIED[(generator, response.status_code)] += 1
    assert response.status_code < 500, response.text[:300]
    if response.status_code != 200:
        assert_contract_error(response)
    else:
        assert isinstance(response.json(), dict)


def send(server, payload: bytes, content_type: str | None = "application/json", **kwargs) -> requests.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return requests.post(f"{server.url}/service_output", data=payload, headers=headers, timeout=30, **kwargs)


@pytest.mark.slow
def test_generated_bodies_over_http(server):
    @over_http
    @given(any_body)
    def run(body):
        # json.dumps writes NaN/Infinity literals for non-finite floats: exactly what a hostile caller sends.
        check(send(server, json.dumps(body).encode()), "hypothesis")

    run()


EDGE_CASES = {
    "deep array nesting": b"[" * 5000 + b"]" * 5000,
    "deep object nesting": b'{"a":' * 3000 + b"1" + b"}" * 3000,
    "deep values nesting": b'{"source":1,"data":{"dtype":"float","values":' + b"[" * 200 + b"1" + b"]" * 200 + b"}}",
    "deep data object": b'{"source":1,"data":' + b'{"a":' * 900 + b"1" + b"}" * 901,
    "huge float": b'{"source":1,"data":{"dtype":"float","values":[[1e400,1,1,1]]}}',
    "huge integer": b'{"source":1,"data":{"dtype":"long","values":[[123456789012345678901234567890,1,1,1]]}}',
    "float overflowing half": b'{"source":1,"data":{"dtype":"half","values":[[1e300,1,1,1]]}}',
    "integer overflowing long": b'{"source":1,"data":{"dtype":"long","values":[[9223372036854775808,1,1,1]]}}',
    "integer overflowing uint8": b'{"source":1,"data":{"dtype":"uint8","values":[[256,1,1,1]]}}',
    "huge source": b'{"source":1e308,"data":{}}',
    "NaN literal": b'{"source":1,"data":{"dtype":"float","values":[[NaN,1,1,1]]}}',
    "Infinity literal": b'{"source":1,"data":{"dtype":"float","values":[[Infinity,1,1,1]]}}',
    "-Infinity literal": b'{"source":1,"data":{"dtype":"float","values":[[-Infinity,1,1,1]]}}',
    "bare NaN": b"NaN",
    "empty values": b'{"source":1,"data":{"dtype":"float","values":[]}}',
    "empty rows": b'{"source":1,"data":{"dtype":"float","values":[[]]}}',
    "empty shape": b'{"source":1,"data":{"dtype":"float","values":[],"shape":[0]}}',
    "too many elements": json.dumps({"source": 1, "data": {"dtype": "float", "values": [0.5] * 1001}}).encode(),
    "too many via shape": json.dumps(
        {"source": 1, "data": {"dtype": "float", "values": [0.5] * 4, "shape": [2**40, 2**40]}}
    ).encode(),
    "empty CHAIN array": json.dumps({"source": 0, "data": encode(["int256[]"], [[]]).hex()}).encode(),
    "CHAIN array length lie": json.dumps({"source": 0, "data": "00" * 31 + "20" + "ff" * 32}).encode(),
    "invalid UTF-8": b'{"source":1,"data":{"dtype":"float\xff\xfe","values":[[1,1,1,1]]}}',
    "lone surrogate": b'{"source":1,"data":{"dtype":"\\ud800","values":[[1,1,1,1]]}}',
    "UTF-16 body": json.dumps({"source": 1, "data": {"dtype": "float", "values": IRIS}}).encode("utf-16"),
    "NUL bytes": b"\x00" * 100,
    "empty body": b"",
    "whitespace body": b"   \n ",
    "JSON string": b'"hello"',
    "JSON array of bodies": json.dumps([{"source": 1, "data": {"dtype": "float", "values": IRIS}}]).encode(),
    "duplicate keys": b'{"source":0,"source":1,"data":{"dtype":"float","values":[[1,1,1,1]]}}',
    "complex pairs wrong": b'{"source":1,"data":{"dtype":"cfloat","values":[[1,2,3]]}}',
}


@pytest.mark.slow
@pytest.mark.parametrize("name", EDGE_CASES)
def test_edge_case_bodies(server, name):
    check(send(server, EDGE_CASES[name]), "edge cases")


GOOD = json.dumps({"source": 1, "data": {"dtype": "float", "values": IRIS}}).encode()


@pytest.mark.slow
@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/xml", "application/json; charset=utf-16",
     "multipart/form-data; boundary=x", "application/octet-stream", "", "*/*"],
)  # fmt: skip
def test_the_body_is_read_as_json_whatever_the_content_type(server, content_type):
    response = send(server, GOOD, content_type)
    check(response, "content types")
    assert response.status_code == 200  # curl users forget the header; the contract reads JSON regardless


@pytest.mark.slow
def test_malformed_http_is_refused_below_the_app_without_a_5xx(server):
    # A header value with control bytes never reaches the app: the HTTP parser (uvicorn/httptools) answers a
    # plain-text 400 and closes the connection. Recorded so a change in that layer is noticed.
    response = send(server, GOOD, "\x7f/\x7f")
    TRIED[("malformed HTTP", response.status_code)] += 1
    assert response.status_code == 400
    assert post_good(server).status_code == 200


def post_good(server) -> requests.Response:
    return send(server, GOOD)


@pytest.mark.slow
def test_form_and_multipart_bodies_are_refused_in_json(server):
    for response in (
        requests.post(f"{server.url}/service_output", data={"source": "1", "data": "x"}, timeout=30),
        requests.post(f"{server.url}/service_output", files={"file": ("a.json", GOOD)}, timeout=30),
    ):
        check(response, "content types")
        assert_contract_error(response, 400)


@pytest.mark.slow
def test_element_limit_answers_400(server):
    body = {"source": 1, "data": {"dtype": "float", "values": [[0.5] * 4] * (MAX_ELEMENTS // 4 + 1)}}
    response = send(server, json.dumps(body).encode())
    check(response, "limits")
    assert f"limit of {MAX_ELEMENTS}" in assert_contract_error(response, 400)["description"]


@pytest.mark.slow
def test_body_over_the_limit_answers_413(server):
    padding = {"source": 1, "data": {"dtype": "float", "values": IRIS, "bot": "x" * MAX_BYTES}}
    response = send(server, json.dumps(padding).encode())
    check(response, "limits")
    assert "MAX_REQUEST_BYTES" in assert_contract_error(response, 413)["description"]


@pytest.mark.slow
def test_chunked_body_over_the_limit_answers_413(server):
    chunks = (b" " * 8192 for _ in range(MAX_BYTES // 8192 + 4))  # no Content-Length: the size is counted as read
    response = send(server, chunks)
    check(response, "limits")
    assert_contract_error(response, 413)


@pytest.mark.slow
def test_413_is_answered_from_the_headers_before_the_body_is_read(server):
    # Announce 1 GB and send nothing: an answer can only come from the Content-Length header.
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port), timeout=20) as conn:
        conn.sendall(
            b"POST /service_output HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:300]
    TRIED[("limits", 413)] += 1
    body = json.loads(payload)
    assert body["code"] == "413" and "MAX_REQUEST_BYTES" in body["description"]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path"), [("GET", "/service_output"), ("PUT", "/service_output"),
                                              ("DELETE", "/service_output"), ("POST", "/nope"), ("GET", "/%ff"),
                                              ("POST", "/info")])  # fmt: skip
def test_wrong_methods_and_paths_are_json_errors(server, method, path):
    response = requests.request(method, f"{server.url}{path}", data=GOOD, timeout=30)
    check(response, "methods and paths")
    assert response.status_code in (404, 405)


# --- schemathesis: bodies generated from the OpenAPI description of POST /service_output -------------------------


def contract_openapi() -> dict:
    """An OpenAPI document for POST /service_output built from the contract's own pydantic model."""
    body = InfernetInput.model_json_schema(ref_template="#/components/schemas/{model}")
    definitions = body.pop("$defs", {})
    return {
        "openapi": "3.0.2",
        "info": {"title": "infernet torch service (contract)", "version": "1"},
        "paths": {
            "/service_output": {
                "post": {
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InfernetInput"}}},
                    },
                    "responses": {"200": {"description": "the model's output"}},
                }
            }
        },
        "components": {"schemas": {"InfernetInput": body, **definitions}},
    }


def fuzz_service_output(schema, server, generator: str) -> None:
    operation = schema["/service_output"]["POST"]
    strategy = st.one_of(
        operation.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE),
    )

    @over_http
    @given(strategy)
    def run(case):
        kwargs = case.as_transport_kwargs(base_url=server.url)
        check(requests.request(**{**kwargs, "timeout": 30}), generator)

    run()


@pytest.mark.slow
def test_schemathesis_against_the_served_openapi_document(server):
    response = requests.get(f"{server.url}/docs.json", timeout=30)
    if response.status_code != 200:
        pytest.skip(f"/docs.json answers {response.status_code}; it does not serve an OpenAPI document yet")
    document = response.json()
    if "post" not in document.get("paths", {}).get("/service_output", {}):
        pytest.skip("/docs.json does not describe POST /service_output yet")
    fuzz_service_output(schemathesis.openapi.from_dict(document), server, "schemathesis (/docs.json)")


@pytest.mark.slow
def test_schemathesis_against_the_contract_model(server):
    fuzz_service_output(schemathesis.openapi.from_dict(contract_openapi()), server, "schemathesis (contract model)")


@pytest.mark.slow
def test_no_worker_died(server):
    """Last in this module: after every body above, the same processes still serve."""
    now = {p.pid for group in processes(server).values() for p in group}
    assert now == server.pids
    response = send(server, GOOD)
    assert response.status_code == 200
    by_generator: dict[str, dict[str, int]] = {}
    for (generator, status), count in sorted(TRIED.items()):
        by_generator.setdefault(generator, {})[str(status)] = count
    figure("hostile_input", total=sum(TRIED.values()), by_generator=by_generator)
