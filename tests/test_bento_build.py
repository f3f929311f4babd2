"""`bentoml build` of bentofile.yaml (CPU) and bentofile.cuda.yaml, checked on what it writes: the Dockerfile,
bento.yaml and the Python requirements. Docker itself is not needed (nor available here) for any of it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from core.settings import ServiceSettings, TorchSettings

REPO = Path(__file__).resolve().parents[1]
BENTOML = Path(sys.executable).with_name("bentoml")
SECRET = "hf_do_not_bake_me_0123456789"  # a token in the build environment must not reach the image

pytestmark = pytest.mark.slow


def build(tmp: Path, bentofile: str) -> Path:
    home = tmp / "bentoml-home"
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "HF_TOKEN": SECRET,
        "HUGGING_FACE_HUB_TOKEN": SECRET,
    }
    run = subprocess.run(
        [str(BENTOML), "build", "-f", bentofile, "."], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (bento,) = [p for p in (home / "bentos").glob("*/*") if p.is_dir()]
    return bento


@pytest.fixture(scope="module")
def cpu_bento(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("cpu-bento"), "bentofile.yaml")


@pytest.fixture(scope="module")
def cuda_bento(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("cuda-bento"), "bentofile.cuda.yaml")


def dockerfile(bento: Path) -> str:
    return (bento / "env" / "docker" / "Dockerfile").read_text()


def requirements(bento: Path) -> list[str]:
    lines = (bento / "env" / "python" / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def runtime_pins() -> list[str]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def image_env(bento: Path) -> dict[str, str]:
    """The bento's env defaults, each checked to be baked into the Dockerfile as ARG + ENV."""
    envs = {e["name"]: e["value"] for e in yaml.safe_load((bento / "bento.yaml").read_text())["envs"]}
    text = dockerfile(bento)
    for name, value in envs.items():
        assert f"\nARG {name}={value}\nENV {name}=${name}\n" in text, name
    return envs


def test_image_is_python_311_serving_the_bento_on_port_3000(cpu_bento):
    text = dockerfile(cpu_bento)
    assert re.search(r"^FROM python:3\.11-slim\b", text, flags=re.M)
    assert re.search(r"^EXPOSE 3000$", text, flags=re.M)
    assert re.search(r'^ENTRYPOINT \[ "/home/bentoml/bento/env/docker/entrypoint.sh" \]$', text, flags=re.M)
    # With no arguments the entry point serves the bento; the bento names the service.
    entrypoint = (cpu_bento / "env" / "docker" / "entrypoint.sh").read_text()
    assert 'set -- bentoml serve "$@" "$BENTO_PATH"' in entrypoint
    info = yaml.safe_load((cpu_bento / "bento.yaml").read_text())
    assert info["service"] == "service:InfernetService"
    assert info["entry_service"] == "infernet_torch_service"
    # A bento with a dockerfile_template keeps BentoML's docker options (the CUDA bento has an "image" section).
    assert info["docker"]["python_version"] == "3.11"
    assert "uv venv -p 3.11 /app/.venv" in dockerfile(cpu_bento)


def test_image_runs_as_a_non_root_user(cpu_bento):
    text = dockerfile(cpu_bento)
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users == ["bentoml"]
    # USER comes after every build step, so the server itself never runs as root.
    assert text.rindex("USER bentoml") > max(m.start() for m in re.finditer(r"^RUN ", text, flags=re.M))
    assert re.search(r"useradd .*-u \$BENTO_USER_UID", text) and "ARG BENTO_USER_UID=1034" in text


def test_cpu_image_pins_the_cpu_build_of_torch(cpu_bento):
    reqs = requirements(cpu_bento)
    # The index is an argument of the bento's install script, which the Dockerfile runs on requirements.txt.
    install = (cpu_bento / "env" / "python" / "install.sh").read_text()
    assert "PIP_ARGS=(--extra-index-url https://download.pytorch.org/whl/cpu)" in install
    assert "bash -euxo pipefail /home/bentoml/bento/env/python/install.sh" in dockerfile(cpu_bento)
    assert [r for r in reqs if r.startswith("torch")] == ["torch==2.13.0+cpu"]
    assert not [r for r in reqs if r.startswith("nvidia")]
    # Not locked: a lock made against PyPI would pin the CUDA wheels.
    assert not (cpu_bento / "env" / "python" / "requirements.lock.txt").exists()
    assert not [r for r in reqs if "--hash" in r]
    assert image_env(cpu_bento)["UV_INDEX_STRATEGY"] == "unsafe-best-match"


