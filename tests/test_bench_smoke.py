"""The load benchmark's pieces, run minimally: no servers, no load, no timing assertions."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from scripts.bench import inproc, models, wrk

# scripts/bench.py shares its name with the scripts/bench/ package, so load the entry point by path.
_spec = importlib.util.spec_from_file_location("bench_main", Path(__file__).parents[1] / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
DTYPES = {"double": torch.float64, "float": torch.float32}

WRK_SAMPLE = """Running 5s test @ http://127.0.0.1:3000/service_output
  1 threads and 64 connections
Requests/sec:   4000.00
BENCH_JSON {"requests": 20000, "duration_us": 5000000, "bytes": 1, "connect": 0, "read": 2, "write": 0, \
"status": 3, "timeout": 1, "p50_us": 1500, "p90_us": 2500, "p99_us": 4000, "max_us": 9000, "mean_us": 1600.0}
"""


def test_models_build_and_answer_their_body(tmp_path):
    for name, out_features in (("tiny", 2), ("heavy", 10)):
        model = models.build(name, tmp_path)
        body = json.loads(model.body.read_text())
        assert body["source"] == 1 and body["data"]["dtype"] == model.dtype
        values = torch.tensor(
            body["data"]["values"], dtype={"double": torch.float64, "float": torch.float32}[model.dtype]
        )
        out = torch.jit.load(str(model.path))(values)
        assert tuple(out.shape) == (1, out_features)


def test_in_process_limit_runs(tmp_path):
    model = models.build("tiny", tmp_path)
    rate = inproc.samples_per_second(str(model.path), 32, 0.2, 1, model.features, model.dtype)
    assert rate > 0


def test_wrk_summary_is_parsed():
    result = wrk.parse(WRK_SAMPLE)
    assert result["rps"] == pytest.approx(4000)
    assert (result["p50_ms"], result["p99_ms"]) == (1.5, 4.0)
    assert (result["errors"], result["non_2xx"], result["socket_errors"]) == (6, 3, 3)


def test_table_has_ratios_to_each_baseline():
    rows = [
        {"system": s, "model": "tiny", "concurrency": 64, "rps": rps, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0}
        for s, rps in (("ours", 5000.0), ("original", 1000.0), ("bentoml", 500.0))
    ]
    rows[0]["mean_batch"] = 12.5
    limits = {"tiny": {"1": 10000.0, "32": 100000.0}}
    bench.add_ratios(rows, limits)
    assert (rows[0]["x_original"], rows[0]["x_bentoml"], rows[0]["x_inproc32"]) == (5.0, 10.0, 0.05)
    text = bench.table(rows, limits)
    assert "| ours | tiny | 64 | 5000 |" in text and "12.5" in text and "in-process b32" in text


def test_rounds_are_summarised_by_median_and_errors_summed():
    runs = [
        {"rps": 900.0, "p50_ms": 3.0, "p99_ms": 9.0, "errors": 0, "mean_batch": 4.0},
        {"rps": 3000.0, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 2, "mean_batch": 8.0},
        {"rps": 1000.0, "p50_ms": 2.0, "p99_ms": 5.0, "errors": 0, "mean_batch": None},
    ]
    summary = bench.summarise(runs)
    assert (summary["rps"], summary["p50_ms"], summary["p99_ms"]) == (1000.0, 2.0, 5.0)
    assert summary["mean_batch"] == 6.0 and summary["errors"] == 2


def test_the_in_process_limit_is_the_median_of_its_rounds():
    rounds = [{"1": 500.0, "32": 7000.0}, {"1": 700.0, "32": 4000.0}, {"1": 600.0, "32": 4500.0}]
    assert bench.median_limit(rounds) == {"1": 600.0, "32": 4500.0}
    assert bench.median_limit([]) == {}


def test_missing_wrk_is_explained(monkeypatch, capsys):
    monkeypatch.setattr(wrk, "find_wrk", lambda: None)
    assert bench.main(["--models", "tiny"]) != 0
    assert "apt-get install -y wrk" in capsys.readouterr().err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
