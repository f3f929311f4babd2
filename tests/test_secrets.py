"""Secrets and trust: Hugging Face tokens never show in logs, error bodies, /info or a built bento; pickled models
are loaded only from the sources the contract trusts (a local path, a Hugging Face repo the operator named, an
Arweave upload by an allow-listed owner)."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from core.errors import StartupError
from core.settings import TorchSettings
from tests.fixtures.server import REPO, run_to_exit, server_env, serving
from workflows import sources

BENTOML = Path(sys.executable).with_name("bentoml")
HF_TOKEN = "hf_" + secrets.token_hex(16)
HUB_TOKEN = "hf_" + secrets.token_hex(16)
TOKENS = {"HF_TOKEN": HF_TOKEN, "HUGGING_FACE_HUB_TOKEN": HUB_TOKEN}


def assert_no_token(text: str, where: str) -> None:
    for name, token in TOKENS.items():
        assert token not in text, f"{name} leaked into {where}"
        assert token[3:] not in text, f"part of {name} leaked into {where}"


@pytest.mark.slow
def test_tokens_never_reach_responses_or_logs(tmp_path):
    iris = [[1.0380048, 0.5586108, 1.1037828, 1.712096]]
    with serving(TOKENS, tmp_path) as server:
        answers = [
            server.get("/info"),
            server.get("/service-resources"),
            server.get("/metrics"),
            server.get("/docs.json"),
            server.get("/nope"),
            server.post({"source": 1, "data": {"dtype": "float", "values": iris}}),
            server.post({"source": 1, "data": {"dtype": "float", "values": [[1.0, 2.0]]}}),  # the model raises: 422
            server.post({"source": 1, "data": {"dtype": "nope", "values": [[1]]}}),
            server.post({"source": 1, "data": {}, "requires_proof": True}),
            requests.post(f"{server.url}/service_output", data=b"{" * 100, timeout=30),
            requests.put(f"{server.url}/service_output", timeout=30),
        ]
        assert answers[0].status_code == 200 and answers[5].status_code == 200
        assert answers[6].status_code == 422
        for response in answers:
            assert_no_token(response.text, f"the body of {response.request.method} {response.url}")
            assert_no_token(json.dumps(dict(response.headers)), f"the headers of {response.url}")
    assert_no_token(server.log(), "the server log")


@pytest.mark.slow
def test_tokens_never_reach_the_start_up_failure_message(tmp_path):
    env = {**TOKENS, "CLASSIC_INF_WORKFLOW_KW_ARGS": '{"model_name": "no-such-org/no-such-model"}',
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}  # fmt: skip
    status, output = run_to_exit(env, tmp_path)
    assert status != 0
    assert "no-such-org/no-such-model" in output  # the failure names the source ...
    assert_no_token(output, "the start-up failure")  # ... and never the credential


def test_settings_never_print_the_token():
    settings = TorchSettings.from_env(TOKENS)
    assert settings.hf_token in (HF_TOKEN, HUB_TOKEN)
    assert_no_token(repr(settings), "repr(TorchSettings)")
    assert_no_token(str(settings), "str(TorchSettings)")


@pytest.mark.slow
def test_a_built_bento_carries_no_token_and_runs_as_non_root(tmp_path):
    if not (REPO / "bentofile.yaml").exists():
        pytest.skip("bentofile.yaml is not on this branch (the shipping work adds it)")
    env = server_env(TOKENS, tmp_path)
    built = subprocess.run(
        [str(BENTOML), "build", ".", "--output", "tag"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    assert_no_token(built.stdout + built.stderr, "the output of bentoml build")
    bentos = list((tmp_path / "bentoml" / "bentos").glob("*/*/bento.yaml"))
    assert len(bentos) == 1, bentos
    bento = bentos[0].parent
    for path in bento.rglob("*"):
        if path.is_file():
            assert_no_token(path.read_bytes().decode("latin-1"), str(path.relative_to(bento)))
    bento_yaml = (bento / "bento.yaml").read_text()
    assert "HF_TOKEN" not in bento_yaml and "HUGGING_FACE_HUB_TOKEN" not in bento_yaml
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "HF_TOKEN" not in dockerfile and "HUGGING_FACE_HUB_TOKEN" not in dockerfile
    users = re.findall(r"^USER\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0"), f"the image's last USER is {users[-1:]}"


# --- trust: where a pickle may come from ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model_source": "url", "model_args": {"repo_id": "https://example.invalid/model.pt"}},
        {"model_source": "s3", "model_args": {"repo_id": "bucket/model.pt"}},
        {"model_source": "huggingface_hub", "model_args": {}},  # no repo named
        {},  # nothing named at all
    ],
)
def test_only_the_contract_sources_can_name_a_model(kwargs):
    with pytest.raises(StartupError):
        sources.spec_from_kwargs(kwargs, TorchSettings.from_env({}))


def test_arweave_needs_an_allow_list_of_owners():
    with pytest.raises(StartupError, match="ALLOWED_ARWEAVE_OWNERS"):
        TorchSettings.from_env({"USE_ARWEAVE": "true"})


def test_an_arweave_model_without_owners_is_never_fetched():
    spec = sources.spec_from_kwargs(
        {"model_source": "arweave", "model_args": {"repo_id": "Org/model"}}, TorchSettings.from_env({})
    )
    assert spec.source == "arweave" and spec.owners == ()
    with pytest.raises(StartupError):
        sources.fetch(spec, TorchSettings.from_env({}))


@pytest.mark.slow
def test_a_model_file_that_cannot_be_verified_stops_start_up(tmp_path):
    # A pinned sha256 that the file does not match: the service never becomes ready with it.
    model = tmp_path / "model.torch"
    model.write_bytes((REPO / "models" / "iris" / "model.torch").read_bytes())
    kwargs = json.dumps({"model_path": str(model), "sha256": "0" * 64})
    status, output = run_to_exit({"CLASSIC_INF_WORKFLOW_KW_ARGS": kwargs}, tmp_path)
    assert status != 0
    assert "sha256" in output


# --- secrets an HTTP header cannot carry; library messages that quote a token ----------------------------------


@pytest.mark.slow
def test_a_token_with_a_line_break_stops_start_up_without_showing_it(tmp_path):
    # httpx/requests refuse such a header with an error that quotes it: it must never get that far.
    status, output = run_to_exit({"HF_TOKEN": "hf_abc\nxyz"}, tmp_path)
    assert status != 0
    assert "HF_TOKEN: contains a line break" in output
    assert "hf_abc" not in output and "xyz" not in output


def test_a_library_message_quoting_the_token_is_masked_in_answers_and_start_up_lines(monkeypatch, capsys):
    # The message an HTTP library raises for a header it refuses (httpx's LocalProtocolError, requests'
    # InvalidHeader) quotes the value; made here, because a valid token never makes the real library raise it.
    from core.errors import failure
    from workflows import startup

    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    error = ValueError(f"Invalid header value b'Bearer {HF_TOKEN}'")
    outcome = failure(error)  # what a per-request model's 502 body and the runner's log line say
    assert outcome.status == 500 and "Bearer ***" in outcome.description
    assert_no_token(outcome.description, "an error answer")
    with pytest.raises(SystemExit), startup.exit_on_error("model"):
        raise StartupError(f"model hf:org/repo: {error}")
    printed = capsys.readouterr().err
    assert "start-up failed (model)" in printed
    assert_no_token(printed, "the start-up failure line")


@pytest.mark.slow
def test_quoted_env_file_values_are_read_as_python_dotenv_reads_them(tmp_path):
    # docker/podman run --env-file keep the quotes of MODEL_CACHE_DIR="/data/models"; quart -e (python-dotenv) not.
    cache = tmp_path / "model cache"
    env = {"MODEL_CACHE_DIR": f'"{cache}"', "MAX_BATCH_SIZE": '"8"', "USE_JIT": "'true'", "HF_TOKEN": f'"{HF_TOKEN}"'}
    with serving(env, tmp_path) as server:
        info = server.get("/info").json()
        assert server.post({"source": 1, "data": {"dtype": "float", "values": [[1.0, 0.5, 1.1, 1.7]]}}).ok
    assert cache.is_dir() and not list(tmp_path.glob('"*'))  # the unquoted folder, no folder named with quotes
    log = server.log()
    for name in env:
        assert f"{name}: its value is wrapped in quotes" in log
    assert log.count("MAX_BATCH_SIZE: its value is wrapped in quotes") == 1  # once, not once per process
    assert "--env-file keep quotes literally" in log
    assert_no_token(log + json.dumps(info), "the log and /info")


@pytest.mark.slow
def test_tracebacks_that_bentoml_logs_itself_are_masked(tmp_path):
    # The runner's /describe fails inside BentoML's typed endpoint (tests/workflows_for_tests.py LeakyDescribe: the
    # error quotes HF_TOKEN, as an HTTP library's error quotes the header it could not send). BentoML's own logger
    # writes the traceback ("Exception on /describe"), which no code of the service's sees.
    env = {"CLASSIC_INF_WORKFLOW_CLASS": "tests.workflows_for_tests.LeakyDescribe", "HF_TOKEN": HF_TOKEN}
    with serving(env, tmp_path) as server:
        info = server.get("/info")
        assert info.status_code == 500 and info.json()["code"] == "500"
        assert_no_token(info.text, "the /info answer")
        assert server.post({"source": 1, "data": {"dtype": "float", "values": [[1.0, 2.0]]}}).status_code == 200
    log = server.log()
    assert "Exception on /describe" in log and "Authorization: Bearer ***" in log
    assert_no_token(log, "the server log")


# A user's workflow module whose libraries quote HF_TOKEN on the other roads to the log than logging: a warning
# printed by warnings.showwarning (at import, in every process that resolves the class, and in the forward), one
# routed through logging.captureWarnings, a print, and a traceback printed by traceback.print_exc.
NOISY_WORKFLOW = """
import logging, os, traceback, warnings

