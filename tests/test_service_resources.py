"""GET /service-resources answers as Infernet nodes expect, on a real server.

A node's GET /resources fetches `/service-resources` (or `/service-resources?model_id=X`) from each container,
drops any that fail or answer non-JSON, and returns the rest keyed by container id (ritual-net/infernet-node,
`Orchestrator.collect_service_resources`). The node documents the answer as `ContainerToResourcesMap` /
`ContainerToModelSupportMap` (its openapi.yaml); Ritual's services build it with infernet-ml's `ServiceResources`
(`utils/spec.py`). Both are written down below, as the models the answer must fit.
"""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

pytestmark = pytest.mark.slow


class MLModel(BaseModel):  # the node's MLModel: owner required
    owner: StrictStr
    name: StrictStr | None = None
    repository: StrictStr | None = None
    storage: StrictStr | None = None
    files: list[StrictStr] = []
    version: StrictStr | None = None
    ml_type: StrictStr | None = None


class MLComputeCapability(BaseModel):
    id: Literal["ml"]
    type: Literal["torch"]
    task: list[StrictStr]
    models: list[MLModel] = []
    cached_models: list[MLModel] = []
    inference_engine: StrictStr | None = None
    inference_engine_version: StrictStr | None = None


class DiskInfo(BaseModel):
    filesystem: StrictStr
    mount_point: StrictStr
    size: StrictInt
    used: StrictInt
    available: StrictInt


class CPUInfo(BaseModel):
    model: StrictStr
    architecture: StrictStr
    byte_order: StrictStr
    vendor_id: StrictStr
    num_cores: StrictInt
    cores: list[object]  # the node says strings, infernet-ml says core objects: an empty list fits both


class BaseHardware(BaseModel):
    capability_id: Literal["base"]
    os_info: dict[str, StrictStr]
    cpu_info: CPUInfo
    disk_info: list[DiskInfo]


class ServiceResources(BaseModel):
    model_config = ConfigDict(extra="allow")

    version: StrictStr
    service_id: StrictStr
    compute_capability: list[MLComputeCapability]
    hardware_capabilities: list[dict]


class ModelSupport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    supported: StrictBool
    error: StrictStr | None = None


def collect(server, model_id: str | None = None) -> dict:
    """What the node does with one container: GET, fail on a non-2xx status, parse JSON as a dict."""
    response = server.get("/service-resources" + (f"?model_id={model_id}" if model_id else ""))
    response.raise_for_status()
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert isinstance(body, dict)
    return body


def test_resources_fit_the_node_and_infernet_ml_models(iris_server):
    answer = ServiceResources.model_validate(collect(iris_server))
    assert answer.service_id == "infernet-torch-service"
    (compute,) = answer.compute_capability
    (model,) = compute.models
    assert (model.storage, model.files, model.ml_type) == ("local", ["model.torch"], "torch")
    assert compute.inference_engine == "torch" and compute.inference_engine_version.startswith("2.13.0")
    base = BaseHardware.model_validate(answer.hardware_capabilities[0])
    assert base.disk_info and base.cpu_info.num_cores >= 1
    # The model reported is the one /info describes.
    info = iris_server.get("/info").json()
    assert collect(iris_server)["compute_capability"][0]["models"][0]["sha256"] == info["model"]["sha256"]


def test_model_query_says_whether_this_container_serves_the_model(iris_server):
    model = collect(iris_server)["compute_capability"][0]["models"][0]
    sha256 = iris_server.get("/info").json()["model"]["sha256"]
    for served in (model["repo_id"], model["repo_id"].partition(":")[0], model["repository"], sha256):
        assert ModelSupport.model_validate(collect(iris_server, served)).supported is True, served
    for other in ("huggingface/Ritual-Net/iris-classification:iris.torch", f"{model['repo_id']}x", "0" * 64):
        assert ModelSupport.model_validate(collect(iris_server, other)).supported is False, other
    assert collect(iris_server, f"{model['repo_id'].partition(':')[0]}:other.torch")["supported"] is False


