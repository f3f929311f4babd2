"""Start-up prints one greppable line per stage (config, source, download, verify, load, warmup, ready) with its
timing, and the stage that stops a start names itself."""

from __future__ import annotations

import re

import pytest

from core.errors import StartupError
from core.settings import EMBEDDED_MODEL, ServiceSettings
from tests.fixtures.server import run_to_exit
from workflows import progress, startup

STAGES = ["config", "source", "download", "verify", "load", "warmup", "ready"]
LINE = re.compile(r"^\S+ \[(INFO|ERROR)\] \[startup\] stage=(\w+) status=(\w+)(?: seconds=(\d+\.\d{3}))?(.*)$")
IRIS = {"dtype": "double", "values": [[1.0380048, 0.5586108, 1.1037828, 1.712096]]}


def startup_lines(text: str) -> list[tuple[str, str, str, str | None, str]]:
    return [m.groups() for m in map(LINE.match, text.splitlines()) if m]


def test_a_line_is_key_values_with_quoted_text():
    text = progress.line("warmup", "skipped", 0.0012, reason="no input", path="/a/b", pinned=False, n=3, gone=None)
    (level, stage, status, seconds, rest) = startup_lines(text)[0]
    assert (level, stage, status, seconds) == ("INFO", "warmup", "skipped", "0.001")
    assert rest == ' reason="no input" path=/a/b pinned=false n=3'
    assert startup_lines(progress.line("download", "failed"))[0][0] == "ERROR"


@pytest.mark.slow
def test_server_start_prints_every_stage_in_order_with_timings(iris_server):
    lines = startup_lines(iris_server.log())
    assert [stage for _, stage, _, _, _ in lines] == STAGES
    assert all(status in ("ok", "skipped") for _, _, status, _, _ in lines)
    assert all(seconds is not None for _, stage, _, seconds, _ in lines if stage != "config")
    fields = {stage: rest for _, stage, _, _, rest in lines}
    assert "file=model.torch" in fields["download"] and "sha256=" in fields["verify"]
    assert "format=torchscript" in fields["load"] and "device=cpu" in fields["load"]


@pytest.mark.slow
def test_a_failed_stage_is_named(tmp_path):
    kw_args = '{"model_path": "/nonexistent/model.torch"}'
    exit_status, output = run_to_exit({"CLASSIC_INF_WORKFLOW_KW_ARGS": kw_args}, tmp_path)
    assert exit_status != 0
    lines = startup_lines(output)
    assert [(stage, status) for _, stage, status, _, _ in lines][-1] == ("download", "failed")
    assert "start-up failed (model): model source=local repo=/nonexistent/model.torch" in output


@pytest.mark.slow
def test_a_start_up_that_fails_in_the_runner_leaves_no_metrics_directory(tmp_path):
    # Explorer F16: the runner's failure stopped the server through an exit that skipped the removal of its
    # prometheus_multiproc_dir.<host>.<pid>, so a crash-looping container gathered one per failed start.
    kw_args = f'{{"model_path": "{EMBEDDED_MODEL}", "warmup_input": {{"dtype": "float", "values": [[1, 2, 3]]}}}}'
    exit_status, output = run_to_exit({"CLASSIC_INF_WORKFLOW_KW_ARGS": kw_args}, tmp_path)
    assert exit_status == 2, output[-3000:]
    assert "start-up failed (workflow): warmup_input" in output
    assert (tmp_path / "bentoml").is_dir()
    assert not list((tmp_path / "bentoml").glob("prometheus_multiproc_dir*")), "left behind"


def test_warmup_runs_the_given_input_once_before_ready(capsys):
    settings = ServiceSettings(workflow_kwargs={"model_path": str(EMBEDDED_MODEL), "warmup_input": IRIS})
    workflow = startup.build(settings)
    lines = startup_lines(capsys.readouterr().err)
    assert [(stage, status) for _, stage, status, _, _ in lines] == [("load", "ok"), ("warmup", "ok"), ("ready", "ok")]
    assert workflow.warmup() is True


def test_a_warmup_input_the_model_refuses_stops_start_up(capsys):
    settings = ServiceSettings(
        workflow_kwargs={"model_path": str(EMBEDDED_MODEL), "warmup_input": {"dtype": "double", "values": [[1.0]]}}
    )
    with pytest.raises(StartupError, match="warmup_input"):
        startup.build(settings)
    assert startup_lines(capsys.readouterr().err)[-1][1:3] == ("warmup", "failed")
