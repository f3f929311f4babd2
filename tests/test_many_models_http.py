"""Many models over HTTP: a real ``bentoml serve`` with ALLOWED_MODELS, models fetched per request from the loopback
Hub (tests/hubserver.py, its own repositories here) and from arlocal; the 1.x and 2.0 request and answer layouts,
OFFCHAIN and CHAIN, with the iris model (default and per request) and a California-housing style linear model."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch
from eth_abi import encode

from core.model_ids import ModelId, encode_model_id_abi
from core.settings import EMBEDDED_MODEL
from public.infernet_ml_layouts import decode_vector_v1, decode_vector_v2, encode_vector_v1, encode_vector_v2
from tests.fixtures.arlocal import PUBLISH, Arlocal, new_wallet
from tests.fixtures.server import Server, run_to_exit, serving
from tests.hubserver import Hub, Repo, make_repo
from tests.models import Affine, save
from tests.reliability_support import wait_for
from tests.test_onnx_workflow import iris_onnx

pytestmark = pytest.mark.slow

IRIS = [1.0380048, 0.5586108, 1.1037828, 1.712096]  # the original service's test: class 2
HOUSING = [8.3252, 41.0, 6.984127, 1.02381, 322.0, 2.555556, 37.88, -122.23]
HOUSING_ANSWER = 4.1519430552  # the original's test value
HOUSING_ID = "huggingface/models/housing:housing.pt"
IRIS_ID = "huggingface/models/iris:iris.pt"
ONNX_ID = "huggingface/models/iris-onnx:iris.onnx"
SLOW_BYTES = {name: f"{name} never loaded\n".encode() * 2048 for name in ("slow-a", "slow-b")}
SLOW_DOWNLOAD_S = 120.0
CACHE_BOUND_MODELS = ("alpha", "beta", "gamma")  # three copies of the iris model in repositories of their own
BOMB_BYTES = 10_000_000  # its archive declares 3 bytes more: "pt2"
# Where the pickled .pt2's code would write its marker: a folder of its own, so no other run's marker is seen.
EXPORT_MARKER_DIR = Path(tempfile.mkdtemp(prefix="pickled-export-marker-"))


class Housing(torch.nn.Module):
    """A linear regression 8 -> 1 in float64 whose answer for HOUSING is HOUSING_ANSWER."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 1, dtype=torch.float64)
        with torch.no_grad():
            weight = torch.tensor([[0.5, 0.01, -0.1, 0.8, -0.0001, -0.04, -0.4, -0.42]], dtype=torch.float64)
            self.linear.weight.copy_(weight)
            self.linear.bias.fill_(HOUSING_ANSWER - float(weight[0] @ torch.tensor(HOUSING, dtype=torch.float64)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([2.0, 3.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


class WritesMarker:
    """Unpickles to Scale's weight after writing ``marker``: the uploader's code running in the server."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        code = (
            f"(__import__('pathlib').Path({str(self.marker)!r}).write_text('code ran'), "
            "__import__('torch').nn.Parameter(__import__('torch').tensor([2.0, 3.0])))[1]"
        )
        return (eval, (code,))


def pickled_export_bytes(root: Path, marker: Path) -> bytes:
    """A torch.export archive of Scale whose weight w is stored pickled (use_pickle in its weights config), as an
    uploader can write it by hand: torch.export.load unpickles it with weights_only=False."""
    program = torch.export.export(Scale(), (torch.ones(3, 2),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, str(root / "good.pt2"))
    evil = io.BytesIO()
    torch.save(WritesMarker(marker), evil)
    out = io.BytesIO()
    with zipfile.ZipFile(root / "good.pt2") as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("data/weights/model_weights_config.json"):
                config = json.loads(data)
                config["config"]["w"].update(use_pickle=True, path_name="weight_0")
                data = json.dumps(config).encode()
            elif info.filename.endswith("data/weights/weight_0"):
                data = evil.getvalue()
            target.writestr(info, data)
    return out.getvalue()


def torchscript_bytes(model: torch.nn.Module, path: Path) -> bytes:
    torch.jit.save(torch.jit.script(model.eval()), str(path))
    return path.read_bytes()


def zip_bomb(path: Path) -> bytes:
    """A small zip archive in torch.export's layout whose one weight entry declares BOMB_BYTES (deflated zeros: about
    10 KB on disk)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model/archive_format", "pt2")
        archive.writestr("model/data/weights/weight_0", bytes(BOMB_BYTES))
    return path.read_bytes()


@pytest.fixture(scope="module")
def models_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("many-models-hub")
    iris = EMBEDDED_MODEL.read_bytes()  # TorchScript
    housing = torchscript_bytes(Housing(), root / "housing.pt")
    pickled = save(Affine(), root / "pickled.pt", "pickle", torch.zeros(1, 4)).read_bytes()
    pickled_export = pickled_export_bytes(root, EXPORT_MARKER_DIR / "code-ran")
    repos = {
        "models/housing": Repo(make_repo(root / "housing", [{"housing.pt": housing}])),
        "models/iris": Repo(make_repo(root / "iris", [{"iris.pt": iris}])),
        "models/flight": Repo(make_repo(root / "flight", [{"flight.pt": iris}])),
        "models/pickled": Repo(make_repo(root / "pickled", [{"pickled.pt": pickled}])),
        "models/pickled-export": Repo(make_repo(root / "pickled-export", [{"model.pt2": pickled_export}])),
        "models/export": Repo(make_repo(root / "export", [{"model.pt2": (root / "good.pt2").read_bytes()}])),
        "models/iris-onnx": Repo(
            make_repo(root / "iris-onnx", [{"iris.onnx": iris_onnx(root / "iris.onnx").read_bytes()}])
        ),
        # Downloads that take SLOW_DOWNLOAD_S (bytes of their own: the CDN is keyed by sha256).
        **{
            f"models/{name}": Repo(
                make_repo(root / name, [{"model.pt": SLOW_BYTES[name]}]), cdn_seconds=SLOW_DOWNLOAD_S
            )
            for name in SLOW_BYTES
        },
        **{f"models/{name}": Repo(make_repo(root / name, [{f"{name}.pt": iris}])) for name in CACHE_BOUND_MODELS},
        "models/default-iris": Repo(make_repo(root / "default-iris", [{"iris.pt": iris}])),
        "models/bomb": Repo(make_repo(root / "bomb", [{"model.pt2": zip_bomb(root / "bomb.pt2")}])),
    }
    server = Hub(repos).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def publisher(arlocal: Arlocal, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The housing model published to arlocal by a wallet that ALLOWED_MODELS names, and one by a stranger."""
    root = tmp_path_factory.mktemp("many-models-arweave")
    housing = root / "housing.pt"
    torchscript_bytes(Housing(), housing)
    owners = {}
    for who in ("owner", "stranger"):
        wallet = root / f"{who}.json"
        owners[who] = new_wallet(wallet)
        arlocal.mint(owners[who])
        command = [sys.executable, str(PUBLISH), str(housing), "--wallet", str(wallet), "--repo", "housing"]
        done = subprocess.run(
            [*command, "--gateway", arlocal.url, "--quiet"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
    arlocal.mine()
    return owners


@pytest.fixture(scope="module")
def server(
    models_hub: Hub, arlocal: Arlocal, publisher: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    env = {
        "HF_ENDPOINT": models_hub.url,
        "ARWEAVE_GATEWAY": arlocal.url,
        "ALLOWED_MODELS": json.dumps(["huggingface/models/*", f"arweave/{publisher['owner']}/*"]),
        "MAX_LOADED_MODELS": "1",  # two models alternately: every switch evicts
    }
    with serving(env, tmp_path_factory.mktemp("many-models-server")) as running:
        yield running


@pytest.fixture(scope="module")
def public_path_models(models_hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The Hub's models on BentoML's public path (INFERNET_FAST_PATH=0, as on another BentoML version), where every
    request naming a model was a 400 "dtype: missing": BentoML's client turned the runner call's items into dicts
    (explorer K7)."""
    env = {
        "HF_ENDPOINT": models_hub.url,
        "ALLOWED_MODELS": json.dumps(["huggingface/models/*"]),
        "INFERNET_FAST_PATH": "0",
    }
    with serving(env, tmp_path_factory.mktemp("many-models-public-path")) as running:
        yield running


@pytest.fixture(params=["fast path", "public path"])
def either_path(request: pytest.FixtureRequest) -> Server:
    return request.getfixturevalue("server" if request.param == "fast path" else "public_path_models")


def post_data(server: Server, data: object, **body: object) -> dict:
    response = server.post({"source": 1, "data": data, **body})
    assert response.status_code == 200, response.text
    return response.json()


def post_model(server: Server, model_id: str, tensor: dict) -> requests.Response:
    """POST one OFFCHAIN request naming ``model_id`` with ``tensor`` as its input; the response, whatever its status."""
    return server.post({"source": 1, "data": {"model_id": model_id, "input": tensor}})


def iris_class(values: list) -> int:
    flat = values[0] if isinstance(values[0], list) else values
    return max(range(3), key=flat.__getitem__)


def metric(server: Server, name: str, model_id: str) -> float:
    text = server.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and f'model_id="{model_id}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_default_model_unaffected(server: Server):
    answer = post_data(server, {"dtype": "double", "values": [IRIS]})
    assert iris_class(answer["values"]) == 2


def test_per_request_model_in_offchain_layouts(either_path: Server):
    server = either_path
    v2 = post_data(server, {"model_id": HOUSING_ID, "input": {"dtype": 2, "shape": [1, 8], "values": HOUSING}})
    assert v2["dtype"] == 2 and v2["shape"] == [1, 1]
    assert v2["values"][0] == pytest.approx(HOUSING_ANSWER, abs=1e-9)
    v1 = post_data(
        server,
        {
            "input": {"dtype": "double", "shape": [1, 8], "values": [HOUSING]},
            "model_source": 2,
            "load_args": {"repo_id": "models/housing", "filename": "housing.pt"},
        },
    )
    assert v1["dtype"] == "double" and v1["shape"] == [1, 1]  # 1.x: flat values
    assert v1["values"][0] == pytest.approx(HOUSING_ANSWER, abs=1e-9)
    iris = post_data(server, {"model_id": IRIS_ID, "input": {"dtype": 2, "shape": [1, 4], "values": IRIS}})
    assert iris_class(iris["values"]) == 2


def test_default_model_in_newer_layouts(server: Server):
    v2 = post_data(server, {"dtype": 2, "shape": [1, 4], "values": IRIS})
    assert v2["dtype"] == 1 and iris_class(v2["values"]) == 2  # the iris model answers float32: 2.0 code 1
    v1 = post_data(server, {"input": {"dtype": "double", "shape": [1, 4], "values": [IRIS]}})
    assert iris_class(v1["values"]) == 2


def chain(server: Server, hex_data: str) -> dict:
    response = server.post({"source": 0, "destination": 0, "data": hex_data})
    assert response.status_code == 200, response.text
    return response.json()


def test_chain_layouts(either_path: Server):
    server = either_path
    vector = encode_vector_v1("double", [1, 8], HOUSING)
    v1 = chain(
        server,
        encode(["uint8", "string", "string", "string", "bytes"], [2, "models/housing", "housing.pt", "", vector]).hex(),
    )
    out = decode_vector_v1(bytes.fromhex(v1["raw_output"]))
    assert out["values"][0] == pytest.approx(HOUSING_ANSWER, abs=1e-9)
    model = encode_model_id_abi(ModelId("huggingface", "models", "housing", "housing.pt"))
    v2 = chain(server, encode(["bytes", "bytes"], [model, encode_vector_v2("double", [1, 8], HOUSING)]).hex())
    out = decode_vector_v2(bytes.fromhex(v2["raw_output"]))
    assert out["values"][0] == pytest.approx(HOUSING_ANSWER, abs=1e-9)
    # The default model in both layouts (empty model fields), and in today's int256[].
    iris_v1 = encode_vector_v1("double", [1, 4], IRIS)
    default_v1 = chain(server, encode(["uint8", "string", "string", "string", "bytes"], [0, "", "", "", iris_v1]).hex())
    assert iris_class(decode_vector_v1(bytes.fromhex(default_v1["raw_output"]))["values"]) == 2
    default_v2 = chain(server, encode(["bytes", "bytes"], [b"", encode_vector_v2("double", [1, 4], IRIS)]).hex())
    assert iris_class(decode_vector_v2(bytes.fromhex(default_v2["raw_output"]))["values"]) == 2
    today = chain(server, encode(["int256[]"], [[round(v * 10**18) for v in IRIS]]).hex())
    assert today["raw_output"]
    # A value the named model's dtype (float) cannot hold is refused naming it as sent, in both layouts.
    iris_model = encode_model_id_abi(ModelId("huggingface", "models", "iris", "iris.pt"))
    wide_v2 = encode(["bytes", "bytes"], [iris_model, encode_vector_v2("double", [1, 4], [1e300, 1.0, 1.0, 1.0])])
    refused = server.post({"source": 0, "destination": 0, "data": wide_v2.hex()})
    assert refused.status_code == 400, refused.text
    assert refused.json()["description"] == "vector.values[0]: 1e+300 (float64) does not fit float (the model's dtype)"
    wide_v1 = encode_vector_v1("double", [1, 4], [[1e300, 1.0, 1.0, 1.0]])
    layout_v1 = ["uint8", "string", "string", "string", "bytes"]
    refused = server.post(
        {"source": 0, "destination": 0, "data": encode(layout_v1, [2, "models/iris", "iris.pt", "", wide_v1]).hex()}
    )
    assert refused.status_code == 400, refused.text
    assert refused.json()["description"] == "vector.values[0]: 1e+300 (double) does not fit float (the model's dtype)"


def test_not_allowed_and_malformed_models_refused_without_download(server: Server, models_hub: Hub):
    before = len(models_hub.log)
    refused = server.post(
        {"source": 1, "data": {"model_id": "huggingface/other/x:m.pt", "input": {"dtype": 2, "values": [1.0]}}}
    )
    assert refused.status_code == 403, refused.text
    body = refused.json()
    assert (
        body["code"] == "403"
        and "huggingface/other/x:m.pt" in body["description"]
        and "ALLOWED_MODELS" in body["description"]
    )
    malformed = server.post(
        {"source": 1, "data": {"model_id": "huggingface/../x", "input": {"dtype": 2, "values": [1.0]}}}
    )
    assert malformed.status_code == 400, malformed.text
    assert len(models_hub.log) == before
    assert server.get("/service-resources", params={"model_id": "huggingface/other/x:m.pt"}).json() == {
        "supported": False,
        "error": "not allowed",
    }


def test_pickled_hub_model_refused(server: Server):
    response = server.post(
        {
            "source": 1,
            "data": {
                "model_id": "huggingface/models/pickled:pickled.pt",
                "input": {"dtype": 2, "shape": [1, 4], "values": IRIS},
            },
        }
    )
    assert response.status_code == 403, response.text
    assert "pickle" in response.json()["description"] and "ALLOW_PICKLED_MODELS" in response.json()["description"]


def test_pickled_export_hub_model_refused_without_running_its_code(server: Server):
    """Explorer S1: a .pt2 whose weight is stored pickled ran its uploader's code in the server and answered 200."""
    response = post_model(
        server, "huggingface/models/pickled-export:model.pt2", {"dtype": 1, "shape": [2, 2], "values": [1, 1, 2, 2]}
    )
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["code"] == "403" and "pickle" in body["description"], body
    assert "ALLOW_PICKLED_MODELS" in body["description"], body
    assert not (EXPORT_MARKER_DIR / "code-ran").exists()


def test_export_hub_model_without_pickles_answers(server: Server):
    """The .pt2 check refuses only pickled entries: the same archive as written by torch.export.save is served."""
    response = post_model(
        server, "huggingface/models/export:model.pt2", {"dtype": 1, "shape": [2, 2], "values": [1, 1, 2, 2]}
    )
    assert response.status_code == 200, response.text
    assert response.json()["values"] == [2.0, 3.0, 4.0, 6.0]


def test_ten_concurrent_first_requests_download_once(server: Server, models_hub: Hub):
    data = {"model_id": "huggingface/models/flight:flight.pt", "input": {"dtype": 2, "shape": [1, 4], "values": IRIS}}
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda _: server.post({"source": 1, "data": data}, timeout=60), range(10)))
    assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses]
    assert all(iris_class(r.json()["values"]) == 2 for r in responses)
    assert models_hub.downloads("flight.pt") == 1
    assert metric(server, "infernet_model_loads_total", "huggingface/models/flight:flight.pt") == 1


def test_failed_download_answers_every_waiter(server: Server):
    data = {"model_id": "huggingface/models/missing:gone.pt", "input": {"dtype": 2, "values": [1.0]}}
    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(lambda _: server.post({"source": 1, "data": data}, timeout=60), range(5)))
    assert [r.status_code for r in responses] == [404] * 5, [r.text for r in responses]
    assert all("not found" in r.json()["description"] for r in responses)
    asked = server.get("/service-resources", params={"model_id": "huggingface/models/missing:gone.pt"}).json()
    assert asked == {"supported": False, "error": "not found"}
    # A model id a client invented is the client's fault: an INFO line, never ERROR or WARNING (explorer F10: any
    # client could fill the operator's error log).
    lines = [line for line in server.log().splitlines() if "missing:gone.pt" in line or "models/missing" in line]
    assert any("stage=download status=refused" in line and "http_status=404" in line for line in lines), lines
    assert not [line for line in lines if "ERROR" in line or "WARNING" in line], lines


