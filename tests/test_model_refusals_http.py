"""What a real ``bentoml serve`` answers when a model cannot be served, with the loopback Hub (tests/hubserver.py)
and the unmodified huggingface_hub client: a repository the Hub refuses is refused even when a copy is cached,
a file that is no model is named as such without the server's paths, ids clients invent leave /info and /metrics
bounded, and the served model named by its own id is served (explorer findings F-b, F-c, F-e, F-f)."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from eth_abi import encode
from huggingface_hub import hf_hub_download

from core.model_ids import encode_model_id_abi, parse_model_id
from public.infernet_ml_layouts import encode_vector_v1, encode_vector_v2
from tests.fixtures.hub import TOKEN
from tests.fixtures.server import Server, run_to_exit, serving
from tests.hubserver import Hub, Repo, make_repo
from tests.models import Affine, save

pytestmark = pytest.mark.slow

ROW = [1.0, 2.0, 3.0, 4.0]
GARBAGE = bytes(range(7, 256)) * 20  # first byte 0x07: neither a zip archive nor a pickle
MAX_BYTES = 1_000_000  # the refusal server's MAX_LOADED_MODEL_BYTES
BIG_BYTES = 2 * MAX_BYTES


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    root = tmp_path_factory.mktemp("refusal-models")
    default = save(Affine(4, 3), root / "default.torch", "torchscript", torch.zeros(1, 4)).read_bytes()
    other = save(Affine(4, 2), root / "other.torch", "torchscript", torch.zeros(1, 4)).read_bytes()
    same = save(Same(), root / "same.torch", "torchscript", torch.zeros(1, 4)).read_bytes()
    return {"default": default, "other": other, "truncated": default[: len(default) // 2], "same": same}


class Same(torch.nn.Module):
    """No parameters at all: its input back, in its own dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0


@pytest.fixture(scope="module")
def refusals_hub(files: dict[str, bytes], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("refusal-hub")
    repos = {
        "dflt/lin": Repo(make_repo(root / "dflt", [{"model.torch": files["default"]}])),
        "org/private": Repo(make_repo(root / "private", [{"model.torch": files["other"]}]), "private"),
        "org/broken": Repo(
            make_repo(
                root / "broken",
                [{"garbage.torch": GARBAGE, "truncated.torch": files["truncated"], "garbage.onnx": GARBAGE}],
            )
        ),
        "org/lin": Repo(make_repo(root / "lin", [{"model.torch": files["other"], "same.torch": files["same"]}])),
        "org/big": Repo(make_repo(root / "big", [{"big.torch": b"\x80" + bytes(BIG_BYTES)}])),
        # Published: tag v1 and main (a README change later) hold ``same``; a pull request (refs/pr/1, which anyone
        # may open on a public repo) replaces it with ``other``. org/pr-chosen is the same, its PR sha allowed.
        **{
            f"org/{name}": Repo(
                make_repo(
                    root / name,
                    [{"model.torch": files["same"]}, {"README.md": b"v2\n"}],
                    {"v1": 0},
                    pull_request={"model.torch": files["other"]},
                )
            )
            for name in ("pr", "pr-chosen")
        },
    }
    server = Hub(repos, frozenset({TOKEN})).start()
    try:
        yield server
    finally:
        server.stop()


def warm_cache(hub: Hub, tmp: Path, repo: str) -> Path:
    """``repo``'s model.torch in the server's Hugging Face cache (HF_HOME, tests/fixtures/server.py), downloaded
    with the token: what an earlier run with access leaves behind."""
    return Path(hf_hub_download(repo, "model.torch", cache_dir=tmp / "hf-home" / "hub", endpoint=hub.url, token=TOKEN))


@pytest.fixture(scope="module")
def server(refusals_hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("refusal-server")
    warm_cache(refusals_hub, tmp, "org/private")
    env = {
        "HF_ENDPOINT": refusals_hub.url,
        "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_name": "dflt/lin"}),
        # Not the default's org; org/pr-chosen's pull request commit spelled out: the operator chose it.
        "ALLOWED_MODELS": json.dumps(["huggingface/org/*", f"huggingface/org/pr-chosen/{pr_commit(refusals_hub)}"]),
        "MAX_LOADED_MODEL_BYTES": str(MAX_BYTES),
    }
    with serving(env, tmp) as running:
        yield running


