"""deploy/kserve: the ServingRuntime and InferenceService checked field by field against the KServe SDK's own types
(unknown fields are errors; run in .venv-kserve, see tests/kserve_support.py), the runtime's container validated as
Kubernetes, the two resources wired to each other, and the probe path answered by a real server."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from core.settings import ServiceSettings
from tests.kserve_support import run_in_kserve_venv
from tests.test_deploy_k8s import KUBERNETES_VERSION

MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "kserve" / "inferenceservice.yaml"


@pytest.fixture(scope="module")
def resources() -> dict[str, dict]:
    return {document["kind"]: document for document in yaml.safe_load_all(MANIFEST.read_text())}


def runtime_container(resources: dict[str, dict]) -> dict:
    (container,) = resources["ServingRuntime"]["spec"]["containers"]
    return container


def test_every_field_is_one_kserve_knows():
    assert run_in_kserve_venv("validate", str(MANIFEST)) == []


def test_the_kserve_check_catches_a_misspelt_field(tmp_path):
    misspelt = tmp_path / "misspelt.yaml"
    misspelt.write_text(MANIFEST.read_text().replace("protocolVersion:", "protocolVersoin:"))
    assert run_in_kserve_venv("validate", str(misspelt)) == [
        "InferenceService.spec.predictor.model.protocolVersoin: unknown field of V1beta1ModelSpec"
    ]


def test_the_runtime_container_is_valid_kubernetes(resources):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "check"},
        "spec": {"containers": [runtime_container(resources)]},
    }
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_the_inference_service_runs_the_runtime_over_v2(resources):
    runtime, service = resources["ServingRuntime"], resources["InferenceService"]
    model = service["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    container = runtime_container(resources)
    assert container["image"] == "infernet-torch-service:latest"
    assert container["ports"] == [{"containerPort": 3000, "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 3000}


def test_the_model_is_named_after_the_inference_service(resources):
    env = {var["name"]: var["value"] for var in runtime_container(resources)["env"]}
    name = resources["InferenceService"]["metadata"]["name"]
    filled = {key: value.replace("{{.Name}}", name) for key, value in env.items()}  # as KServe fills it in
    assert ServiceSettings.from_env(filled).model_name == name


@pytest.mark.slow
def test_the_service_answers_the_readiness_path(iris_server, resources):
    response = iris_server.get(runtime_container(resources)["readinessProbe"]["httpGet"]["path"])
    assert response.status_code == 200 and response.json() == {"ready": True}
