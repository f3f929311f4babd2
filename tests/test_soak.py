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


def test_short_soak(tmp_path):
    report = tmp_path / "soak.json"
    finished = subprocess.run(
        [sys.executable, "scripts/soak.py", "--seconds", "30", "--report", str(report)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert report.exists(), finished.stdout[-3000:] + finished.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["requests"] > 0
    assert result["unexpected"] == {}
    assert result["processes_replaced"] == []
    for name, memory in result["memory"].items():
        assert memory["growth"] < 0.10, f"{name}: {memory}"
    assert finished.returncode == 0, finished.stdout[-3000:]
    figure("soak_30s", **{k: result[k] for k in ("requests", "statuses", "memory", "latency_ms")})
