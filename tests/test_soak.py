"""The short soak (30 s) of `make soak`, as CI runs it: every request answered as its kind expects, no process
replaced, and each process's memory grows by less than 10% after warm-up."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.fixtures.server import REPO
from tests.reliability_support import figure

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def soak(tmp_path_factory) -> dict:
    report = tmp_path_factory.mktemp("soak") / "soak.json"
    finished = subprocess.run(
        [sys.executable, "scripts/soak.py", "--seconds", "30", "--report", str(report)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert report.exists(), finished.stdout[-3000:] + finished.stderr[-3000:]
    result = json.loads(report.read_text())
    figure("soak_30s", **{k: result[k] for k in ("requests", "statuses", "memory", "latency_ms")})
    return result


def test_every_request_is_answered_as_its_kind_expects(soak):
    assert soak["requests"] > 0
    assert soak["unexpected"] == {}
    assert soak["processes_replaced"] == []


def test_memory_of_every_process_grows_less_than_10_percent_after_warmup(soak):
    for name, memory in soak["memory"].items():
        assert memory["growth"] < 0.10, f"{name}: {memory}"