def test_lru_eviction_seen_in_metrics_and_info(server: Server):
    evictions = metric(server, "infernet_model_evictions_total", HOUSING_ID)
    for model_id, values, shape in ((HOUSING_ID, HOUSING, [1, 8]), (IRIS_ID, IRIS, [1, 4])) * 2:
        post_data(server, {"model_id": model_id, "input": {"dtype": 2, "shape": shape, "values": values}})
    assert metric(server, "infernet_model_evictions_total", HOUSING_ID) >= evictions + 2
    models = server.get("/info").json()["models"]
    assert [entry["model_id"] for entry in models["loaded"]] == [IRIS_ID]  # MAX_LOADED_MODELS=1
    assert models["counts"][HOUSING_ID]["loads"] >= 2
    assert re.search(r"\[startup\] stage=download status=ok .*model_id=" + re.escape(HOUSING_ID), server.log())


def test_arweave_model_per_request(server: Server, publisher: dict[str, str]):
    model_id = f"arweave/{publisher['owner']}/housing:housing.pt"
    answer = post_data(server, {"model_id": model_id, "input": {"dtype": 2, "shape": [1, 8], "values": HOUSING}})
    assert answer["values"][0] == pytest.approx(HOUSING_ANSWER, abs=1e-9)
    stranger = f"arweave/{publisher['stranger']}/housing:housing.pt"
    refused = server.post({"source": 1, "data": {"model_id": stranger, "input": {"dtype": 2, "values": HOUSING}}})
    assert refused.status_code == 403, refused.text
    # A repository, file or version nobody published is not found (404), not an unreachable source (explorer N7: 502)
    for missing in ("nosuch:housing.pt", "housing:other.pt", "housing/9.9.9:housing.pt"):
        model_id = f"arweave/{publisher['owner']}/{missing}"
        absent = server.post({"source": 1, "data": {"model_id": model_id, "input": {"dtype": 2, "values": HOUSING}}})
        assert absent.status_code == 404 and absent.json()["code"] == "404", absent.text


