"""The OCI image itself: built once per session the way ``make image`` builds it (scripts/image.py: ``bentoml build``
then ``bentoml containerize``), started with podman, and checked over HTTP as a user of the image would.

Stand-ins (scripts/image.py prints a ``stand-in:`` line for each one it uses; on a machine that reaches Docker Hub
and the PyTorch index neither is used). These machines cannot pull from image registries nor reach
download.pytorch.org (no route, no DNS), so two build steps cannot run as on a user's machine:

1. the base image ``python:3.11-slim`` cannot be pulled: an equivalent is made from Debian 12's own packages with
   debootstrap (Python 3.11, pip, CA certificates; the official image is Debian 12 too) and imported under that name;
2. the PyTorch CPU index cannot be reached: torch's CPU wheel (the same ``torch==2.13.0+cpu``) comes from the local
   wheel folder pip is configured with, mounted into the build, in place of the index argument.

Everything else is real: BentoML's Dockerfile from our bentofile.yaml and template, PyPI for every other package,
``bentoml containerize`` with the podman backend, and the containers below. On these machines podman's default OCI
runtime (crun) refuses the VM's hybrid cgroups and its ``setrlimit``, so containers run with runc and explicit
ulimits (``RUN_FLAGS``); a user's podman or docker needs neither.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from eth_abi import decode

from tests.fixtures.hub import IRIS
from tests.fixtures.server import free_port
from tests.hubserver import Hub

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
IMAGE = "localhost/infernet-torch-service:test"
# Measured 2026-11-30 (docs/deploy.md "Image size"): 1.37 GB on the stand-in base, 1.45 GB with onnxruntime;
# BentoML's default made 1.88 GB without it.
MAX_IMAGE_BYTES = 1_520_000_000
IMAGE_SIZE = pytest.StashKey[str]()
BUILD_TIMEOUT_S = 2400  # a cold build on a busy 2-core machine: base image, ~1 GB of wheels
READY_TIMEOUT_S = 240
STOP_GRACE_S = 60
UID = 1034  # BentoML's user in the image, `bentoml`
RUN_FLAGS = (["--runtime", "runc"] if shutil.which("runc") else []) + [
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
]
IRIS_VIRGINICA = {"source": 1, "data": {"dtype": "double", "values": [[1.0380048, 0.5586108, 1.1037828, 1.712096]]}}
# README "Try it": the same flower, as a contract sends it (ABI int256[], 18 decimals), answered on-chain.
IRIS_CHAIN = {
    "source": 0,
    "destination": 0,
    "data": "0000000000000000000000000000000000000000000000000000000000000020"
    "0000000000000000000000000000000000000000000000000000000000000004"
    "0000000000000000000000000000000000000000000000000e67bbddb3268000"
    "0000000000000000000000000000000000000000000000007c095901db25fc00"
    "000000000000000000000000000000000000000000000000f516c9bc72fa0000"
    "0000000000000000000000000000000000000000000000017c2963dad5e00000",
}
# The workflow variables of the original service's env file (the seed README's `--env-file`), unchanged names.
WORKFLOW_CLASS = "infernet_ml.workflows.inference.torch_inference_workflow.TorchInferenceWorkflow"
EMBEDDED_IN_IMAGE = "/home/bentoml/bento/src/models/iris/model.torch"
CACHE_IN_IMAGE = "/home/bentoml/model-cache"  # MODEL_CACHE_DIR's default in the image


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


@dataclass
class Built:
    name: str
    size_bytes: int


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Built:
    if not shutil.which("podman"):
        pytest.skip("no podman to build and start the image (`make image-tools` installs it on Debian)")
    home = tmp_path_factory.mktemp("image-bentoml-home")
    done = subprocess.run(
        [sys.executable, "scripts/image.py", "--tag", IMAGE],
        cwd=REPO,
        env={**os.environ, "BENTOML_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    match = re.search(rf"^image: {re.escape(IMAGE)} size_bytes=(\d+)", done.stdout, flags=re.M)
    assert match, done.stdout[-3000:]
    built = Built(IMAGE, int(match.group(1)))
    # Shown at the end of every `make test` (tests/conftest.py), whatever pytest's output capture.
    pytestconfig.stash[IMAGE_SIZE] = (
        f"image {built.name}: {built.size_bytes / 1e6:.0f} MB (bound {MAX_IMAGE_BYTES / 1e6:.0f} MB)"
    )
    return built


@dataclass
class Container:
    name: str
    url: str

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr

    def state(self) -> dict:
        return json.loads(podman("inspect", "--format", "{{json .State}}", self.name).stdout)

    def post(self, body: object, **kwargs) -> requests.Response:
        return requests.post(f"{self.url}/service_output", json=body, timeout=60, **kwargs)

    def get(self, path: str) -> requests.Response:
        return requests.get(f"{self.url}{path}", timeout=30)


def wait_ready(container: Container) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if not container.state()["Running"]:
            raise AssertionError(f"container {container.name} exited:\n{container.logs()[-4000:]}")
        with contextlib.suppress(requests.RequestException):
            if container.get("/readyz").status_code == 200:
                return
        time.sleep(0.5)
    raise AssertionError(f"/readyz not 200 within {READY_TIMEOUT_S}s:\n{container.logs()[-4000:]}")


@contextlib.contextmanager
def running(name: str, url: str, run_args: list[str], serve_args: list[str] = ()) -> Iterator[Container]:
    """``podman run -d`` of the image; the container is removed afterwards whatever happened."""
    podman("rm", "--force", name, check=False)
    podman("run", "--detach", "--name", name, *RUN_FLAGS, *run_args, IMAGE, *serve_args)
    container = Container(name, url)
    try:
        wait_ready(container)
        yield container
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


def env_file(path: Path, values: dict[str, str]) -> Path:
    # podman/docker env files: one NAME=VALUE a line, the value taken as it is (no quotes).
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return path


def bridge_works() -> bool:
    """Whether podman's default network (and so ``-p``) works on this machine."""
    done = podman("run", "--rm", *RUN_FLAGS, "--entrypoint", "true", IMAGE, check=False, timeout=120)
    return done.returncode == 0


