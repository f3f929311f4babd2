"""Starting and stopping the systems under test, each in its own process group on a loopback port."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
# LitServe's own venv (`make peers-venv`, requirements-peers.txt): it would add fastapi and websockets to ours.
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"
SYSTEMS = ("ours", "original", "bentoml", "mosec", "litserve", "floor")
# Reference systems: measured in every run but no peer of ours, so no ratio column and no model answer to check.
# "floor": a bare uvicorn app that only reads and parses the body (floor_app.py), the least a Python front costs.
REFERENCES = ("floor",)
# "before": this service served from another checkout (bench.py --before, e.g. a git worktree of main before a
# change), so a change's cost or gain is read from one run, both versions side by side.
BEFORE = "before"
BEFORE_TREE = "BENCH_BEFORE_TREE"
# Where each system takes the request body.
PATHS = {"mosec": "/inference", "litserve": "/predict"}
# The peers batch like ours: the same largest batch (the service's MAX_BATCH_SIZE, which ours reads from the
# environment it inherits) and a short wait to fill a batch, where ours forms one from whatever is queued.
# A peer that waits for a batch to fill runs far faster at c=64 with a batch limit half the clients (a batch of 64
# never fills in a closed loop of 64): `--peer-max-batch-size` sets the peers' own (docs/performance.md, section 22).
MAX_WAIT_MS = 5
PEER_MAX_BATCH_SIZE = "BENCH_PEER_MAX_BATCH_SIZE"


@dataclass
class Running:
    name: str
    url: str
    process: subprocess.Popen
    ready_s: float
    log: Path

    @property
    def endpoint(self) -> str:
        """The URL the request body is POSTed to."""
        return self.url + path(self.name)


def path(system: str) -> str:
    return PATHS.get(system, "/service_output")


def max_batch_size() -> int:
    sys.path.insert(0, str(REPO))
    from core.settings import ServiceSettings

    return ServiceSettings.from_env(os.environ).max_batch_size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(system: str, port: int, model: Path, work: Path) -> tuple[list[str], Path, dict[str, str]]:
    # Each system its own BentoML home: they run side by side, and the metrics directory lives there.
    env = {**os.environ, "BENTOML_HOME": str(work / f"bentoml-{system}"), "BENTOML_DO_NOT_TRACK": "True"}
    env["PYTHONUNBUFFERED"] = "1"
    if system in ("ours", BEFORE):
        env["CLASSIC_INF_WORKFLOW_KW_ARGS"] = json.dumps({"model_path": str(model)})
        env["MODEL_CACHE_DIR"] = str(work / f"model-cache-{system}")
        cmd = [str(BIN / "bentoml"), "serve", "service:InfernetService", "--host", "127.0.0.1", "--port", str(port)]
        return cmd, Path(os.environ[BEFORE_TREE]) if system == BEFORE else REPO, env
    if system == "floor":
        cmd = [str(BIN / "uvicorn"), "floor_app:app", "--workers", "2", "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["--http", "httptools", "--loop", "uvloop", "--no-access-log", "--lifespan", "off", "--log-level"]
        return [*cmd, "warning"], BENCH_DIR, env
    env["BENCH_MODEL"] = str(model)
    if system == "original":
        cmd = [str(BIN / "hypercorn"), "--workers", "2", "--bind", f"127.0.0.1:{port}", "original_app:app"]
        return cmd, BENCH_DIR, env
    if system == "bentoml":
        cmd = [str(BIN / "bentoml"), "serve", "plain_bentoml:PlainService", "--host", "127.0.0.1", "--port", str(port)]
        return cmd, BENCH_DIR, env
    env["BENCH_MAX_BATCH_SIZE"] = os.environ.get(PEER_MAX_BATCH_SIZE) or str(max_batch_size())
    env["BENCH_MAX_WAIT_MS"] = str(MAX_WAIT_MS)
    if system == "mosec":
        cmd = [sys.executable, "mosec_app.py", "--address", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
        return cmd, BENCH_DIR, env
    if system == "litserve":
        if not PEERS_PYTHON.exists():
            raise RuntimeError(f"litserve needs {PEERS_PYTHON.parent.parent}: run `make peers-venv`")
        return [str(PEERS_PYTHON), "litserve_app.py", "--port", str(port)], BENCH_DIR, env
    raise ValueError(system)


def get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def post(url: str, body: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def ready(system: str, url: str, body: Path) -> bool:
    if system == "mosec":  # its HTTP front answers before the workers have loaded the model: ask the model
        return post(url + path(system), body.read_bytes(), timeout=5)[0] == 200
    return get(url + ("/health" if system == "litserve" else "/readyz"))[0] == 200


@contextlib.contextmanager
def serve(system: str, model: Path, body: Path, work: Path, timeout: float = 120) -> Iterator[Running]:
    """Start ``system`` serving ``model`` and wait until it is ready (``body`` is a request it must answer)."""
    port = free_port()
    cmd, cwd, env = command(system, port, model, work)
    log = work / f"{system}-{model.stem}.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{system} exited with {process.returncode}; see {log}")
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{system} not ready after {timeout}s; see {log}")
            with contextlib.suppress(OSError):
                if ready(system, url, body):
                    break
            time.sleep(0.1)
        yield Running(system, url, process, time.monotonic() - started, log)
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(20)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


def batch_totals(url: str) -> tuple[float, float]:
    """(sum, count) of infernet_batch_size (requests per runner batch) over every label set; deltas give the mean."""
    total = count = 0.0
    _, text = get(f"{url}/metrics", timeout=10)
    for line in text.splitlines():
        if line.startswith("infernet_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("infernet_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count