def test_onnx_model_per_request(either_path: Server):
    server = either_path
    answer = post_data(server, {"model_id": ONNX_ID, "input": {"dtype": 2, "shape": [1, 4], "values": IRIS}})
    assert answer["shape"] == [1, 3] and iris_class(answer["values"]) == 2
    assert any(entry["model_id"] == ONNX_ID for entry in server.get("/info").json()["models"]["loaded"])


def test_service_resources_lists_loaded_and_cached_models(server: Server):
    # MAX_LOADED_MODELS=1: housing is evicted by iris, but its verified file stays in the cache.
    for model_id, values, shape in ((HOUSING_ID, HOUSING, [1, 8]), (IRIS_ID, IRIS, [1, 4])):
        post_data(server, {"model_id": model_id, "input": {"dtype": 2, "shape": shape, "values": values}})
    listing = server.get("/service-resources").json()
    models = listing["models"]
    assert [entry["model_id"] for entry in models["loaded"]] == [IRIS_ID]
    cached = {entry["model_id"]: entry for entry in models["cached"]}
    assert {HOUSING_ID, IRIS_ID} <= set(cached)
    assert cached[IRIS_ID]["bytes"] == len(EMBEDDED_MODEL.read_bytes())
    assert "huggingface/other/x:m.pt" not in cached and len(models["cached"]) <= 100
    # The node's format: loaded models under "models", loaded and cached ones under "cached_models".
    compute = listing["compute_capability"][0]
    assert IRIS_ID in {m["repo_id"] for m in compute["models"]}
    assert HOUSING_ID not in {m["repo_id"] for m in compute["models"]}
    assert {HOUSING_ID, IRIS_ID} <= {m["repo_id"] for m in compute["cached_models"]}
    housing = next(m for m in compute["cached_models"] if m["repo_id"] == HOUSING_ID)
    assert (housing["storage"], housing["owner"], housing["name"], housing["files"]) == (
        "huggingface",
        "models",
        "housing",
        ["housing.pt"],
    )
    assert housing["sha256"] == cached[HOUSING_ID]["sha256"]