@pytest.fixture(scope="module")
def seed_way(image: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    """The seed README's launch line: a published port (``-p HOST:3000``), ``--env-file`` with the original's
    workflow variables (here: the model file shipped in the image), 1 HTTP worker, a small request limit."""
    tmp = tmp_path_factory.mktemp("seed-way")
    variables = {
        "CLASSIC_INF_WORKFLOW_CLASS": WORKFLOW_CLASS,
        "CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS": "[]",
        "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps(
            {"model_source": "local", "model_args": {"model_path": EMBEDDED_IN_IMAGE}}
        ),
        "TORCH_MODEL_FILE_NAME": "model.torch",
        "USE_JIT": "false",
        "USE_ARWEAVE": "false",
        "API_WORKERS": "1",
        "MAX_REQUEST_BYTES": "65536",
    }
    port = free_port()
    if bridge_works():
        network = ["--publish", f"127.0.0.1:{port}:3000"]
        serve_args: list[str] = []
    else:  # this machine's podman has no working bridge network: the same port choice on the host's network
        network = ["--network", "host"]
        serve_args = ["--port", str(port)]
    args = [*network, "--env-file", str(env_file(tmp / "classic_inference_service.env", variables))]
    with running("infernet-image-test-seed", f"http://127.0.0.1:{port}", args, serve_args) as container:
        yield container


def test_image_size_is_bounded(image: Built):
    assert image.size_bytes <= MAX_IMAGE_BYTES, f"{image.size_bytes / 1e6:.0f} MB"
    inspect = json.loads(podman("image", "inspect", image.name).stdout)[0]
    assert inspect["Config"]["User"] == "bentoml"
    assert inspect["Config"]["Entrypoint"] == ["/home/bentoml/bento/env/docker/entrypoint.sh"]


def test_image_has_no_compiler_toolchain_or_git(image: Built):
    done = podman(
        "run", "--rm", *RUN_FLAGS, "--network", "none", "--entrypoint", "sh", image.name,
        "-c", "for tool in gcc cc g++ make git; do command -v $tool; done; true",
    )  # fmt: skip
    assert done.stdout.strip() == ""


