"""Load benchmark: our service against the service we replace, plain BentoML, mosec, LitServe and the in-process
limit.

    make bench                                   # everything (~20 minutes on 2 cores)
    make bench BENCH_ARGS="--models tiny --concurrency 64 --rounds 2"
    git worktree add /tmp/before main && make bench BENCH_ARGS="--before /tmp/before --systems ours"  # a change's A/B

For each model, every system is started at once and must answer the model's request as the model itself does
(the bench fails otherwise); each round then measures the in-process limit and runs every concurrency on every
system in turn, so a slow spell of a shared machine hits all systems alike. Each cell reports the median over the
rounds. Every run also measures the server CPU each system spends per request (scripts/bench/cpu.py), and the
reference system `floor` (scripts/bench/floor_app.py, no peer) shows what the same cores spend in a bare Python
HTTP tier that only parses the body.

Needs wrk (Debian: apt-get install -y wrk) and, for litserve, .venv-peers (`make peers-venv`). Loopback only;
every run is bounded in time. Prints one table and writes the same rows to a JSON file (--out, default
build/bench/results.json). See docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.bench import cpu, models, servers, wrk  # noqa: E402

BASELINES = (servers.BEFORE, "original", "bentoml", "mosec", "litserve")
# Largest difference from the model's own answer, as a fraction of the answer's scale: batched forwards may round
# differently from a lone one.
ANSWER_TOLERANCE = 1e-4


class AnswerMismatch(RuntimeError):
    """A system answered the model's request differently from the model itself."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(models.SPECS), choices=list(models.SPECS))
    p.add_argument("--systems", nargs="+", default=list(servers.SYSTEMS), choices=[*servers.SYSTEMS, servers.BEFORE])
    p.add_argument(
        "--before",
        type=Path,
        help="also serve this service from another checkout (e.g. `git worktree add /tmp/before main`): "
        "system 'before', and a ×before column",
    )
    p.add_argument(
        "--peer-max-batch-size",
        type=int,
        help="mosec's and LitServe's largest batch (default: ours, MAX_BATCH_SIZE); they wait up to 5 ms to fill it",
    )
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    p.add_argument("--rounds", type=int, default=3, help="runs per cell, interleaved across systems; median kept")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load at c=16 before the runs")
    p.add_argument("--no-inproc", action="store_true", help="skip the in-process limit")
    p.add_argument("--inproc-seconds", type=float, default=3.0)
    p.add_argument("--workdir", type=Path, help="where models and logs go (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=REPO / "build" / "bench" / "results.json")
    args = p.parse_args(argv)
    if args.peer_max_batch_size is not None:
        if args.peer_max_batch_size < 1:
            p.error("--peer-max-batch-size must be at least 1")
        os.environ[servers.PEER_MAX_BATCH_SIZE] = str(args.peer_max_batch_size)
    if args.before is not None:
        if not (args.before / "service.py").is_file():
            p.error(f"--before {args.before}: no service.py there")
        os.environ[servers.BEFORE_TREE] = str(args.before.resolve())
        if servers.BEFORE not in args.systems:
            args.systems.insert(1, servers.BEFORE)
    elif servers.BEFORE in args.systems:
        p.error("system 'before' needs --before PATH")
    return args


def inproc(model: models.BenchModel, seconds: float) -> dict[str, float]:
    cmd = [sys.executable, "-m", "scripts.bench.inproc", str(model.path), "--shape", *map(str, model.shape)]
    cmd += ["--body", str(model.body), "--dtype", model.dtype, "--threads", "2", "--batch", "1", "32"]
    cmd += ["--seconds", str(seconds)]
    best: dict[str, float] = {}
    # Spinning OpenMP threads (ACTIVE) win on an idle box and collapse when another process takes a core;
    # the limit is the better of the two policies, so it is never understated.
    for policy in ("ACTIVE", "PASSIVE"):
        env = {**os.environ, "OMP_WAIT_POLICY": policy}
        done = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True, timeout=60 + 9 * seconds
        )
        for batch, rate in json.loads(done.stdout.strip().splitlines()[-1]).items():
            best[batch] = max(best.get(batch, 0.0), float(rate))
    return best