def test_refusal_status_does_not_depend_on_the_repo_name(server: Server, models_hub: Hub, tmp_path: Path):
    """The status of a failed download comes from the source's answer, not from words in the message, which holds
    the repo's name: a download whose bytes do not match the Hub's sha256 (the source's fault, 502) from a repo named
    "aggregated" (holding "gated") was a 403 (explorer S3). A missing repo of that name is a 404."""
    # Bytes of its own: the tampering CDN keys blobs by sha256, and no other repo's file may be altered.
    git_dir = make_repo(tmp_path / "aggregated", [{"flight.pt": b"bytes no other test serves"}])
    models_hub.repos["models/aggregated"] = Repo(git_dir, tamper_cdn=True)
    data = {"input": {"dtype": 2, "shape": [1, 4], "values": IRIS}}
    tampered = server.post({"source": 1, "data": {"model_id": "huggingface/models/aggregated:flight.pt", **data}})
    assert tampered.status_code == 502, tampered.text
    assert "sha256 mismatch" in tampered.json()["description"], tampered.text
    missing = server.post({"source": 1, "data": {"model_id": "huggingface/models/gated-nothing:m.pt", **data}})
    assert missing.status_code == 404, missing.text
    assert "repository not found" in missing.json()["description"], missing.text


def test_ids_the_hub_rejects_are_the_clients_mistake(server: Server, models_hub: Hub):
    """Names huggingface_hub refuses to ask for (``--``, ``..``, a trailing ``-`` or ``.``) are a 400 with the Hub's
    rule, before any download; they were a 502 with an ERROR traceback in the log (explorer S8)."""
    before = len(models_hub.log)
    start = len(server.log())
    for repo, rule in (("a--b", "--"), ("a..b", ".."), ("a-", "cannot start or end"), ("a.", "cannot start or end")):
        model_id = f"huggingface/models/{repo}:m.pt"
        response = server.post({"source": 1, "data": {"model_id": model_id, "input": {"dtype": 2, "values": [1.0]}}})
        assert response.status_code == 400, response.text
        assert model_id in response.json()["description"] and rule in response.json()["description"], response.text
    assert len(models_hub.log) == before
    logged = server.log()[start:]
    assert "ERROR" not in logged and "Traceback" not in logged, logged