def test_serves_iris_as_the_seed_readme_runs_it(seed_way: Container):
    answer = seed_way.post(IRIS_VIRGINICA)
    assert answer.status_code == 200, answer.text
    (probabilities,) = answer.json()["values"]
    assert max(range(3), key=probabilities.__getitem__) == 2
    log = seed_way.logs()
    assert "api_workers=1" in log  # API_WORKERS from the env file
    assert f"source=local repo={EMBEDDED_IN_IMAGE}" in log


def test_chain_request(seed_way: Container):
    answer = seed_way.post(IRIS_CHAIN)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"raw_input", "processed_input", "raw_output", "processed_output", "proof"}
    (fixed_point,) = decode(["int256[]"], bytes.fromhex(body["raw_output"].removeprefix("0x")))
    assert max(range(3), key=fixed_point.__getitem__) == 2


def test_contract_errors_400_and_413(seed_way: Container):
    bad = seed_way.post({"source": 1, "data": {"dtype": "double"}})
    assert bad.status_code == 400
    assert bad.json()["code"] == "400"
    big = requests.post(
        f"{seed_way.url}/service_output",
        data=json.dumps({"source": 1, "data": {"dtype": "double", "values": [[0.0] * 20_000]}}),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )  # ~100 kB, over the env file's MAX_REQUEST_BYTES=65536
    assert big.status_code == 413
    assert big.json()["code"] == "413"


def test_metrics(seed_way: Container):
    seed_way.post(IRIS_VIRGINICA)
    metrics = seed_way.get("/metrics")
    assert metrics.status_code == 200
    assert "infernet_batch_size" in metrics.text


def test_server_runs_as_the_non_root_user(seed_way: Container):
    # PID 1 is the server itself: the entrypoint execs `bentoml serve`.
    status = podman("exec", seed_way.name, "cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)", status, flags=re.M)
    assert uids and uids.groups() == (str(UID), str(UID))
    assert "bentoml" in podman("exec", seed_way.name, "cat", "/proc/1/cmdline").stdout


def test_hub_model_is_cached_in_the_volume_and_stop_is_graceful(
    image: Built, hub: Hub, tmp_path_factory: pytest.TempPathFactory
):
    """A model from the (loopback) Hub is fetched inside the container into the mounted cache volume; a second
    container on the same volume downloads nothing. ``podman stop`` ends the first one with SIGTERM, in time."""
    tmp = tmp_path_factory.mktemp("hub-way")
    cache = tmp / "model-cache"
    cache.mkdir()
    os.chown(cache, UID, UID)  # what the docs ask of a volume: owned by the image's user
    variables = {
        "CLASSIC_INF_WORKFLOW_CLASS": WORKFLOW_CLASS,
        "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_name": "testorg/iris"}),
        "HF_ENDPOINT": hub.url,
    }
    port = free_port()
    # The Hub stand-in listens on the host's loopback only: the container shares the host's network.
    args = [
        "--network", "host", "--volume", f"{cache}:{CACHE_IN_IMAGE}",
        "--env-file", str(env_file(tmp / "hub.env", variables)),
    ]  # fmt: skip
    name = "infernet-image-test-hub"
    before = hub.downloads("model.torch")
    with running(name, f"http://127.0.0.1:{port}", args, ["--port", str(port)]) as first:
        assert first.post(IRIS_VIRGINICA).status_code == 200
        assert hub.downloads("model.torch") == before + 1
        assert "source=huggingface" in first.logs()
        started = time.monotonic()
        podman("stop", "--time", str(STOP_GRACE_S), name, timeout=STOP_GRACE_S + 60)
        stopped_s = time.monotonic() - started
        state = first.state()
        assert not state["Running"]
        # Exited by itself on SIGTERM, before podman would have sent SIGKILL (exit status 137).
        assert state["ExitCode"] == 0, f"exit {state['ExitCode']} after {stopped_s:.0f}s:\n{first.logs()[-3000:]}"
        assert stopped_s < STOP_GRACE_S
    cached = [p for p in cache.rglob("*") if p.is_file() and p.read_bytes() == IRIS]
    assert cached, sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))
    with running(name, f"http://127.0.0.1:{port}", args, ["--port", str(port)]) as second:
        answer = second.post(IRIS_VIRGINICA)
        assert answer.status_code == 200
        assert hub.downloads("model.torch") == before + 1  # the restart read the volume, the Hub sent nothing