def pr_commit(hub: Hub, repo: str = "org/pr-chosen", ref: str = "refs/pr/1") -> str:
    git_dir = hub.repos[repo].git_dir
    return (
        subprocess.run(["git", "-C", str(git_dir), "rev-parse", ref], check=True, capture_output=True)
        .stdout.decode()
        .strip()
    )


def v2_request(model_id: str) -> dict:
    return {"source": 1, "data": {"model_id": model_id, "input": {"dtype": 2, "shape": [1, 4], "values": ROW}}}


def test_startup_refuses_a_cached_model_the_hub_refuses(refusals_hub: Hub, tmp_path: Path):
    # F-b: hf_hub_download serves its cached copy whatever the Hub answers (here 401 RepoNotFound: no token).
    warm_cache(refusals_hub, tmp_path, "org/private")
    env = {"HF_ENDPOINT": refusals_hub.url, "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_name": "org/private"})}
    status, output = run_to_exit(env, tmp_path)
    assert status == 2, output[-2000:]
    [line] = [line for line in output.splitlines() if "start-up failed" in line]
    assert "model source=huggingface repo=org/private file=model.torch: repository not found, or private" in line
    assert TOKEN not in output


def test_a_cached_private_model_is_refused_to_a_request_without_access(server: Server):
    response = server.post(v2_request("huggingface/org/private:model.torch"))
    assert response.status_code == 404, response.text
    assert "repository not found, or private and not visible to this token" in response.json()["description"]


def test_the_served_model_named_by_its_id_is_served(server: Server):
    expected = Affine(4, 3)(torch.tensor([ROW])).tolist()
    for model_id in ("huggingface/dflt/lin:model.torch", "huggingface/dflt/lin"):
        probe = server.get("/service-resources", params={"model_id": model_id}).json()
        assert probe == {"supported": True}, model_id
        response = server.post(v2_request(model_id))
        assert response.status_code == 200, (model_id, response.text)
        assert response.json()["values"] == pytest.approx([v for row in expected for v in row])
    v1 = {"model_source": 2, "load_args": {"repo_id": "dflt/lin", "filename": "model.torch"}}
    response = server.post({"source": 1, "data": {**v1, "input": {"dtype": "float", "shape": [1, 4], "values": [ROW]}}})
    assert response.status_code == 200, response.text
    assert response.json()["values"] == pytest.approx(expected[0])  # 1.x answers flat values
    assert server.get("/info").json()["models"]["loaded"] == []  # the default answered; nothing loaded twice


def test_embedded_model_named_by_its_local_id(iris_server: Server):
    served = iris_server.get("/service-resources").json()["compute_capability"][0]["models"][0]["repo_id"]
    assert served == "local/local/iris:model.torch"
    default = iris_server.post({"source": 1, "data": {"dtype": 2, "shape": [1, 4], "values": ROW}})
    named = iris_server.post(v2_request(served))
    assert named.status_code == 200, named.text
    assert named.json() == default.json()
    other = iris_server.post(v2_request("local/local/other:model.torch"))
    assert other.status_code == 400 and "cannot name a file on the server" in other.json()["description"]


def test_a_file_that_is_no_model_is_named_without_server_paths(server: Server, files: dict[str, bytes]):
    for name, data, reason in (
        ("garbage.torch", GARBAGE, "not a TorchScript, torch.export or pickle file"),
        ("truncated.torch", files["truncated"], "a damaged zip archive"),
        # K6: an ONNX file's reason, without the start-up line's "source=local repo=garbage.onnx" prefix.
        ("garbage.onnx", GARBAGE, "cannot load garbage.onnx as ONNX: "),
    ):
        model_id = f"huggingface/org/broken:{name}"
        response = server.post(v2_request(model_id))
        assert response.status_code == 422, response.text  # not 403 "a pickle"
        description = response.json()["description"]
        assert description.startswith(f"model {model_id} does not load: {reason}"), description
        assert str(Path(server.env["HF_HOME"]).parent) not in description and "source=local" not in description
        assert hashlib.sha256(data).hexdigest() not in description and "is a pickle" not in description


def test_ids_clients_invent_keep_info_and_metrics_bounded(server: Server, refusals_hub: Hub):
    for i in range(30):
        response = server.post(v2_request(f"huggingface/org/invented{i}:model.torch"))
        assert response.status_code == 404, response.text
    asked = len([r for r in refusals_hub.log if "/org/again/" in r.path])
    for _ in range(4):
        assert server.post(v2_request("huggingface/org/again:model.torch")).status_code == 404
    assert len([r for r in refusals_hub.log if "/org/again/" in r.path]) == asked + 1  # remembered as missing
    counts = server.get("/info").json()["models"]["counts"]
    assert not [key for key in counts if "invented" in key or "again" in key], counts
    assert counts["other"]["failures"] >= 31
    assert "invented" not in server.get("/metrics").text
    probe = server.get("/service-resources", params={"model_id": "huggingface/org/again:model.torch"}).json()
    assert probe == {"supported": False, "error": "not found"}


