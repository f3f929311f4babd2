"""deploy/infernet/container.json against the Infernet node's container schema, and the service driven the way a
node drives it (single container, chained containers, errors as outputs).

The schema is written down from the node's configuration model (ritual-net/infernet-node, `src/shared/config.py`,
class `InfernetContainer`, documented by its `config.sample.json`). The node itself needs Docker and Redis, which this
machine has not; `run_job` below reproduces what its orchestrator does per job, against a real server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from core.settings import ServiceSettings, TorchSettings
from tests.fixtures.server import REPO, serving
from workflows.sources import spec_from_kwargs

ENTRY_PATH = REPO / "deploy" / "infernet" / "container.json"
BENTO_SRC = "/home/bentoml/bento/src/"  # where the image holds the repository's files (BENTO_PATH/src)


class InfernetContainer(BaseModel):
    """The node's schema of one `containers` entry (types strict: what the node would coerce, we get right)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: StrictStr
    image: StrictStr = ""
    url: StrictStr = ""
    bearer: StrictStr = ""
    port: StrictInt = 3000
    external: StrictBool = True
    gpu: StrictBool = False
    accepted_payments: dict[StrictStr, StrictInt] = {}
    allowed_ips: list[StrictStr] = []
    allowed_addresses: list[StrictStr] = []
    allowed_delegate_addresses: list[StrictStr] = []
    description: StrictStr = ""
    command: StrictStr = ""
    env: dict[StrictStr, Any] = {}
    generates_proofs: StrictBool = False
    volumes: list[StrictStr] = []


@pytest.fixture(scope="module")
def entry() -> InfernetContainer:
    return InfernetContainer.model_validate(json.loads(ENTRY_PATH.read_text()))


def test_entry_fits_the_node_schema(entry):
    assert entry.id and entry.image
    assert entry.port == 3000  # the node maps host port -> 3000/tcp inside, where `bentoml serve` listens
    assert entry.gpu is False and entry.generates_proofs is False and entry.external is True
    assert "allowed_ips" in entry.description  # the note on what allowed_ips restricts
    assert entry.allowed_ips == []
    assert entry.url == "" and entry.bearer == ""  # the node manages the container itself


def test_entry_image_is_the_bento(entry):
    bentofile = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    assert entry.image == f"{bentofile['name']}:latest"


def test_entry_env_holds_the_workflow_variables_as_strings(entry):
    env = entry.env
    assert {f"CLASSIC_INF_WORKFLOW_{name}" for name in ("CLASS", "POSITIONAL_ARGS", "KW_ARGS")} <= set(env)
    assert all(isinstance(value, str) for value in env.values())  # Docker takes environment values as strings
    settings = ServiceSettings.from_env(env)
    assert settings.workflow_class == "workflows.torch_workflow.TorchInferenceWorkflow"  # the legacy path resolves
    spec = spec_from_kwargs(settings.workflow_kwargs, TorchSettings.from_env(env))
    # The model named by the entry ships inside the image.
    assert spec.source == "local" and str(spec.path).startswith(BENTO_SRC)
    assert (REPO / str(spec.path).removeprefix(BENTO_SRC)).is_file()
    assert not [k for k, v in env.items() if "TOKEN" in k and v]  # no secret in a file meant to be committed


def node_input(source: int, destination: int, data: Any) -> dict[str, Any]:
    """The node's ContainerInput, as it serialises it (dataclasses.asdict)."""
    return {"source": source, "destination": destination, "data": data, "requires_proof": False}


def run_job(url: str, containers: int, source: int, destination: int, data: Any) -> dict[str, Any]:
    """What the node's orchestrator does for one job: call the containers in order, the previous output becoming the
    next input; store whatever JSON comes back as the output, whatever the status; non-JSON fails the job."""
    results: list[dict[str, Any]] = []
    request = node_input(source, destination if containers == 1 else 1, data)
    for index in range(containers):
        response = requests.post(f"{url}/service_output", json=request, timeout=180)
        try:
            output = response.json()
        except ValueError:
            return {"status": "failed", "result": {"container": "torch-inference", "error": response.text}}
        results.append({"container": "torch-inference", "output": output})
        last = index == containers - 2
        request = node_input(1, destination if last else 1, output)
    return {"status": "success", "intermediate_results": results[:-1], "result": results[-1]}


IRIS = {"dtype": "double", "values": [[1.0380048, 0.5586108, 1.1037828, 1.712096]]}


@pytest.fixture(scope="module")
def entry_server(entry, tmp_path_factory: pytest.TempPathFactory):
    """The service started with the entry's env (the model path mapped from the image back to the repository)."""
    env = dict(entry.env)
    env["CLASSIC_INF_WORKFLOW_KW_ARGS"] = env["CLASSIC_INF_WORKFLOW_KW_ARGS"].replace(BENTO_SRC, f"{REPO}/")
    with serving(env, tmp_path_factory.mktemp("infernet-entry")) as server:
        yield server


@pytest.mark.slow
def test_a_node_job_gets_the_iris_answer(entry_server):
    job = run_job(entry_server.url, 1, source=1, destination=1, data=IRIS)
    output = job["result"]["output"]
    assert job["status"] == "success" and output["shape"] == [1, 3]
    assert max(range(3), key=output["values"][0].__getitem__) == 2


@pytest.mark.slow
def test_an_error_is_the_job_output_with_a_string_code(entry_server):
    job = run_job(entry_server.url, 1, source=1, destination=1, data={"dtype": "double", "values": [[1.0, 2.0]]})
    assert job["status"] == "success"  # the node stores the JSON; the consumer reads output.code
    assert job["result"]["output"]["code"] == "422"


@pytest.mark.slow
def test_chained_containers_pass_tensors_and_errors_along(entry_server):
    # iris -> iris: the first output (3 probabilities) is a valid tensor input; the model refuses 3 features.
    job = run_job(entry_server.url, 2, source=1, destination=1, data=IRIS)
    assert job["intermediate_results"][0]["output"]["dtype"] == "float"
    assert job["result"]["output"]["code"] == "422"
    # An error object handed on as data is refused in its turn, so it stays visible at the end of the chain.
    job = run_job(entry_server.url, 2, source=1, destination=1, data={"dtype": "double", "values": [[1.0], [2.0, 3.0]]})
    assert job["intermediate_results"][0]["output"]["code"] == "400"
    assert job["result"]["output"]["code"] == "400"


@pytest.mark.slow
def test_an_on_chain_job_gets_the_five_key_answer(entry_server):
    spec = requests.get(f"{entry_server.url}/docs.json", timeout=30).json()
    examples = spec["paths"]["/service_output"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    chain = examples["iris-chain"]["value"]
    job = run_job(entry_server.url, 1, source=0, destination=0, data=chain["data"])
    assert set(job["result"]["output"]) == {"raw_input", "processed_input", "raw_output", "processed_output", "proof"}


def test_guide_names_every_field_of_the_entry(entry):
    guide = (Path(ENTRY_PATH).parent / "README.md").read_text()
    for field in ("id", "image", "port", "gpu", "env", "allowed_ips"):
        assert f"`{field}`" in guide, field