def test_every_name_the_model_query_supports_is_served_by_a_request_naming_it(iris_server):
    # Explorer F12: the probe said supported for the file name, sha256 and path, and a request naming them got 400
    # "malformed model id"; a node that trusts the probe sends a job that fails. Contract §5: they are the default call.
    model = collect(iris_server)["compute_capability"][0]["models"][0]
    sha256 = iris_server.get("/info").json()["model"]["sha256"]
    row = {"dtype": 2, "shape": [1, 4], "values": [1.0380048, 0.5586108, 1.1037828, 1.712096]}
    expected = iris_server.post({"source": 1, "data": {"input": row}})
    assert expected.status_code == 200, expected.text
    for served in (model["repo_id"], model["repository"], model["files"][0], sha256):
        assert collect(iris_server, served) == {"supported": True}, served
        response = iris_server.post({"source": 1, "data": {"model_id": served, "input": row}})
        assert response.status_code == 200, (served, response.text)
        assert response.json() == expected.json(), served
    # A name that is neither a model id nor the served model's stays a malformed model id, both ways.
    assert collect(iris_server, "other.torch")["supported"] is False
    refused = iris_server.post({"source": 1, "data": {"model_id": "other.torch", "input": row}})
    assert refused.status_code == 400 and "model id 'other.torch'" in refused.json()["description"], refused.text


def test_a_cached_pickle_is_unsupported_as_its_load_would_refuse_it(tmp_path):
    # /service-resources?model_id= said supported for a model its load refuses with 403: a pickle from a source not
    # trusted with pickles (neither ALLOW_PICKLED_MODELS nor an owner in ALLOWED_ARWEAVE_OWNERS). A file cached on
    # disk (verified by an earlier download, which a restart does not forget) shows its format without a download.
    import json

    import torch

    from tests.fixtures.server import serving
    from tests.test_cached_models import OWNER, arweave_entry
    from workflows.sources.cache import ModelCache

    cache = ModelCache(tmp_path / "model-cache")  # the server's MODEL_CACHE_DIR (tests/fixtures/server.py)
    model = torch.nn.Linear(4, 3)
    torch.save(model, tmp_path / "pickled.pt")
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    arweave_entry(cache, "p" * 43, "pickled", "model.pt", (tmp_path / "pickled.pt").read_bytes())
    arweave_entry(cache, "s" * 43, "scripted", "model.pt", (tmp_path / "scripted.pt").read_bytes())
    pickled, scripted = f"arweave/{OWNER}/pickled:model.pt", f"arweave/{OWNER}/scripted:model.pt"
    env = {"ALLOWED_MODELS": json.dumps([f"arweave/{OWNER}/*"])}
    with serving(env, tmp_path) as server:
        assert ModelSupport(**collect(server, pickled)) == ModelSupport(
            supported=False,
            error=f"model {pickled} is a pickle (loading it runs its uploader's code); per-request models must be "
            "TorchScript, torch.export (.pt2) without pickled entries or ONNX unless ALLOW_PICKLED_MODELS=true or "
            "the Arweave owner is in ALLOWED_ARWEAVE_OWNERS",
        )
        assert collect(server, scripted) == {"supported": True}
        listing = collect(server)
        assert [entry["model_id"] for entry in listing["models"]["cached"]] == [scripted]
        assert [m["repo_id"] for m in listing["compute_capability"][0]["cached_models"]][1:] == [scripted]
    # The owner trusted with pickles: its load would take the file, and so does the answer.
    with serving({**env, "ALLOWED_ARWEAVE_OWNERS": OWNER}, tmp_path) as server:
        assert collect(server, pickled) == {"supported": True}
        assert [entry["model_id"] for entry in collect(server)["models"]["cached"]] == [pickled, scripted]