# K10: the operator's precision and cast_inputs tune the default model; a model a client names runs with the defaults.


@pytest.fixture(scope="module")
def tuned_server(refusals_hub: Hub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "HF_ENDPOINT": refusals_hub.url,
        "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps(
            {"model_name": "dflt/lin", "precision": "float16", "cast_inputs": False}
        ),
        "ALLOWED_MODELS": json.dumps(["huggingface/org/*"]),
    }
    with serving(env, tmp_path_factory.mktemp("tuned-server")) as running:
        yield running


def test_per_request_models_do_not_take_the_defaults_precision_nor_cast_inputs(tuned_server: Server):
    # No floating parameters: a precision cannot apply to it (before: 422 "does not load: precision: ...").
    same = {"model_id": "huggingface/org/lin:same.torch", "input": {"dtype": 1, "shape": [1, 4], "values": ROW}}
    same["input"]["values"] = [70000.0, 2.0, 3.0, 4.0]
    response = tuned_server.post({"source": 1, "data": same})
    assert response.status_code == 200, response.text
    assert response.json()["values"] == [70000.0, 2.0, 3.0, 4.0]
    # A float32 model in its own precision (before: float16, 70000 answered null) and with long inputs cast to float
    # as by default (before: cast_inputs false reached the Linear as long, and it failed).
    expected = Affine(4, 2)(torch.tensor([[70000.0, 2.0, 3.0, 4.0]])).tolist()[0]
    for dtype in (1, 8):  # float, long
        data = {"model_id": "huggingface/org/lin:model.torch", "input": {"dtype": dtype, "shape": [1, 4]}}
        data["input"]["values"] = [70000, 2, 3, 4]
        response = tuned_server.post({"source": 1, "data": data})
        assert response.status_code == 200, response.text
        assert response.json()["values"] == pytest.approx(expected), dtype
    # The default model keeps the operator's choices: it runs in float16, where 70000 does not fit.
    response = tuned_server.post({"source": 1, "data": {"dtype": "float", "values": [[70000.0, 2.0, 3.0, 4.0]]}})
    assert response.status_code == 400, response.text


def test_an_unreachable_hub_is_a_502_that_keeps_its_address_from_the_client(tmp_path: Path):
    # The operator's HF_ENDPOINT (often an internal mirror) was named to anonymous clients in the 502 (explorer
    # kinds: the F-e fix hid paths, not URLs). The operator's log keeps it.
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        hub = f"http://127.0.0.1:{closed.getsockname()[1]}"
    env = {"HF_ENDPOINT": hub, "ALLOWED_MODELS": json.dumps(["huggingface/org/*"])}
    with serving(env, tmp_path) as running:
        response = running.post(v2_request("huggingface/org/lin:model.torch"))
        # S7: a version no pattern spells out cannot be checked against the Hub's branches and tags: refused.
        versioned = running.post(v2_request("huggingface/org/lin/v1:model.torch"))
        log = running.log()
    assert response.status_code == 502, response.text
    description = response.json()["description"]
    assert description.startswith("model huggingface/org/lin:model.torch: ")
    assert "the Hub at (its address) cannot be reached" in description
    assert "127.0.0.1" not in response.text
    assert hub in log
    assert versioned.status_code == 502, versioned.text
    description = versioned.json()["description"]
    assert "cannot be asked whether version v1 is published" in description
    assert "add huggingface/org/lin/v1 (the version written out) to ALLOWED_MODELS" in description
    assert "127.0.0.1" not in versioned.text


def test_a_model_over_max_loaded_model_bytes_is_refused_before_its_download(server: Server, refusals_hub: Hub):
    """The Hub's HEAD states the size: 413 without a GET of the file, and nothing of it in the cache."""
    before = refusals_hub.downloads("big.torch")
    response = server.post(v2_request("huggingface/org/big:big.torch"))
    assert response.status_code == 413, response.text
    assert response.json()["description"] == (
        f"model huggingface/org/big:big.torch is {BIG_BYTES + 1} bytes, more than MAX_LOADED_MODEL_BYTES "
        f"({MAX_BYTES}) allows"
    )
    assert refusals_hub.downloads("big.torch") == before
    hf_home = Path(server.env["HF_HOME"])
    assert not [p for p in hf_home.rglob("*") if p.is_file() and "big" in str(p) and "blobs" in p.parts]


