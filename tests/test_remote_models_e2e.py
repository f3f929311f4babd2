"""End to end: a real ``bentoml serve`` fetching its model from arlocal (published with the tool) and from the
Hub stand-in (private repo, token), answering /service_output; the second start downloads nothing; refusals stop
start-up with exit status 2 and one line."""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from core.settings import EMBEDDED_MODEL
from tests.fixtures.arlocal import PUBLISH, Arlocal, LyingGateway, new_wallet
from tests.fixtures.hub import TOKEN
from tests.fixtures.server import run_to_exit, serving
from tests.hubserver import Hub

pytestmark = pytest.mark.slow

IRIS_VECTOR = [1.0380048, 0.5586108, 1.1037828, 1.712096]  # the original service's test: class 2
IRIS_SHA = hashlib.sha256(EMBEDDED_MODEL.read_bytes()).hexdigest()


def assert_serves_iris(server, source: str) -> None:
    response = server.post({"source": 1, "data": {"dtype": "double", "values": [IRIS_VECTOR]}})
    assert response.status_code == 200, response.text
    probabilities = response.json()["values"][0]
    assert max(range(3), key=probabilities.__getitem__) == 2
    model = server.get("/info").json()["model"]
    assert model["source"] == source and model["sha256"] == IRIS_SHA


def refusal_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("start-up failed")]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def published(arlocal: Arlocal, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The iris model published to arlocal with the command-line tool; the env lines it printed."""
    wallet = tmp_path_factory.mktemp("e2e-wallet") / "wallet.json"
    arlocal.mint(new_wallet(wallet))
    done = subprocess.run(
        [
            sys.executable,
            str(PUBLISH),
            str(EMBEDDED_MODEL),
            "--wallet",
            str(wallet),
            "--repo",
            "e2e/iris",
            "--gateway",
            arlocal.url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    arlocal.mine()
    lines = [line.split("=", 1) for line in done.stdout.splitlines() if "=" in line and not line.startswith("#")]
    return {name: shlex.split(value)[0] for name, value in lines}  # the lines are shell-quoted


def test_arweave_model_served_and_cached(published: dict[str, str], gateway_proxy: LyingGateway, tmp_path: Path):
    gateway_proxy.mode = None
    env = {**published, "ARWEAVE_GATEWAY": gateway_proxy.url}  # the proxy only counts here
    assert env["USE_ARWEAVE"] == "true" and json.loads(env["CLASSIC_INF_WORKFLOW_KW_ARGS"]) == {
        "model_name": "e2e/iris"
    }
    chunks = gateway_proxy.count("/chunk/")
    with serving(env, tmp_path) as server:
        assert_serves_iris(server, "arweave")
    # One chunk, fetched once, although the arbiter and the runner both asked for the model.
    assert gateway_proxy.count("/chunk/") == chunks + 1
    headers = gateway_proxy.count("/tx/")
    with serving(env, tmp_path) as server:  # same model cache
        assert_serves_iris(server, "arweave")
    assert gateway_proxy.count("/chunk/") == chunks + 1
    assert gateway_proxy.count("/tx/") == headers


def test_private_hub_model_served_and_cached(hub: Hub, tmp_path: Path):
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_name": "testorg/private-iris"}),
    }
    downloads = hub.downloads("model.torch")
    with serving(env, tmp_path) as server:
        assert_serves_iris(server, "huggingface")
    assert hub.downloads("model.torch") == downloads + 1
    with serving(env, tmp_path) as server:  # same HF_HOME: the file is in the Hugging Face cache
        assert_serves_iris(server, "huggingface")
        assert TOKEN not in server.log()
    assert hub.downloads("model.torch") == downloads + 1


def test_owner_not_allow_listed_stops_start_up(published: dict[str, str], tmp_path: Path):
    stranger = new_wallet(tmp_path / "stranger.json")
    code, output = run_to_exit({**published, "ALLOWED_ARWEAVE_OWNERS": stranger}, tmp_path)
    assert code == 2
    line = refusal_line(output)
    assert "model source=arweave repo=e2e/iris file=model.torch: no transaction found" in line
    assert not [p for p in (tmp_path / "model-cache").rglob("*") if p.is_file() and p.parent.name != ".locks"]


def test_wrong_token_stops_start_up(hub: Hub, tmp_path: Path):
    wrong = "hf_wrong_token_0123456789"
    env = {
        "HF_ENDPOINT": hub.url,
        "HUGGING_FACE_HUB_TOKEN": wrong,
        "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_name": "testorg/private-iris"}),
    }
    code, output = run_to_exit(env, tmp_path)
    assert code == 2
    line = refusal_line(output)
    assert "model source=huggingface repo=testorg/private-iris file=model.torch: the Hub refused the token" in line
    assert wrong not in output


def test_an_unwritable_hugging_face_cache_stops_start_up_with_one_line_naming_hf_home(hub: Hub, tmp_path: Path):
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "CLASSIC_INF_WORKFLOW_KW_ARGS": json.dumps({"model_name": "testorg/private-iris"}),
    }
    assert_refused_for_an_unwritable(env, "HF_HOME", tmp_path)


def test_an_unwritable_model_cache_stops_start_up_with_one_line_naming_model_cache_dir(
    published: dict[str, str], tmp_path: Path
):
    assert_refused_for_an_unwritable(published, "MODEL_CACHE_DIR", tmp_path)


def assert_refused_for_an_unwritable(env: dict[str, str], variable: str, tmp_path: Path) -> None:
    """A cache directory that cannot be created (below a regular file, which even root cannot get past; a read-only
    volume is the same) said neither the directory nor the variable that sets it (NotADirectoryError: ...)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, output = run_to_exit({**env, variable: str(blocker / "cache")}, tmp_path)
    assert code == 2, output[-3000:]
    line = refusal_line(output)
    assert str(blocker) in line and f"set {variable}" in line and "not writable" in line, line
    assert "Traceback" not in output, output[-3000:]
