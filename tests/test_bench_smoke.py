"""The load benchmark's pieces, run minimally, then one short run of every system on the image model (slow: it
starts every server and needs wrk and .venv-peers, which `make test` provides). No timing assertions."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scripts.bench import cpu, inproc, models, servers, wrk

# scripts/bench.py shares its name with the scripts/bench/ package, so load the entry point by path.
_spec = importlib.util.spec_from_file_location("bench_main", Path(__file__).parents[1] / "scripts" / "bench.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
DTYPES = {"double": torch.float64, "float": torch.float32}
REPO = Path(__file__).parents[1]

WRK_SAMPLE = """Running 5s test @ http://127.0.0.1:3000/service_output
  1 threads and 64 connections
Requests/sec:   4000.00
BENCH_JSON {"requests": 20000, "duration_us": 5000000, "bytes": 1, "connect": 0, "read": 2, "write": 0, \
"status": 3, "timeout": 1, "p50_us": 1500, "p90_us": 2500, "p99_us": 4000, "max_us": 9000, "mean_us": 1600.0}
"""


def test_models_build_and_answer_their_body(tmp_path):
    for name, out_features in (("tiny", 2), ("heavy", 10), ("image", 10)):
        model = models.build(name, tmp_path)
        body = json.loads(model.body.read_text())
        assert body["source"] == 1 and body["data"]["dtype"] == model.dtype
        values = torch.tensor(body["data"]["values"], dtype=DTYPES[model.dtype])
        assert tuple(values.shape) == (1, *model.shape)
        out = torch.jit.load(str(model.path))(values)
        assert tuple(out.shape) == (1, out_features)


def test_the_image_model_takes_large_requests(tmp_path):
    model = models.build("image", tmp_path)
    assert model.shape == (3, 64, 64) and model.dtype == "float"
    assert model.body.stat().st_size > 100_000  # 12,288 values of JSON
    again = models.build("image", tmp_path / "again")  # fixed seeds: the same weights and body every time
    assert again.body.read_bytes() == model.body.read_bytes()
    x = torch.tensor(json.loads(model.body.read_text())["data"]["values"])
    assert torch.equal(torch.jit.load(str(model.path))(x), torch.jit.load(str(again.path))(x))


def test_in_process_limit_runs(tmp_path):
    for name in ("tiny", "image"):
        model = models.build(name, tmp_path)
        rate = inproc.samples_per_second(str(model.path), 32, 0.2, 1, model.shape, model.dtype)
        assert rate > 0


def test_json_to_tensor_is_measured_with_the_services_decode(tmp_path):
    model = models.build("image", tmp_path)
    assert inproc.decodes_per_second(str(model.body), 0.2) > 0
    done = subprocess.run(
        [sys.executable, "-m", "scripts.bench.inproc", str(model.path), "--shape", "3", "64", "64", "--batch", "1",
         "--seconds", "0.2", "--body", str(model.body)],
        cwd=REPO, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    rates = json.loads(done.stdout.splitlines()[-1])
    assert set(rates) == {"1", "decode"} and rates["decode"] > 0


def test_wrk_summary_is_parsed():
    result = wrk.parse(WRK_SAMPLE)
    assert result["rps"] == pytest.approx(4000)
    assert (result["p50_ms"], result["p99_ms"]) == (1.5, 4.0)
    assert (result["errors"], result["non_2xx"], result["socket_errors"]) == (6, 3, 3)


def test_table_has_ratios_to_each_baseline():
    rows = [
        {"system": s, "model": "tiny", "concurrency": 64, "rps": rps, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0}
        for s, rps in (("ours", 5000.0), ("original", 1000.0), ("bentoml", 500.0), ("mosec", 2000.0),
                       ("litserve", 2500.0))
    ]  # fmt: skip
    rows[0]["mean_batch"] = 12.5
    rows[0]["cpu_us_per_req"] = 165.4
    limits = {"tiny": {"1": 10000.0, "32": 100000.0, "decode": 20000.0}}
    bench.add_ratios(rows, limits)
    assert (rows[0]["x_original"], rows[0]["x_bentoml"], rows[0]["x_inproc32"]) == (5.0, 10.0, 0.05)
    assert (rows[0]["x_mosec"], rows[0]["x_litserve"]) == (2.5, 2.0)
    text = bench.table(rows, limits)
    assert "| ours | tiny | 64 | 5000 |" in text and "| 12.5 | 165 |" in text and "in-process b32" in text
    assert "| mean batch | server CPU µs/req | ×original | ×bentoml | ×mosec | ×litserve | ×inproc b32 |" in text
    assert "| 5.00 | 10.00 | 2.50 | 2.00 | 0.05 |" in text
    assert "| in-process JSON → tensor | tiny | – | 20000 req/s (50 µs) |" in text
    assert "| litserve | tiny | 64 | 2500 | 1.00 | 2.00 | 0 | – | – |" in text  # no CPU figure: a dash
    assert {line.count("|") for line in text.splitlines()} == {15}  # every row has every column


def test_before_column_compares_with_another_checkout(tmp_path):
    rows = [
        {"system": s, "model": "tiny", "concurrency": 64, "rps": rps, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 0}
        for s, rps in (("ours", 3000.0), ("before", 2000.0), ("original", 1000.0))
    ]
    bench.add_ratios(rows, {})
    assert rows[0]["x_before"] == 1.5
    text = bench.table(rows, {})
    assert "| ×before | ×original | ×bentoml | ×mosec | ×litserve | ×inproc b32 |" in text
    assert "| 1.50 | 3.00 | – | – | – | – |" in text
    args = bench.parse_args(["--before", str(bench.REPO), "--systems", "ours", "mosec"])
    assert args.systems == ["ours", "before", "mosec"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--before", str(tmp_path)])  # no service.py there
    with pytest.raises(SystemExit):
        bench.parse_args(["--systems", "before"])


def test_peers_take_our_batch_limit_unless_told_their_own(tmp_path, monkeypatch):
    monkeypatch.delenv(servers.PEER_MAX_BATCH_SIZE, raising=False)
    model = tmp_path / "m.torch"
    for peer in ("mosec", "litserve"):
        assert servers.command(peer, 1, model, tmp_path)[2]["BENCH_MAX_BATCH_SIZE"] == str(servers.max_batch_size())
    bench.parse_args(["--peer-max-batch-size", "32", "--systems", "mosec"])
    for peer in ("mosec", "litserve"):
        assert servers.command(peer, 1, model, tmp_path)[2]["BENCH_MAX_BATCH_SIZE"] == "32"
    ours = servers.command("ours", 1, model, tmp_path)[2]
    assert ours.get("MAX_BATCH_SIZE") == os.environ.get("MAX_BATCH_SIZE")  # ours keeps its own setting
    with pytest.raises(SystemExit):
        bench.parse_args(["--peer-max-batch-size", "0"])


def test_answers_are_checked_against_the_models_own(tmp_path):
    model = models.build("tiny", tmp_path)
    expected = bench.expected_answer(model)
    assert expected["dtype"] == "double" and expected["shape"] == [1, 2]
    assert bench.answer_mismatch(json.loads(json.dumps(expected)), expected) is None
    close = {**expected, "values": [[v * (1 + 1e-7) for v in expected["values"][0]]]}
    assert bench.answer_mismatch(close, expected) is None  # a batched forward may round differently
    off = {**expected, "values": [[v + 0.01 for v in expected["values"][0]]]}
    assert "differ" in bench.answer_mismatch(off, expected)
    assert "shape" in bench.answer_mismatch({**expected, "shape": [2]}, expected)
    assert "dtype" in bench.answer_mismatch({**expected, "dtype": "float"}, expected)
    assert "object" in bench.answer_mismatch({"output": expected["values"]}, expected)


def test_rounds_are_summarised_by_median_and_errors_summed():
    runs = [
        {"rps": 900.0, "p50_ms": 3.0, "p99_ms": 9.0, "errors": 0, "mean_batch": 4.0, "cpu_us_per_req": 200.0,
         "cpu_roles": {"runner": 60.0, "api": 130.0, "other": 10.0}},
        {"rps": 3000.0, "p50_ms": 1.0, "p99_ms": 2.0, "errors": 2, "mean_batch": 8.0, "cpu_us_per_req": 150.0,
         "cpu_roles": {"runner": 40.0, "api": 110.0, "other": 0.0}},
        {"rps": 1000.0, "p50_ms": 2.0, "p99_ms": 5.0, "errors": 0, "mean_batch": None, "cpu_us_per_req": 170.0,
         "cpu_roles": {"runner": 50.0, "api": 120.0, "other": 0.0}},
    ]  # fmt: skip
    summary = bench.summarise(runs)
    assert (summary["rps"], summary["p50_ms"], summary["p99_ms"]) == (1000.0, 2.0, 5.0)
    assert summary["mean_batch"] == 6.0 and summary["errors"] == 2
    assert summary["cpu_us_per_req"] == 170.0
    assert summary["cpu_roles"] == {"runner": 50.0, "api": 120.0, "other": 0.0}


def test_the_in_process_limit_is_the_median_of_its_rounds():
    rounds = [{"1": 500.0, "32": 7000.0}, {"1": 700.0, "32": 4000.0}, {"1": 600.0, "32": 4500.0}]
    assert bench.median_limit(rounds) == {"1": 600.0, "32": 4500.0}
    assert bench.median_limit([]) == {}


def test_missing_wrk_is_explained(monkeypatch, capsys):
    monkeypatch.setattr(wrk, "find_wrk", lambda: None)
    assert bench.main(["--models", "tiny"]) != 0
    assert "apt-get install -y wrk" in capsys.readouterr().err


@pytest.mark.slow
def test_every_system_serves_the_image_model_and_answers_alike(tmp_path):
    if wrk.find_wrk() is None:
        pytest.fail(wrk.INSTALL_HINT + " (make test does)")
    if not servers.PEERS_PYTHON.exists():
        pytest.fail(f"{servers.PEERS_PYTHON} is missing: run `make peers-venv` (make test does)")
    out = tmp_path / "results.json"
    argv = ["--models", "image", "--concurrency", "4", "--duration", "1", "--rounds", "1", "--warmup", "0"]
    argv += ["--inproc-seconds", "0.2", "--workdir", str(tmp_path), "--out", str(out)]
    assert bench.main(argv) == 0  # it returns 1 when a system answers differently from the model
    result = json.loads(out.read_text())
    rows = {row["system"]: row for row in result["rows"]}
    assert set(rows) == {"ours", "original", "bentoml", "mosec", "litserve", "floor"}
    for row in rows.values():  # errors counts non-2xx answers: floor answered 200 too
        assert row["model"] == "image" and row["errors"] == 0 and row["rps"] > 0
        # Every system spends CPU on a request; a 1 s run is tens of clock ticks, so none can read 0.
        assert row["cpu_us_per_req"] > 0 and row["runs"][0]["cpu_us_per_req"] > 0
    ours = rows["ours"]["runs"][0]
    assert set(ours["cpu_roles"]) == {"runner", "api", "other"}
    assert ours["cpu_roles"]["runner"] > 0 and ours["cpu_roles"]["api"] > 0
    assert sum(ours["cpu_roles"].values()) <= ours["cpu_us_per_req"] * (1 + 1e-9)
    assert sum(ours["cpu_roles"].values()) == pytest.approx(ours["cpu_us_per_req"])  # every process has a role
    assert rows["mosec"]["cpu_roles"]["front"] > 0 and rows["mosec"]["cpu_roles"]["workers"] > 0
    assert rows["ours"]["x_mosec"] > 0 and rows["ours"]["x_litserve"] > 0
    assert "x_floor" not in rows["ours"] and "×floor" not in result["table"]  # a reference, not a peer
    assert "| server CPU µs/req |" in result["table"] and "| floor | image | 4 |" in result["table"]
    assert set(result["inproc"]["image"]) == {"1", "32", "decode"}
    assert "×mosec" in result["table"] and "in-process JSON → tensor | image" in result["table"]


def test_floor_answers_200_and_its_cpu_per_request_is_measured(tmp_path):
    # The real floor app under uvicorn, loaded by real wrk for a second.
    if wrk.find_wrk() is None:
        pytest.fail(wrk.INSTALL_HINT + " (make test does)")
    model = models.build("tiny", tmp_path / "models")
    assert "floor" in bench.parse_args([]).systems  # in make bench's default run
    with servers.serve("floor", model.path, model.body, tmp_path) as server:
        assert servers.get(server.url + "/readyz") == (200, '"ok"')
        status, raw = servers.post(server.endpoint, model.body.read_bytes())
        assert status == 200 and set(json.loads(raw)) == {"dtype", "shape", "values"}
        assert servers.post(server.endpoint, b"{not json")[0] == 400
        bench.check_answers({"floor": server}, model)  # no model answer to compare: not checked, not refused
        result = bench.one_run("floor", server, model, 8, 1)
    assert result["errors"] == 0 and result["requests"] > 0
    assert result["cpu_us_per_req"] > 0 and "cpu_roles" not in result  # floor has no roles, only processes
    workers = [p for p in result["cpu_processes"] if "spawn_main" in p["command"]]
    assert len(workers) == 2 and sum(p["us_per_req"] for p in workers) > 0  # uvicorn's 2 workers did the work
    assert sum(p["us_per_req"] for p in result["cpu_processes"]) == pytest.approx(result["cpu_us_per_req"])


def test_cpu_per_request_counts_a_whole_process_tree_by_role():
    # A real process group: a parent that starts a child which spins 0.3 s of CPU and then sleeps, both read from
    # /proc as the bench reads a server.
    spin = "import time; t = time.process_time(); exec('while time.process_time() - t < 0.3: pass'); time.sleep(30)"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {spin!r}]); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        before = cpu.tree(parent.pid)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(p.cpu_s for p in cpu.tree(parent.pid).values()) < 0.25:
            time.sleep(0.05)
        time.sleep(0.3)  # the spin is done: the count is final
        after = cpu.tree(parent.pid)
        figures = cpu.per_request("mosec", parent.pid, before, after, 1000)
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(10)
    assert len(after) == 2 and figures["cpu_us_per_req"] >= 250  # ~0.3 s over 1000 requests, less a tick or so
    assert set(figures["cpu_roles"]) == {"other", "workers"} and figures["cpu_roles"]["workers"] >= 250
    assert cpu.per_request("floor", parent.pid, before, after, 0) == {"cpu_us_per_req": None}


def test_a_peer_that_answers_differently_fails_the_bench(tmp_path):
    # A real mosec serving a different model stands in for a peer that decodes or encodes wrongly.
    model = models.build("tiny", tmp_path / "models")
    wrong = tmp_path / "wrong.torch"
    torch.jit.save(torch.jit.script(torch.nn.Linear(69, 2).double()), str(wrong))
    mismatch = r"mosec tiny at http://127\.0\.0\.1:\d+/inference: values differ"
    with (
        servers.serve("mosec", wrong, model.body, tmp_path) as server,
        pytest.raises(bench.AnswerMismatch, match=mismatch),
    ):
        bench.check_answers({"mosec": server}, model)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
