"""The contract of the public app, in this process: the real ``PublicApp`` and the real iris workflow, with only the
hop between them stood in for (tests/fixtures/public_app.py). What needs the real servers (the hop, BentoML's
routing and middleware, both paths) is in tests/test_service_http.py."""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import time

import orjson
import pytest
import torch
from eth_abi import decode, encode

from core.settings import EMBEDDED_MODEL, model_threads
from core.terms import DTYPE_NAMES, PROOFS_NOT_SUPPORTED
from public import SERVICE_NAME, __version__

IRIS_VECTOR = [1.0380048, 0.5586108, 1.1037828, 1.712096]
# The prefix of every failure of the model itself (workflows/base.py): a test asserts on it, never on torch's text.
MODEL_FAILED = "the model failed on this input: "


def offchain(values, dtype="double", **data):
    return {"source": 1, "data": {"dtype": dtype, "values": values, **data}}


@functools.cache
def _iris_model():
    return torch.jit.load(str(EMBEDDED_MODEL))


def expected_iris(rows):
    with torch.inference_mode():
        return _iris_model()(torch.tensor(rows, dtype=torch.float32)).tolist()


def sd59x18(values):
    return encode(["int256[]"], [[round(v * 10**18) for v in values]]).hex()


def assert_error(response, status, *fragments):
    """The contract's error body (``{"code", "name", "description"}``) with ``status``; each fragment in its
    description. Works on a requests or an httpx response."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict), body
    assert body["code"] == str(status) and isinstance(body["name"], str) and body["name"]
    for fragment in fragments:
        assert fragment in body["description"], body
    assert "Traceback" not in response.text
    return body


@pytest.fixture
def public(in_process):
    """The public app with nothing configured (an empty environment), bound to the iris workflow."""
    return in_process()


def post_raw(client, body: bytes, **headers):
    return client.request("POST", "/service_output", content=body, headers=headers)


# --- answers ------------------------------------------------------------------------------------------------------


def test_iris_vector_is_class_2(public):
    response = public.post(offchain([IRIS_VECTOR]))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dtype"] == "float" and body["shape"] == [1, 3]
    assert max(range(3), key=body["values"][0].__getitem__) == 2
    assert body["values"][0] == pytest.approx(expected_iris([IRIS_VECTOR])[0], rel=1e-6, abs=1e-12)


def test_seed_readme_example_shape_works_without_content_type(public):
    """curl users forget the header; extra keys such as the seed's "bot" are ignored."""
    body = {"source": 1, "data": {"bot": "\U0001f60c hello", "dtype": "float", "values": [IRIS_VECTOR, IRIS_VECTOR]}}
    response = post_raw(public, orjson.dumps(body))
    assert response.status_code == 200, response.text
    assert response.json()["shape"] == [2, 3]


def test_output_is_valid_input_for_the_next_container(public):
    first = public.post(offchain([IRIS_VECTOR])).json()
    # Fed back as-is, the output passes validation and reaches the model (which wants 4 features, not 3).
    assert_error(public.post({"source": 1, "data": first}), 422, MODEL_FAILED)
    padded = {**first, "values": [[*row, 0.0] for row in first["values"]], "shape": [1, 4]}
    second = public.post({"source": 1, "data": padded})
    assert second.status_code == 200, second.text


def test_shape_with_flat_values(public):
    response = public.post(offchain(IRIS_VECTOR * 2, shape=[2, 4]))
    assert response.status_code == 200 and response.json()["shape"] == [2, 3]


@pytest.mark.parametrize("dtype", [name for name in DTYPE_NAMES if name not in ("cfloat", "cdouble")])
def test_every_real_dtype_of_the_vocabulary_reaches_the_float_model(public, dtype):
    # Inputs are cast to the model's dtype (float); the answer comes back in it.
    values = [[True, False, True, True]] if dtype == "bool" else [[1, 0, 1, 2]]
    response = public.post(offchain(values, dtype=dtype))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["dtype"] == "float" and body["shape"] == [1, 3]
    assert body["values"][0] == pytest.approx(expected_iris([[1.0, 0.0, 1.0, float(dtype != "bool") + 1]])[0])


def test_concurrent_requests_share_runner_calls_and_get_their_own_rows(public):
    rows = [[[i / 10, -i / 20, (i % 7) / 3, r / 5] for r in range(1 + i % 3)] for i in range(16)]
    responses = public.post_together([offchain(r, dtype="float") for r in rows])
    for own, response in zip(rows, responses):
        assert response.status_code == 200, response.text
        assert torch.allclose(torch.tensor(response.json()["values"]), torch.tensor(expected_iris(own)), atol=1e-6)
    assert sum(public.runner.calls) == len(rows) and max(public.runner.calls) > 1