def bench_model(model: models.BenchModel, args: argparse.Namespace, work: Path) -> tuple[list[dict], list[dict]]:
    """The rows of every system at every concurrency, and each round's in-process limit."""
    with contextlib.ExitStack() as stack:
        running = {}
        for system in args.systems:  # one at a time: start-up is CPU-heavy and ready_s is reported
            running[system] = server = stack.enter_context(servers.serve(system, model.path, model.body, work))
            print(f"# {system} {model.name}: ready in {server.ready_s:.1f}s", flush=True)
        check_answers(running, model)
        if args.warmup > 0:
            for server in running.values():
                wrk.run(server.endpoint, model.body, 16, args.warmup)
        runs: dict[tuple[str, int], list[dict]] = {}
        limits: list[dict[str, float]] = []
        for round_ in range(1, args.rounds + 1):
            # In every round too, so that the ratio to it compares figures from the same minutes of a shared box.
            if not args.no_inproc:
                limits.append(inproc(model, args.inproc_seconds))
                print(f"  round {round_} in-process: {_rates(limits[-1])}", flush=True)
            for c in args.concurrency:
                for system, server in running.items():
                    result = one_run(system, server, model, c, args.duration)
                    runs.setdefault((system, c), []).append(result)
                    print(f"  round {round_} {system} c={c}: {result['rps']:.0f} rps, p50 {result['p50_ms']:.2f} ms, "
                          f"p99 {result['p99_ms']:.2f} ms, errors {result['errors']}, {_cpu(result)}",
                          flush=True)  # fmt: skip
        rows = [
            {"system": system, "model": model.name, "concurrency": c, **summarise(results),
             "ready_s": running[system].ready_s, "runs": results}
            for (system, c), results in sorted(runs.items(), key=lambda kv: (args.systems.index(kv[0][0]), kv[0][1]))
        ]  # fmt: skip
        return rows, limits


def expected_answer(model: models.BenchModel) -> dict:
    """The model's own forward on its request body, in this process, in the contract's answer shape."""
    import torch

    body = json.loads(model.body.read_text())
    x = torch.tensor(body["data"]["values"], dtype={"float": torch.float32, "double": torch.float64}[model.dtype])
    with torch.inference_mode():
        out = torch.jit.load(str(model.path)).eval()(x)
    return {"dtype": model.dtype, "shape": list(out.shape), "values": out.tolist()}


