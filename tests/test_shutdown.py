"""Graceful shutdown: SIGTERM to ``bentoml serve`` lets the requests in flight finish, refuses new ones without
running them, and every process is gone within a bound."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import psutil
import pytest
import requests

from tests.fixtures.server import Server, serving, start, stop, wait_ready
from tests.reliability_support import (
    Outcome,
    assert_contract_error,
    env,
    figure,
    post,
    processes,
    row,
    sleeping,
    wait_for,
)

pytestmark = pytest.mark.slow

SLOW_S = 3.0
EXIT_BOUND_S = 30  # BentoML's process manager gives workers this long before it kills them


def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(tmp_path):
    with serving(env(tmp_path, REQUEST_TIMEOUT_S="20"), tmp_path) as server:
        every_pid = [p.pid for group in processes(server).values() for p in group]
        in_flight: list[Outcome] = []
        callers = [
            threading.Thread(target=lambda: in_flight.append(post(server, sleeping(SLOW_S), timeout=60)))
            for _ in range(4)
        ]
        for caller in callers:
            caller.start()
        time.sleep(1.0)  # the requests have reached the service (each holds the model SLOW_S)
        os.kill(server.process.pid, signal.SIGTERM)
        terminated = time.monotonic()
        time.sleep(0.3)
        late = [post(server, sleeping(0.0), timeout=30) for _ in range(3)]
        for caller in callers:
            caller.join(60)
        server.process.wait(EXIT_BOUND_S)
        exited_after = time.monotonic() - terminated

    assert len(in_flight) == 4
    for outcome in in_flight:
        assert outcome.status == 200, outcome.error or outcome.response.text
        assert outcome.response.json()["values"] == [[2 * SLOW_S, 0.0, 0.0]]
    for outcome in late:
        # Refused cleanly: the connection is refused or reset before the request is read, or a JSON 503.
        if outcome.status is not None:
            assert_contract_error(outcome.response, 503)
        else:
            assert "Connection" in outcome.error, outcome.error
    assert server.process.returncode == 0
    left = [pid for pid in every_pid if _alive(pid)]
    assert not left, f"processes left after shutdown: {left}"
    figure(
        "shutdown",
        in_flight=[(o.status, round(o.seconds, 2)) for o in in_flight],
        late=[o.status or o.error.split(":")[0] for o in late],
        exited_after_s=round(exited_after, 2),
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


SHUTDOWN_S = 3.0
# Generous on a busy machine; without the bound the processes live until REQUEST_TIMEOUT_S (60 s) expires.
SHUTDOWN_MARGIN_S = 15.0


def test_sigterm_exits_within_shutdown_timeout_despite_a_stalled_upload_and_a_long_request(tmp_path):
    with serving(env(tmp_path, REQUEST_TIMEOUT_S="60", SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_S)), tmp_path) as server:
        every_pid = [p.pid for group in processes(server).values() for p in group]
        url = urlparse(server.url)
        stalled = socket.create_connection((url.hostname, url.port), timeout=60)
        stalled.sendall(
            b"POST /service_output HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + b'{"source":'
        )
        running: list[Outcome] = []
        caller = threading.Thread(target=lambda: running.append(post(server, sleeping(40.0), timeout=90)))
        caller.start()
        time.sleep(1.5)  # both requests have reached an API worker; the model sleeps 40 s
        os.kill(server.process.pid, signal.SIGTERM)
        terminated = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(SHUTDOWN_S + SHUTDOWN_MARGIN_S)
        exited_after = time.monotonic() - terminated
        left = [pid for pid in every_pid if _alive(pid)]
        caller.join(30)
        stalled.settimeout(5)
        try:
            cut = stalled.recv(65536)
        except OSError as e:  # reset: also cut, not left hanging
            cut = repr(e).encode()
        stalled.close()

    assert server.process.returncode is not None, f"still running {exited_after:.1f} s after SIGTERM"
    assert not left, f"processes left {exited_after:.1f} s after SIGTERM: {left}"
    # The request that was running gets the contract's 503 (or, at worst, its answer), not a reset.
    assert len(running) == 1
    assert running[0].status is not None, running[0].error
    if running[0].status != 200:
        assert_contract_error(running[0].response, 503)
        assert "SHUTDOWN_TIMEOUT_S" in running[0].response.json()["description"]
    # The stalled upload was cut: a 503 answer, or the connection closed.
    assert cut == b"" or cut.startswith(b"HTTP/1.1 503") or b"Connection" in cut, cut[:200]
    # A call the bound cut short is one warning line in the runner's log, not an ERROR with a traceback.
    log = server.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert "cancelled: the server is stopping" in log, log[-3000:]
    figure("shutdown_bound", exited_after_s=round(exited_after, 2), running=running[0].status, cut=cut[:12].decode())


ORPHAN_BOUND_S = 10.0  # a worker notices within 0.5 s; an idle graceful stop takes 1-3 s here


@pytest.fixture
def short_tmpdir() -> Iterator[Path]:
    """A TMPDIR of the test's own with a short path: BentoML puts its unix sockets there (at most 108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="t", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_sigkill_of_the_serve_process_stops_every_worker_and_frees_the_port(tmp_path, short_tmpdir):
    """The OOM killer or ``kill -9`` ends ``bentoml serve``'s main process without its graceful stop: its API workers
    and runner must not live on as orphans answering on the port (core/server_watch.py)."""
    temporary = short_tmpdir  # the crash-records directory's parent
    server = start({**env(tmp_path), "TMPDIR": str(temporary)}, tmp_path)
    children: list[psutil.Process] = []
    try:
        wait_ready(server)
        children = [p for name, group in processes(server).items() if name != "arbiter" for p in group]
        assert len(children) == 3, children  # the runner and two API workers
        assert server.post(row()).status_code == 200
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(5)
        stopped_after = wait_for(lambda: not _answers(server) and not [p for p in children if _running(p)], 30)
        survivors = [p.pid for p in children if _running(p)]
        answering = _answers(server)
    finally:
        for child in children:  # never leave orphans behind, whatever happened above
            with contextlib.suppress(psutil.Error):
                child.kill()
        stop(server)

    assert not survivors and not answering
    assert stopped_after <= ORPHAN_BOUND_S, f"workers stopped {stopped_after:.1f} s after the server's SIGKILL"
    log = server.log()
    assert log.count("has died: this worker") == 3, log[-3000:]
    assert "Traceback" not in log[log.index("has died") :], log[-3000:]
    figure("orphans", stopped_after_s=round(stopped_after, 2))

    # What only the main process removes at exit stayed behind; the next server on the host removes it at start-up,
    # whatever else it finds that is not a dead server's of this host (core/leftovers.py).
    home = tmp_path / "bentoml"
    left = [*home.glob("prometheus_multiproc_dir.*"), *temporary.glob("infernet-crashes*")]
    assert len(left) == 2, left
    others = [home / "prometheus_multiproc_dir.another-host.1", temporary / "unrelated"]
    for other in others:
        other.mkdir()
    (tmp_path / "next").mkdir()
    with serving(
        {**env(tmp_path / "next"), "BENTOML_HOME": str(home), "TMPDIR": str(temporary)}, tmp_path / "next"
    ) as again:
        assert again.post(row()).status_code == 200
        assert not [path for path in left if path.exists()], left
        assert all(other.exists() for other in others)
        now = [*home.glob("prometheus_multiproc_dir.*"), *temporary.glob("infernet-crashes*")]
        assert len(now) == 3, now  # the new server's own two, and the other host's
        assert again.log().count("left by a server that died without its exit") == 2, again.log()[-3000:]