def test_one_bad_request_in_a_shared_call_fails_alone(public):
    bodies = [offchain([IRIS_VECTOR], dtype="float")] * 3 + [offchain([[1.0, 2.0, 3.0]], dtype="float")]
    *good, bad = public.post_together(bodies)
    assert_error(bad, 422, MODEL_FAILED)
    assert [r.status_code for r in good] == [200, 200, 200]


# --- CHAIN ----------------------------------------------------------------------------------------------------------


def test_chain_in_chain_out_matches_offchain(public):
    reference = public.post(offchain([IRIS_VECTOR])).json()["values"][0]
    response = public.post({"source": 0, "data": "0x" + sd59x18(IRIS_VECTOR), "destination": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"raw_input", "processed_input", "raw_output", "processed_output", "proof"}
    (numbers,) = decode(["int256[]"], bytes.fromhex(body["raw_output"]))
    assert [n / 10**18 for n in numbers] == pytest.approx(reference, abs=1e-6)


def test_chain_in_offchain_out(public):
    response = public.post({"source": 0, "data": sd59x18(IRIS_VECTOR)})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["shape"] == [1, 3] and max(range(3), key=body["values"][0].__getitem__) == 2


def test_offchain_in_chain_out(public):
    response = public.post({**offchain([IRIS_VECTOR]), "destination": 0})
    (numbers,) = decode(["int256[]"], bytes.fromhex(response.json()["raw_output"]))
    assert len(numbers) == 3 and max(range(3), key=numbers.__getitem__) == 2


# --- refusals -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"{not json", 400, "body is not valid JSON"),
        (b"[1, 2]", 400, "body must be a JSON object"),
        (b'{"data": {}}', 400, "source: Field required"),
        (b'{"source": 1}', 400, "data: Field required"),
        (b'{"source": 0, "data": {"dtype": "float", "values": [1]}}', 400, "CHAIN source needs a hex string"),
        (b'{"source": 1, "data": "00ff"}', 400, "OFFCHAIN source needs a JSON object"),
        (b'{"source": 1, "data": "abc"}', 400, "OFFCHAIN source needs a JSON object"),
        (b'{"source": 0, "data": "0xzz"}', 400, "must be a hex string"),
        (b'{"source": 0, "data": "00"}', 400, "not an ABI-encoded int256[]"),
        (b'{"source": 1, "data": {"dtype": "quad", "values": [[1]]}}', 400, 'unknown dtype "quad"'),
        (b'{"source": 1, "data": {"dtype": "float", "values": [[1,2,3,4],[1,2,3]]}}', 400, "row 1 has 3 elements"),
        (b'{"source": 1, "data": {"dtype": "float", "values": [1,2,3], "shape": [1,4]}}', 400, "shape: [1, 4] holds 4"),
        (b'{"source": 1, "data": {"dtype": "int", "values": [[1.5,2,3,4]]}}', 400, "int expects integers"),
        (b'{"source": 1, "data": {"dtype": "uint8", "values": [[300,2,3,4]]}}', 400, "300 is out of range for uint8"),
        (b'{"source": 1, "data": {"dtype": "half", "values": [[1e6,2,3,4]]}}', 400, "1000000.0 overflows half"),
        (b'{"source": 1, "data": {"dtype": "float", "values": [[NaN,2,3,4]]}}', 400, "body is not valid JSON"),
        (b'{"source": 1, "data": {"dtype": "float", "values": [[Infinity,2,3,4]]}}', 400, "body is not valid JSON"),
        (b'{"source": 1, "data": {"dtype": "float", "values": []}}', 400, "values: empty"),
        (b'{"source": 1, "data": {}, "requires_proof": true}', 400, PROOFS_NOT_SUPPORTED),
        (b'{"source": 1, "data": {}, "requires_proof": "yes"}', 400, "requires_proof"),
        (b'{"source": 1, "data": {}, "destination": 2}', 400, "STREAM (2) is not supported"),
        (b'{"source": 1, "data": {}, "destination": 9}', 400, "destination"),
        (b"[" * 65 + b"]" * 65, 400, "nested deeper than 64 levels"),
        # The model's own failures: our prefix and 422, whatever torch says after it.
        (b'{"source": 1, "data": {"dtype": "float", "values": [[1,2,3]]}}', 422, MODEL_FAILED),
        (b'{"source": 1, "data": {"dtype": "float", "values": [1,2,3,4]}}', 422, MODEL_FAILED),
    ],
)
def test_error_table(public, body, status, fragment):
    assert_error(post_raw(public, body, **{"content-type": "application/json"}), status, fragment)