def test_cpu_image_installs_no_compiler_toolchain_or_git(cpu_bento, cuda_bento):
    # Every package is a wheel: nothing is compiled in the image, so the CPU image has no apt step at all.
    text = dockerfile(cpu_bento)
    assert "apt-get" not in text and "build-essential" not in text and " git" not in text
    assert "ENV UV_NO_CACHE=1" in text  # no uv cache left in the install layer
    assert "build-essential git" in dockerfile(cuda_bento)  # BentoML's default, left as it is for CUDA


def test_image_requirements_are_the_runtime_pins(cpu_bento, cuda_bento):
    for bento, torch in ((cpu_bento, "torch==2.13.0+cpu"), (cuda_bento, "torch==2.13.0")):
        reqs = [r for r in requirements(bento) if not r.startswith("--")]
        expected = [torch if pin.startswith("torch==") else pin for pin in runtime_pins()]
        assert sorted(set(reqs)) == sorted(set(expected)), bento


def test_cuda_image_takes_torch_from_pypi(cuda_bento):
    reqs = requirements(cuda_bento)
    assert [r for r in reqs if r.startswith("torch")] == ["torch==2.13.0"]
    assert not [r for r in reqs if "download.pytorch.org" in r]
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile(cuda_bento), flags=re.M)
    assert yaml.safe_load((cuda_bento / "bento.yaml").read_text())["labels"]["torch"] == "cuda"


def test_cuda_bentofile_differs_only_in_torch(cpu_bento, cuda_bento):
    cpu = yaml.safe_load((REPO / "bentofile.yaml").read_text())
    cuda = yaml.safe_load((REPO / "bentofile.cuda.yaml").read_text())
    for key in ("service", "include", "exclude"):
        assert cpu[key] == cuda[key], key
    # The CPU image is the official Python image as it is; the CUDA image keeps BentoML's default Debian setup.
    assert cpu["docker"] == {
        "base_image": "python:3.11-slim",
        "python_version": "3.11",
        "dockerfile_template": "deploy/image/Dockerfile.template",
    }
    assert cuda["docker"] == {"distro": "debian", "python_version": "3.11"}
    assert [e for e in cpu["envs"] if e["name"] != "UV_INDEX_STRATEGY"] == cuda["envs"]


def test_env_defaults_match_the_service_defaults(cpu_bento, cuda_bento):
    env = image_env(cpu_bento)
    service, torch = ServiceSettings(), TorchSettings()
    assert env["MAX_BATCH_SIZE"] == str(service.max_batch_size)
    assert env["MAX_LATENCY_MS"] == str(service.max_latency_ms)
    assert env["MAX_REQUEST_BYTES"] == str(service.max_request_bytes)
    assert env["API_WORKERS"] == str(service.api_workers)
    assert env["TORCH_MODEL_FILE_NAME"] == torch.model_file_name
    assert env["ARWEAVE_GATEWAY"] == torch.arweave_gateway
    assert env["USE_JIT"] == env["USE_ARWEAVE"] == "false"
    assert env["MODEL_CACHE_DIR"].startswith("/home/bentoml/")  # writable by the image's user
    # Hugging Face downloads land in the model cache too: one volume keeps them across containers.
    assert env["HF_HOME"].startswith(env["MODEL_CACHE_DIR"] + "/")
    cuda = image_env(cuda_bento)
    assert all(cuda.get(name, value) == value for name, value in env.items())
    # Setting any workflow variable would replace the embedded model; they are left to the operator.
    assert not [name for name in env if name.startswith("CLASSIC_INF_")]
    # The parsed defaults start the service as the bare environment does.
    assert ServiceSettings.from_env(env) == ServiceSettings.from_env({})


def test_no_secret_reaches_the_bento(cpu_bento, cuda_bento):
    for bento in (cpu_bento, cuda_bento):
        env = image_env(bento)
        assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} & env.keys()
        assert "--mount=type=secret" not in dockerfile(bento)
        for path in bento.rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path


def test_bento_holds_the_service_and_the_embedded_model_only(cpu_bento):
    files = {p.relative_to(cpu_bento / "src").as_posix() for p in (cpu_bento / "src").rglob("*") if p.is_file()}
    assert {
        "service.py",
        "public/app.py",
        "runner/batch_runner.py",
        "core/bentoml_seam.py",
        "workflows/torch_workflow.py",
        "models/iris/model.torch",
    } <= files
    assert not [f for f in files if f.startswith(("tests/", ".venv/", "node_modules/")) or "__pycache__" in f]
    assert (cpu_bento / "src" / "models" / "iris" / "model.torch").read_bytes() == (
        REPO / "models" / "iris" / "model.torch"
    ).read_bytes()


def test_bento_openapi_document_describes_service_output(cpu_bento):
    spec = yaml.safe_load((cpu_bento / "apis" / "openapi.yaml").read_text())
    operation = spec["paths"]["/service_output"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/InfernetInput")