def _answers(server: Server) -> bool:
    try:
        requests.get(f"{server.url}/livez", timeout=1)
    except requests.ConnectionError:
        return False
    return True


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _pid_running(pid: int) -> bool:
    try:
        return _running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def test_sigterm_during_the_model_download_stops_at_once_with_one_line_and_no_partial_file(tmp_path, hub):
    """``docker stop`` while the model is still downloading (a 60 s download from the loopback Hub)."""
    model = json.dumps({"model_name": "testorg/slow-iris"})
    server = start({"CLASSIC_INF_WORKFLOW_KW_ARGS": model, "HF_ENDPOINT": hub.url}, tmp_path)
    caches = [Path(server.env["HF_HOME"]), Path(server.env["MODEL_CACHE_DIR"])]
    try:
        wait_for(lambda: _partial_files(caches), 60)  # the download is under way
        os.kill(server.process.pid, signal.SIGTERM)
        server.process.wait(10)
    finally:
        stop(server)

    log = server.log()
    assert server.process.returncode == 128 + signal.SIGTERM, log[-3000:]  # as a shell reports a SIGTERMed process
    assert log.count("start-up stopped by SIGTERM") == 1, log[-3000:]
    assert "Traceback" not in log and "status=failed" not in log, log[-3000:]
    assert not _partial_files(caches)