def test_a_flood_of_refused_model_ids_writes_a_bounded_number_of_lines(server: Server):
    """Every per-request model a client names that cannot be served printed its own status=refused line, and a
    client can name a new one with every request: 25 requests wrote 25 lines. They now go through the log's bound
    (core/logs.py: 10 lines a minute per line of code in a process); the count of the rest comes when the minute
    ends (tests/test_logs.py waits for it). Every request is still answered."""
    start = len(server.log())
    ids = [f"huggingface/models/flood{i}:gone.pt" for i in range(25)]
    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(lambda i: post_model(server, i, {"dtype": 2, "values": [1.0]}), ids))
    assert [r.status_code for r in responses] == [404] * 25, [r.text for r in responses]
    logged = [line for line in server.log()[start:].splitlines() if "status=refused" in line and "flood" in line]
    assert 1 <= len(logged) <= 10, logged
    assert re.match(r"^\S+ \[INFO\] \[[^\]]*\] \[startup\] stage=download status=refused ", logged[0]), logged[0]
    assert "http_status=404" in logged[0] and "model_id=huggingface/models/flood" in logged[0], logged[0]


def test_slow_downloads_hold_up_no_cached_model_and_a_timeout_says_how_far_they_got(
    models_hub: Hub, tmp_path_factory: pytest.TempPathFactory
):
    """Finding F5: the registry's two loader threads each downloaded and then loaded, so two slow per-request
    downloads held up every other first load, even of a model whose file was already in the cache; and a request
    whose deadline passed meanwhile got a bare 504 that said nothing of the download."""
    env = {
        "HF_ENDPOINT": models_hub.url,
        "ALLOWED_MODELS": json.dumps(["huggingface/models/*"]),
        "MAX_LOADED_MODELS": "1",
        "REQUEST_TIMEOUT_S": "10",
    }
    iris = {"dtype": 2, "shape": [1, 4], "values": IRIS}
    with serving(env, tmp_path_factory.mktemp("slow-downloads")) as server:
        # iris downloaded and verified, then evicted by housing (MAX_LOADED_MODELS=1): on disk, not loaded.
        assert post_model(server, IRIS_ID, iris).status_code == 200
        assert post_model(server, HOUSING_ID, {"dtype": 2, "shape": [1, 8], "values": HOUSING}).status_code == 200
        slow_ids = [f"huggingface/models/{name}:model.pt" for name in SLOW_BYTES]
        with ThreadPoolExecutor(2) as pool:
            slow = [pool.submit(post_model, server, model_id, iris) for model_id in slow_ids]
            hf_home = Path(server.env["HF_HOME"])
            wait_for(lambda: len([p for p in hf_home.rglob("*.incomplete")]) == 2, 30)  # both under way
            cached = post_model(server, IRIS_ID, iris)  # within REQUEST_TIMEOUT_S, or it is a 504
            assert cached.status_code == 200, cached.text
            assert iris_class(cached.json()["values"]) == 2
            downloading = server.get("/service-resources").json()["models"]["downloading"]
            assert sorted(d["model_id"] for d in downloading) == slow_ids, downloading
            assert all(d["state"] == "downloading" for d in downloading), downloading
            timed_out = [future.result(timeout=60) for future in slow]
        for model_id, response in zip(slow_ids, timed_out):
            assert response.status_code == 504, response.text
            body = response.json()
            assert body["code"] == "504" and model_id in body["description"], body
            assert "bytes so far" in body["description"] and "download continues" in body["description"], body
            model = body["model"]
            assert (model["model_id"], model["state"]) == (model_id, "downloading"), body
            assert model["total_bytes"] == len(SLOW_BYTES[model_id.split("/")[2].split(":")[0]]), body
            assert 0 <= model["downloaded_bytes"] <= model["total_bytes"], body