from tests.workflows_for_tests import Doubler

TOKEN = os.environ["HF_TOKEN"]
warnings.warn(f"retrying without Authorization: Bearer {TOKEN}", UserWarning)


class Noisy(Doubler):
    def setup(self):
        print(f"connecting with token {TOKEN}", flush=True)
        logging.captureWarnings(True)
        warnings.warn(f"captured Authorization: Bearer {TOKEN}", UserWarning)
        logging.captureWarnings(False)

    def run_model(self, batch):
        warnings.warn(f"slow answer to Authorization: Bearer {TOKEN}", RuntimeWarning)
        try:
            raise ConnectionError(f"refused Bearer {TOKEN}")
        except ConnectionError:
            traceback.print_exc()
        return super().run_model(batch)
"""


@pytest.mark.slow
def test_warnings_prints_and_printed_tracebacks_are_masked(tmp_path):
    package = tmp_path / "noisy"
    package.mkdir()
    (package / "noisy_workflow.py").write_text(NOISY_WORKFLOW)
    python_path = ":".join([str(package), str(REPO)])
    env = {"CLASSIC_INF_WORKFLOW_CLASS": "noisy_workflow.Noisy", "PYTHONPATH": python_path, "HF_TOKEN": HF_TOKEN}
    with serving(env, tmp_path) as server:
        answer = server.post({"source": 1, "data": {"dtype": "float", "values": [[1.0, 2.0]]}})
        assert answer.status_code == 200 and answer.json()["values"] == [[2.0, 4.0]]
    log = server.log()
    for masked in (
        "UserWarning: retrying without Authorization: Bearer ***",
        "connecting with token ***",
        "captured Authorization: Bearer ***",
        "RuntimeWarning: slow answer to Authorization: Bearer ***",
        "ConnectionError: refused Bearer ***",
    ):
        assert masked in log, f"{masked!r} is not in the log:\n{log[-3000:]}"
    assert_no_token(log, "the server log")


def test_log_records_and_uncaught_exceptions_are_masked_whoever_logs_them(monkeypatch, capsys):
    # Handlers configured after start-up (BentoML's, uvicorn's) and loggers that do not propagate see masked records.
    import logging
    import threading

    from core import secrets as service_secrets

    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    # What scrub_logs changes for the process is put back after the test (monkeypatch restores what it set).
    monkeypatch.setattr(service_secrets, "_scrubbing", False)
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    # The interpreter's own hooks, as in the service's processes (pytest installs its own for threads): they write
    # the traceback to sys.stderr, which scrub_logs masks.
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    previous_factory = logging.getLogRecordFactory()
    try:
        _log_a_leaky_library(service_secrets.scrub_logs)
    finally:
        logging.setLogRecordFactory(previous_factory)
    printed = capsys.readouterr().err
    assert "refused Bearer ***" in printed and "Invalid header value b'Bearer ***'" in printed
    assert "RuntimeError: token ***" in printed
    assert_no_token(printed, "the log lines")


def _log_a_leaky_library(scrub_logs) -> None:
    import logging
    import threading

    scrub_logs()
    scrub_logs()  # once is enough; a second call changes nothing
    logger = logging.getLogger("a_library_of_our_tests")
    logger.propagate = False
    handler = logging.StreamHandler()
    logger.addHandler(handler)
    try:
        logger.error("refused %s", f"Bearer {HF_TOKEN}")
        try:
            raise ValueError(f"Invalid header value b'Bearer {HF_TOKEN}'")
        except ValueError:
            logger.exception("the upload failed")
        logger.warning("where", stack_info=True)
    finally:
        logger.removeHandler(handler)
    thread = threading.Thread(target=lambda: (_ for _ in ()).throw(RuntimeError(f"token {HF_TOKEN}")))
    thread.start()
    thread.join()