def test_validation_errors_carry_locations(public):
    body = assert_error(public.post({"source": 7, "data": 3}), 400)
    assert {tuple(e["loc"]) for e in body["errors"]} == {("source",), ("data",)}
    # The STREAM refusal named no field (explorer P8)
    body = assert_error(public.post({"source": 1, "data": {}, "destination": 2}), 400)
    assert body["errors"] == [
        {"loc": ["destination"], "msg": "STREAM (2) is not supported; use 0 (CHAIN) or 1 (OFFCHAIN)"}
    ]
    assert body["description"] == "destination: STREAM (2) is not supported; use 0 (CHAIN) or 1 (OFFCHAIN)"


def test_unknown_routes_and_methods_are_json_with_allow(public):
    assert_error(public.get("/nowhere"), 404, "/nowhere", "POST /service_output")
    wrong = public.get("/service_output")
    assert_error(wrong, 405, "use POST for /service_output")
    assert wrong.headers["allow"] == "POST, OPTIONS"
    for path in ("/info", "/livez", "/service-resources"):
        response = public.request("POST", path)
        assert_error(response, 405, f"use GET for {path}")
        assert response.headers["allow"] == "GET, HEAD, OPTIONS"


def test_options_names_the_methods_of_a_route(public):
    response = public.request("OPTIONS", "/service_output")
    assert response.status_code == 204 and response.headers["allow"] == "POST, OPTIONS" and response.content == b""
    assert_error(public.request("OPTIONS", "/nowhere"), 404, "/nowhere")


def test_body_over_max_request_bytes_is_413_by_content_length_and_by_size(in_process):
    client = in_process({"MAX_REQUEST_BYTES": "1024"})
    big = orjson.dumps(offchain([IRIS_VECTOR] * 40))
    assert len(big) > 1024
    refused = post_raw(client, big)
    assert_error(refused, 413, f"body of {len(big)} bytes", "(MAX_REQUEST_BYTES)")
    assert refused.headers["connection"] == "close"  # refused by its Content-Length: the body was never read
    assert client.runner.calls == []
    small = client.post(offchain([IRIS_VECTOR] * 2))
    assert small.status_code == 200, small.text


def test_gzip_bodies_decode_and_other_codings_get_415(in_process):
    client = in_process({"MAX_REQUEST_BYTES": "4096"})
    body = orjson.dumps(offchain([IRIS_VECTOR]))
    response = post_raw(client, gzip.compress(body), **{"content-encoding": "gzip"})
    assert response.status_code == 200 and response.json()["shape"] == [1, 3]
    assert_error(post_raw(client, gzip.compress(b" " * 8192 + body), **{"content-encoding": "gzip"}), 413)
    assert_error(post_raw(client, body, **{"content-encoding": "gzip"}), 400, "not valid gzip")
    unsupported = post_raw(client, body, **{"content-encoding": "br"})
    assert_error(unsupported, 415, "'br' is not supported")
    assert unsupported.headers["accept-encoding"] == "gzip, identity"


def test_bearer_token_from_the_settings_guards_the_routes(in_process):
    client = in_process({"BEARER_TOKEN": "tok_in_process_secret"})
    refused = client.post(offchain([IRIS_VECTOR]))
    assert_error(refused, 401)
    assert "tok_in_process_secret" not in refused.text
    assert client.get("/info").status_code == 401
    ok = client.post(offchain([IRIS_VECTOR]), headers={"authorization": "Bearer tok_in_process_secret"})
    assert ok.status_code == 200, ok.text


def test_a_loading_or_unreachable_runner_is_503_with_retry_after(public):
    public.runner.ready = False
    loading = public.post(offchain([IRIS_VECTOR]))
    assert_error(loading, 503, "the model is still loading")
    assert loading.headers["retry-after"] == "1"
    public.runner.ready = True
    public.runner.unreachable = True
    assert_error(public.post(offchain([IRIS_VECTOR])), 503, "the model runner is unreachable")
    public.runner.unreachable = False
    assert public.post(offchain([IRIS_VECTOR])).status_code == 200


