"""deploy/k8s: every manifest validated against the Kubernetes API schemas (kubernetes-validate, strict: unknown
fields are errors), the pieces wired to each other, and the probe and metrics paths answered by a real server."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from core.settings import ServiceSettings, TorchSettings

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33.0"


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    files = [*load("kustomization.yaml")["resources"], "secret.example.yaml"]
    return {load(name)["kind"]: load(name) for name in files}


@pytest.mark.parametrize(
    "name", ["configmap.yaml", "deployment.yaml", "service.yaml", "hpa.yaml", "secret.example.yaml"]
)
def test_manifest_is_valid_kubernetes(name):
    kubernetes_validate.validate(load(name), KUBERNETES_VERSION, strict=True)


def test_the_validator_catches_a_misspelt_probe():
    deployment = load("deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/readyz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_applies_everything_but_the_secret():
    resources = load("kustomization.yaml")["resources"]
    assert sorted(resources) == ["configmap.yaml", "deployment.yaml", "hpa.yaml", "service.yaml"]


def container(manifests: dict[str, dict]) -> dict:
    (service,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return service


def test_probes_port_and_resources(manifests):
    service = container(manifests)
    assert service["ports"] == [{"name": "http", "containerPort": 3000}]
    assert service["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert service["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert service["startupProbe"]["httpGet"]["path"] == "/livez"
    assert {"cpu", "memory"} <= set(service["resources"]["requests"])
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1034


def test_env_comes_from_the_configmap_and_the_token_from_the_secret(manifests):
    service = container(manifests)
    assert service["envFrom"] == [{"configMapRef": {"name": manifests["ConfigMap"]["metadata"]["name"]}}]
    assert [token["name"] for token in service["env"]] == ["HUGGING_FACE_HUB_TOKEN", "BEARER_TOKEN"]
    for token in service["env"]:
        ref = token["valueFrom"]["secretKeyRef"]
        assert token["name"] == ref["key"] and ref["optional"] is True
        assert ref["name"] == manifests["Secret"]["metadata"]["name"]
        assert ref["key"] in manifests["Secret"]["stringData"] and manifests["Secret"]["stringData"][ref["key"]] == ""
    assert not [key for key in manifests["ConfigMap"]["data"] if "TOKEN" in key]
    # The example Secret, applied as is, leaves the routes open rather than failing the start-up.
    assert ServiceSettings.from_env(manifests["Secret"]["stringData"]).bearer_token is None


# Seconds the processes take to exit after requests still running got their 503 (tests/test_shutdown.py measures
# ~1.5 s on a busy 2-core machine); the grace period must cover both before Kubernetes sends SIGKILL.
EXIT_MARGIN_S = 5


def test_grace_period_exceeds_the_shutdown_bound(manifests):
    grace_s = manifests["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    configured = ServiceSettings.from_env(manifests["ConfigMap"]["data"]).shutdown_timeout_s
    assert grace_s >= configured + EXIT_MARGIN_S
    assert grace_s >= ServiceSettings().shutdown_timeout_s + EXIT_MARGIN_S


def test_configmap_is_a_valid_service_environment(manifests):
    env = manifests["ConfigMap"]["data"]
    assert all(isinstance(value, str) for value in env.values())
    settings = ServiceSettings.from_env(env)
    assert settings.workflow_class == "workflows.torch_workflow.TorchInferenceWorkflow"
    assert settings.workflow_kwargs["model_path"].startswith("/home/bentoml/bento/src/")
    mount = container(manifests)["volumeMounts"][0]["mountPath"]
    assert str(TorchSettings.from_env(env).model_cache_dir) == mount


def test_service_and_autoscaler_point_at_the_deployment(manifests):
    deployment, service, hpa = manifests["Deployment"], manifests["Service"], manifests["HorizontalPodAutoscaler"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels
    assert service["spec"]["selector"] == labels
    assert service["spec"]["ports"] == [{"name": "http", "port": 3000, "targetPort": "http"}]
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics" and annotations["prometheus.io/port"] == "3000"


@pytest.mark.slow
def test_the_service_answers_the_paths_the_manifests_name(iris_server, manifests):
    service = container(manifests)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert iris_server.get(service[probe]["httpGet"]["path"]).status_code == 200, probe
    metrics = iris_server.get(
        manifests["Deployment"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"]
    )
    assert metrics.status_code == 200 and "bentoml_service_request_total" in metrics.text