def answer_mismatch(answer: object, expected: dict) -> str | None:
    """Why ``answer`` is not ``expected`` (dtype, shape, values within ANSWER_TOLERANCE), or None."""
    import numpy as np

    if not isinstance(answer, dict) or not {"dtype", "shape", "values"} <= answer.keys():
        return f"not a {{dtype, shape, values}} object: {str(answer)[:200]}"
    for key in ("dtype", "shape"):
        if answer[key] != expected[key]:
            return f"{key} {answer[key]!r}, expected {expected[key]!r}"
    try:
        got = np.asarray(answer["values"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        return f"values are not numbers of the answer's shape: {str(answer['values'])[:200]}"
    want = np.asarray(expected["values"], dtype=np.float64).reshape(-1)
    if got.shape != want.shape:
        return f"{got.size} values, expected {want.size}"
    worst = float(np.max(np.abs(got - want)))
    if worst > ANSWER_TOLERANCE * max(1.0, float(np.max(np.abs(want)))):
        return f"values differ from the model's own by up to {worst:.3g}"
    return None


def check_answers(running: dict[str, servers.Running], model: models.BenchModel) -> None:
    """Every system answers the model's request as the model itself does, so all answer alike; raises AnswerMismatch."""
    expected, body, problems = expected_answer(model), model.body.read_bytes(), []
    # A reference (floor) runs no model: its fixed answer is not the model's, so there is nothing to compare.
    checked = {system: server for system, server in running.items() if system not in servers.REFERENCES}
    for system, server in checked.items():
        status, raw = servers.post(server.endpoint, body)
        try:
            why = f"status {status}: {raw[:200]!r}" if status != 200 else answer_mismatch(json.loads(raw), expected)
        except ValueError:
            why = f"not JSON: {raw[:200]!r}"
        if why:
            problems.append(f"{system} {model.name} at {server.endpoint}: {why}")
    if problems:
        raise AnswerMismatch("answers differ:\n" + "\n".join(problems))
    print(f"# {model.name}: {', '.join(checked)} answer alike", flush=True)


def median_limit(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Per batch size, the median of the rounds' in-process samples/s."""
    return {batch: statistics.median(r[batch] for r in rounds) for batch in (rounds[0] if rounds else {})}


def _rates(limit: dict[str, float]) -> str:
    return ", ".join(
        f"JSON → tensor {rate:.0f} req/s" if batch == "decode" else f"b{batch} {rate:.0f} samples/s"
        for batch, rate in limit.items()
    )


def _cpu(result: dict) -> str:
    """'server CPU T µs/req (role r, ...)' of one run or a summarised row."""
    if result.get("cpu_us_per_req") is None:
        return "server CPU –"
    roles = ", ".join(f"{name} {us:.0f}" for name, us in result.get("cpu_roles", {}).items())
    return f"server CPU {result['cpu_us_per_req']:.0f} µs/req" + (f" ({roles})" if roles else "")


def one_run(system: str, server: servers.Running, model: models.BenchModel, c: int, seconds: float) -> dict:
    """wrk's figures, the server CPU per request (cpu.per_request) and, for ours, the mean runner batch."""
    before = servers.batch_totals(server.url) if system == "ours" else None
    # The tree is read at every run, just around wrk: a server may have restarted a worker since the last one.
    # The /metrics scrape above is outside the window, so it is not charged to the requests.
    root = server.process.pid
    procs_before = cpu.tree(root)
    result = wrk.run(server.endpoint, model.body, c, seconds)
    result.update(cpu.per_request(system, root, procs_before, cpu.tree(root), result["requests"]))
    if before is not None:
        after = servers.batch_totals(server.url)
        calls = after[1] - before[1]
        result["mean_batch"] = (after[0] - before[0]) / calls if calls else None
    time.sleep(0.5)
    return result


def summarise(results: list[dict]) -> dict:
    """Median of each figure over the rounds; errors are summed, so one failing round shows."""
    out = {}
    for key in ("rps", "p50_ms", "p99_ms", "mean_batch", "cpu_us_per_req"):
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    # Each role's own median: they need not add up to the total's median exactly.
    roles: dict[str, list[float]] = {}
    for r in results:
        for name, us in r.get("cpu_roles", {}).items():
            roles.setdefault(name, []).append(us)
    if roles:
        out["cpu_roles"] = {name: statistics.median(values) for name, values in roles.items()}
    out["errors"] = sum(r["errors"] for r in results)
    return out


def add_ratios(rows: list[dict], limits: dict[str, dict[str, float]]) -> None:
    index = {(r["system"], r["model"], r["concurrency"]): r for r in rows}
    for row in rows:
        if row["system"] != "ours":
            continue
        for base in BASELINES:
            other = index.get((base, row["model"], row["concurrency"]))
            if other and other["rps"]:
                row[f"x_{base}"] = row["rps"] / other["rps"]
        limit = limits.get(row["model"], {}).get("32")
        if limit:
            row["x_inproc32"] = row["rps"] / limit


def table(rows: list[dict], limits: dict[str, dict[str, float]]) -> str:
    # ×before only in a run that served the other checkout.
    bases = [b for b in BASELINES if b != servers.BEFORE or any(r["system"] == b for r in rows)]
    ratios = [*(f"x_{base}" for base in bases), "x_inproc32"]
    head = "| system | model | c | req/s | p50 ms | p99 ms | errors | mean batch | server CPU µs/req | "
    head += " | ".join(f"×{base}" for base in bases) + " | ×inproc b32 |"
    lines = [head, "|" + "---|" * 3 + "---:|" * (6 + len(ratios))]
    blank = " | –" * len(ratios) + " |"

    def num(value, fmt):
        return "–" if value is None else format(value, fmt)

    for r in rows:
        lines.append(
            f"| {r['system']} | {r['model']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['errors']} | {num(r.get('mean_batch'), '.1f')} | "
            f"{num(r.get('cpu_us_per_req'), '.0f')} | " + " | ".join(num(r.get(k), ".2f") for k in ratios) + " |"
        )
    for name, limit in limits.items():
        for batch, rate in limit.items():
            if batch == "decode":  # one request's orjson.loads + workflows.tensors.decode, one thread
                per_request = f"{rate:.0f} req/s ({1e6 / rate:.0f} µs)"
                cells = ["in-process JSON → tensor", name, "–", per_request, "–", "–", "–", 1, "–"]
            else:
                cells = [f"in-process b{batch} (2 threads)", name, "–", f"{rate:.0f} samples/s", "–", "–", "–", batch]
                cells.append("–")
            lines.append("| " + " | ".join(map(str, cells)) + blank)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wrk_bin = wrk.find_wrk()
    if wrk_bin is None:
        print(wrk.INSTALL_HINT, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        built = {name: models.build(name, work / "models") for name in args.models}
        limits: dict[str, dict[str, float]] = {}
        limit_rounds: dict[str, list[dict[str, float]]] = {}
        rows: list[dict] = []
        for name, model in built.items():
            try:
                model_rows, limit_rounds[name] = bench_model(model, args, work)
            except AnswerMismatch as e:
                print(e, file=sys.stderr)
                return 1
            rows += model_rows
            if limit_rounds[name]:
                limits[name] = median_limit(limit_rounds[name])
                print(f"# in-process {name} (median of the rounds): {_rates(limits[name])}", flush=True)
    add_ratios(rows, limits)
    text = table(rows, limits)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result = {"settings": settings, "rows": rows, "inproc": limits, "inproc_rounds": limit_rounds, "table": text}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"# written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