def test_livez_times_a_silent_runner_from_the_first_probe_it_left_unanswered_readyz_included(in_process):
    # Each API worker timed the runner's silence from its own first unanswered /livez. A worker is chosen per
    # connection, so one that the orchestrator's readiness probes reached, but its liveness probes only later, still
    # answered /livez 200 10 x REQUEST_TIMEOUT_S after the runner stopped, and the pod was restarted late (a loaded
    # CI run of tests/test_crash_recovery.py measured 36.7 s for a 10 s rule). The stopped runner is stood in for
    # (its health call times out, its readiness probe answers False as BentoML's does past its 1 s); the real one,
    # SIGSTOPped under bentoml serve, is in tests/test_crash_recovery.py.
    client = in_process({"REQUEST_TIMEOUT_S": "0.1"})  # /livez's limit: 1 s
    stopped = False

    async def health():
        if stopped:
            raise TimeoutError("stand-in runner stopped")
        return {"busy_for_s": 0.0}

    async def is_ready():
        return not stopped

    client.app.bind(infer=client.runner.infer, describe=client.runner.describe, is_ready=is_ready, health=health)
    assert client.get("/readyz").status_code == 200
    assert client.get("/livez").json() == {"live": True}
    stopped = True
    assert_error(client.get("/readyz"), 503, "still loading")
    time.sleep(1.2)
    # This worker's first /livez since the stop: the runner has not answered for 1.2 s, since the /readyz above.
    body = assert_error(client.get("/livez"), 503, "has not answered", "10 x REQUEST_TIMEOUT_S (1 s)")
    assert "stopped or stuck" in body["description"]
    stopped = False
    assert client.get("/livez").json() == {"live": True}  # it answers again: the clock is reset


# --- information routes ---------------------------------------------------------------------------------------------


def test_info_describes_workflow_model_batching_and_limits(in_process):
    info = in_process({"MAX_BATCH_SIZE": "8", "MAX_LATENCY_MS": "25"}).get("/info").json()
    assert info["service"] == SERVICE_NAME and info["version"] == __version__
    assert info["workflow"] == "workflows.torch_workflow.TorchInferenceWorkflow"
    model = info["model"]
    assert model["source"] == "local" and model["file"] == "model.torch" and model["format"] == "torchscript"
    assert model["dtype"] == "float"
    assert model["threads"] == model_threads()  # TORCH_NUM_THREADS unset: a core is left to the HTTP side
    assert model["sha256"] == hashlib.sha256(EMBEDDED_MODEL.read_bytes()).hexdigest()
    assert model["batching"]["enabled"] is True and model["batching"]["checked"] is True
    assert info["batching"] == {"max_batch_size": 8, "max_latency_ms": 25}
    assert info["limits"] == {
        "max_request_bytes": 32 * 1024 * 1024,
        "max_request_elements": 4_000_000,
        "request_timeout_s": 60.0,
        "max_concurrency": 256,
    }


def test_service_resources(public):
    response = public.get("/service-resources")
    assert response.status_code == 200 and isinstance(response.json(), dict)


def test_a_timeout_while_the_named_model_downloads_or_loads_says_how_far_it_got(in_process):
    """Finding F5: a request whose deadline passed while its per-request model downloaded got a bare 504. The
    runner's /info lists its downloads (runner/model_registry.py); the stand-in's infer never answers in time."""
    client = in_process({"ALLOWED_MODELS": "huggingface/models/*", "REQUEST_TIMEOUT_S": "0.3"})
    ids = {state: f"huggingface/models/{state}:m.pt" for state in ("downloading", "queued", "loading", "loaded")}
    download = {"downloaded_bytes": 4096, "total_bytes": 53248, "seconds": 1.5}
    client.runner.description = {
        **client.runner.description,
        "models": {
            "loaded": [{"model_id": ids["loaded"], "bytes": 10}],
            "loading": [ids["downloading"], ids["queued"], ids["loading"]],
            "downloading": [
                {"model_id": ids["downloading"], "state": "downloading", **download},
                {"model_id": ids["queued"], "state": "queued", **download, "downloaded_bytes": 0, "seconds": 0.0},
            ],
        },
    }

    async def never_in_time(requests):
        await asyncio.sleep(1)  # past REQUEST_TIMEOUT_S

    client.app.bind(infer=never_in_time, describe=client.runner.describe, is_ready=client.runner.is_ready)

    def timed_out(state):
        response = client.post(
            {"source": 1, "data": {"model_id": ids[state], "input": offchain([IRIS_VECTOR])["data"]}}
        )
        return assert_error(response, 504, "no answer within 0.3 s (REQUEST_TIMEOUT_S)")

    body = timed_out("downloading")
    assert ids["downloading"] in body["description"] and "(4096 of 53248 bytes so far)" in body["description"]
    assert "the download continues" in body["description"]
    assert body["model"] == {"model_id": ids["downloading"], "state": "downloading", **download}
    body = timed_out("queued")
    assert "queued behind other downloads" in body["description"] and body["model"]["state"] == "queued"
    body = timed_out("loading")
    assert "downloaded and still loading" in body["description"]
    assert body["model"] == {"model_id": ids["loading"], "state": "loading"}
    body = timed_out("loaded")  # nothing in flight for it: the plain 504
    assert "model" not in body and ids["loaded"] not in body["description"]
    assert "model" not in assert_error(client.post(offchain([IRIS_VECTOR])), 504)  # no model named