def _partial_files(roots: list[Path]) -> list[Path]:
    """The Hugging Face client's ``*.incomplete`` and the model cache's ``.<file>.partial-*`` files under ``roots``."""
    return [p for root in roots for p in root.rglob("*") if p.name.endswith(".incomplete") or ".partial-" in p.name]


def test_a_runner_whose_event_loop_is_stuck_fails_livez_and_sigterm_ends_within_the_bound(tmp_path):
    """A workflow's pre-processing that never returns holds the runner's event loop: its health call went unanswered
    and /livez stayed 200 for good; SIGTERM then never finished (BentoML's process manager waits a day per worker).
    Now /livez fails past 10 x REQUEST_TIMEOUT_S of silence, and the stop ends SHUTDOWN_TIMEOUT_S + 4 s after
    SIGTERM with status 1 and one line naming the runner."""
    shutdown_s = 2.0
    server_env = {
        "CLASSIC_INF_WORKFLOW_CLASS": "tests.workflows_for_tests.Toolbox",
        "CLASSIC_INF_WORKFLOW_POSITIONAL_ARGS": '["hello"]',
        "REQUEST_TIMEOUT_S": "1",
        "SHUTDOWN_TIMEOUT_S": str(shutdown_s),
        "API_WORKERS": "1",
    }
    with serving(server_env, tmp_path) as server:
        assert server.post({"source": 1, "data": {"echo": 1}}).status_code == 200
        runner = processes(server)["runner"][0].pid
        every_pid = [p.pid for group in processes(server).values() for p in group]
        hung = server.post({"source": 1, "data": {"hang": 600}})  # the loop blocks; the caller gets its 504
        assert hung.status_code == 504, hung.text
        blocked = time.monotonic()
        assert server.get("/readyz", timeout=10).status_code == 503
        wait_for(lambda: server.get("/livez", timeout=10).status_code == 503, timeout=40)
        silent_s = time.monotonic() - blocked
        assert 8 <= silent_s <= 35, f"/livez failed {silent_s:.1f} s after the loop blocked (bound: 10 s)"
        body = assert_contract_error(server.get("/livez", timeout=10), 503)
        assert "has not answered" in body["description"] and "stopped or stuck" in body["description"], body

        os.kill(server.process.pid, signal.SIGTERM)
        terminated = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(shutdown_s + 4 + SHUTDOWN_MARGIN_S)
        exited_after_s = time.monotonic() - terminated
        log = server.log()
    assert server.process.returncode == 1, f"{server.process.returncode} {exited_after_s:.1f} s: {log[-2000:]}"
    lines = [line for line in log.splitlines() if "shutdown did not finish" in line]
    assert len(lines) == 1, log[-2000:]
    assert f"the model runner (pid {runner}) is still running: stuck" in lines[0], lines[0]
    left = [pid for pid in every_pid if _pid_running(pid)]
    assert not left, f"processes left after the bound: {left}"
    figure("stuck_loop_shutdown", exited_after_s=round(exited_after_s, 1))


def test_sighup_stops_the_server_as_sigterm_does(tmp_path):
    """SIGHUP made BentoML's process manager (circus) reload every worker: the model loaded again and the service
    answered 503 meanwhile, yet nothing was re-read (the configuration is read once, at start-up). It is a graceful
    stop now, as in most servers a hang-up of the terminal ends them (docs/deploy.md)."""
    with serving(env(tmp_path), tmp_path) as server:
        every_pid = [p.pid for group in processes(server).values() for p in group]
        assert server.post(row()).status_code == 200
        os.kill(server.process.pid, signal.SIGHUP)
        hung_up = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(EXIT_BOUND_S)
        exited_after_s = time.monotonic() - hung_up
        log = server.log()
    assert server.process.returncode == 0, f"{server.process.returncode} after {exited_after_s:.1f} s: {log[-2000:]}"
    assert "SIGHUP: stopping as on SIGTERM" in log, log[-2000:]
    assert not [pid for pid in every_pid if _pid_running(pid)]