def test_embedded_model_named_by_its_id_is_served_in_every_layout(iris_server: Server):
    # C1/C6: the 1.x fields (a LOCAL source included) and the CHAIN layouts were refused 400 ("cannot name a file on
    # the server") even when they named the served model by the id /service-resources advertises for it.
    served = parse_model_id("local/local/iris:model.torch", allow_local=True)
    vector_v1 = encode_vector_v1("float", [1, 4], ROW)
    vector_v2 = encode_vector_v2("float", [1, 4], ROW)
    pairs = []
    for source in (0, "LOCAL"):
        input_v1 = {"dtype": "float", "shape": [1, 4], "values": [ROW]}
        named = {"model_source": source, "load_args": {"repo_id": "local/iris", "filename": "model.torch"}}
        pairs.append(({"source": 1, "data": {"input": input_v1}}, {"source": 1, "data": {**named, "input": input_v1}}))
    v1_chain = ["uint8", "string", "string", "string", "bytes"]
    pairs.append(
        tuple(
            {"source": 0, "destination": 0, "data": encode(v1_chain, [0, repo, file, "", vector_v1]).hex()}
            for repo, file in (("", ""), ("local/iris", "model.torch"))
        )
    )
    pairs.append(
        tuple(
            {"source": 0, "destination": 0, "data": encode(["bytes", "bytes"], [blob, vector_v2]).hex()}
            for blob in (b"", encode_model_id_abi(served))
        )
    )
    for default, named in pairs:
        expected = iris_server.post(default)
        assert expected.status_code == 200, expected.text
        response = iris_server.post(named)
        answer = {key: value for key, value in response.json().items() if key != "raw_input"}  # 1.x echoes its input
        assert (response.status_code, answer) == (200, {k: v for k, v in expected.json().items() if k != "raw_input"})
    # Another local id is still refused, in every layout.
    other = {"model_source": 0, "load_args": {"repo_id": "local/other", "filename": "model.torch"}}
    response = iris_server.post({"source": 1, "data": {**other, "input": {"dtype": "float", "values": [ROW]}}})
    assert response.status_code == 400 and "cannot name a file on the server" in response.json()["description"]


def test_every_version_means_published_versions_not_a_pull_requests_commit(server: Server, refusals_hub: Hub):
    # S7: "huggingface/org/*" allowed every sha of org/pr, including a commit only its refs/pr/1 reaches: anyone
    # may open a pull request on a public repo, so anyone could have their weights served.
    pr_sha = pr_commit(refusals_hub, "org/pr")
    # /service-resources?model_id= gives the answer a request gets (it said supported), without a download.
    pr_id = f"huggingface/org/pr/{pr_sha}:model.torch"
    probe = server.get("/service-resources", params={"model_id": pr_id}).json()
    assert pr_id not in server.get("/info").json()["models"].get("failed", {})  # asked, not loaded
    response = server.post(v2_request(pr_id))
    assert response.status_code == 403, response.text
    description = response.json()["description"]
    assert probe == {"supported": False, "error": description}
    assert f"version {pr_sha} is not a branch, a tag or the commit of one" in description
    assert f"add huggingface/org/pr/{pr_sha} (the version written out) to ALLOWED_MODELS" in description
    assert refusals_hub.url not in description
    # Published versions stay allowed: a tag, a branch, the commit a branch points at (and no version at all).
    for version in ("/v1", "/main", "/" + pr_commit(refusals_hub, "org/pr", "refs/heads/main"), ""):
        probe = server.get("/service-resources", params={"model_id": f"huggingface/org/pr{version}:model.torch"})
        assert probe.json() == {"supported": True}, version
        response = server.post(v2_request(f"huggingface/org/pr{version}:model.torch"))
        assert response.status_code == 200, (version, response.text)
        assert response.json()["values"] == ROW, version
    # A pattern that spells the pull request's commit out: the operator chose it.
    response = server.post(v2_request(f"huggingface/org/pr-chosen/{pr_commit(refusals_hub)}:model.torch"))
    assert response.status_code == 200, response.text
    assert response.json()["values"] == pytest.approx(Affine(4, 2)(torch.tensor([ROW])).tolist()[0])