@pytest.fixture(scope="module")
def bounded_cache(models_hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default model from the Hub too (its files are in the same caches), and a disk bound that holds two and a
    half iris files: a third per-request model evicts the least recently used."""
    iris_bytes = EMBEDDED_MODEL.stat().st_size
    env = {
        "HF_ENDPOINT": models_hub.url,
        "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps(
            {"model_source": "huggingface_hub", "model_args": {"repo_id": "models/default-iris", "filename": "iris.pt"}}
        ),
        "ALLOWED_MODELS": json.dumps(["huggingface/models/*"]),
        "MAX_LOADED_MODELS": "1",
        "MAX_LOADED_MODEL_BYTES": str(iris_bytes + 1000),
        "MAX_CACHED_MODEL_BYTES": str(iris_bytes * 5 // 2),
    }
    with serving(env, tmp_path_factory.mktemp("bounded-cache")) as running:
        yield running


def hub_files(server: Server, repo: str) -> list[Path]:
    """The files (blobs and snapshot links) of ``repo`` in the server's Hugging Face cache."""
    folder = Path(server.env["HF_HOME"]) / "hub" / f"models--{repo.replace('/', '--')}"
    return sorted(p for sub in ("blobs", "snapshots") for p in (folder / sub).rglob("*") if not p.is_dir())


def test_disk_cache_bound_evicts_least_recently_used(bounded_cache: Server):
    """S2b: nothing bounded the disk of per-request models: a client cycling through allowed ids filled it."""
    server = bounded_cache
    iris_bytes = EMBEDDED_MODEL.stat().st_size
    alpha, beta, gamma = (f"huggingface/models/{name}:{name}.pt" for name in CACHE_BOUND_MODELS)
    for model_id in (alpha, beta, gamma):
        assert post_model(server, model_id, {"dtype": 2, "shape": [1, 4], "values": IRIS}).status_code == 200
    assert hub_files(server, "models/alpha") == []  # blob and snapshot link gone
    assert len(hub_files(server, "models/beta")) == 2 and len(hub_files(server, "models/gamma")) == 2
    cached = {entry["model_id"] for entry in server.get("/service-resources").json()["models"]["cached"]}
    assert alpha not in cached and {beta, gamma} <= cached
    evicted = [line for line in server.log().splitlines() if "stage=evict" in line]
    assert len(evicted) == 1 and f"model_id={alpha} bytes={iris_bytes} " in evicted[0], evicted
    assert "[INFO]" in evicted[0] and "reason=MAX_CACHED_MODEL_BYTES" in evicted[0], evicted
    # Evicted from disk is not refused: the next request downloads it again (evicting beta, now the oldest).
    answer = post_model(server, alpha, {"dtype": 2, "shape": [1, 4], "values": IRIS})
    assert answer.status_code == 200 and iris_class(answer.json()["values"]) == 2
    assert len(hub_files(server, "models/alpha")) == 2 and hub_files(server, "models/beta") == []
    cached = {entry["model_id"] for entry in server.get("/service-resources").json()["models"]["cached"]}
    assert {alpha, gamma} <= cached and beta not in cached
    # The start-up model's files are neither counted nor evicted, and it answers as before.
    assert len(hub_files(server, "models/default-iris")) == 2
    assert iris_class(post_data(server, {"dtype": "double", "values": [IRIS]})["values"]) == 2


def test_zip_bombs_refused_before_loading(bounded_cache: Server, tmp_path: Path):
    """S5: a small .pt2 whose zip directory declares far more bytes than may be loaded reached torch, which reads
    entries whole into memory (the entry count: tests/test_startup_and_workflows.py)."""
    model_id = "huggingface/models/bomb:model.pt2"
    refused = post_model(bounded_cache, model_id, {"dtype": 2, "shape": [1, 4], "values": IRIS})
    assert refused.status_code == 413 and refused.json()["code"] == "413", refused.text
    size = len(zip_bomb(tmp_path / "same.pt2"))  # the same entries: the same size
    assert refused.json()["description"] == (
        f"model {model_id}: model.pt2 is {size} bytes but its zip archive declares {BOMB_BYTES + 3} bytes "
        f"uncompressed, more than MAX_LOADED_MODEL_BYTES ({EMBEDDED_MODEL.stat().st_size + 1000}) and the file's own "
        "size allow; refused before loading it"
    )
    assert bounded_cache.get("/readyz").status_code == 200  # no crash
    # The start-up model: one line naming the sizes, and the service does not start.
    bomb = tmp_path / "bomb.pt2"
    zip_bomb(bomb)
    code, output = run_to_exit(
        {"CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_path": str(bomb)}), "MAX_LOADED_MODEL_BYTES": "1000000"},
        tmp_path,
    )
    assert code != 0
    line = next(line for line in output.splitlines() if "declares" in line)
    assert f"is {bomb.stat().st_size} bytes but its zip archive declares {BOMB_BYTES + 3} bytes uncompressed" in line
    assert "MAX_LOADED_MODEL_BYTES (1000000)" in line and "Traceback" not in output
