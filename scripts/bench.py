"""Load benchmark: our service against the service we replace, plain BentoML and the in-process limit.

    make bench                                   # everything (~8 minutes on 2 cores)
    make bench BENCH_ARGS="--models tiny --concurrency 64 --rounds 2"

For each model, every system is started at once; each round then measures the in-process limit and runs every
concurrency on every system in turn, so a slow spell of a shared machine hits all systems alike. Each cell
reports the median over the rounds.

Needs wrk (Debian: apt-get install -y wrk). Loopback only; every run is bounded in time. Prints one table and
writes the same rows to a JSON file (--out, default build/bench/results.json). See docs/performance.md.
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

from scripts.bench import models, servers, wrk  # noqa: E402

BASELINES = ("original", "bentoml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(models.SPECS), choices=list(models.SPECS))
    p.add_argument("--systems", nargs="+", default=["ours", *BASELINES], choices=list(servers.SYSTEMS))
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    p.add_argument("--rounds", type=int, default=3, help="runs per cell, interleaved across systems; median kept")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load at c=16 before the runs")
    p.add_argument("--no-inproc", action="store_true", help="skip the in-process limit")
    p.add_argument("--inproc-seconds", type=float, default=3.0)
    p.add_argument("--workdir", type=Path, help="where models and logs go (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=REPO / "build" / "bench" / "results.json")
    return p.parse_args(argv)


def inproc(model: models.BenchModel, seconds: float) -> dict[str, float]:
    cmd = [sys.executable, "-m", "scripts.bench.inproc", str(model.path), "--features", str(model.features)]
    cmd += ["--dtype", model.dtype, "--threads", "2", "--batch", "1", "32", "--seconds", str(seconds)]
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
            running[system] = server = stack.enter_context(servers.serve(system, model.path, work))
            print(f"# {system} {model.name}: ready in {server.ready_s:.1f}s", flush=True)
        if args.warmup > 0:
            for server in running.values():
                wrk.run(server.url, model.body, 16, args.warmup)
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
                          f"p99 {result['p99_ms']:.2f} ms, errors {result['errors']}", flush=True)  # fmt: skip
        rows = [
            {"system": system, "model": model.name, "concurrency": c, **summarise(results),
             "ready_s": running[system].ready_s, "runs": results}
            for (system, c), results in sorted(runs.items(), key=lambda kv: (args.systems.index(kv[0][0]), kv[0][1]))
        ]  # fmt: skip
        return rows, limits


def median_limit(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Per batch size, the median of the rounds' in-process samples/s."""
    return {batch: statistics.median(r[batch] for r in rounds) for batch in (rounds[0] if rounds else {})}


def _rates(limit: dict[str, float]) -> str:
    return ", ".join(f"b{batch} {rate:.0f} samples/s" for batch, rate in limit.items())


def one_run(system: str, server: servers.Running, model: models.BenchModel, c: int, seconds: float) -> dict:
    before = servers.batch_totals(server.url) if system == "ours" else None
    result = wrk.run(server.url, model.body, c, seconds)
    if before is not None:
        after = servers.batch_totals(server.url)
        calls = after[1] - before[1]
        result["mean_batch"] = (after[0] - before[0]) / calls if calls else None
    time.sleep(0.5)
    return result


def summarise(results: list[dict]) -> dict:
    """Median of each figure over the rounds; errors are summed, so one failing round shows."""
    out = {}
    for key in ("rps", "p50_ms", "p99_ms", "mean_batch"):
        values = [r[key] for r in results if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
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
    head = "| system | model | c | req/s | p50 ms | p99 ms | errors | mean batch | ×original | ×bentoml | ×inproc b32 |"
    lines = [head, "|" + "---|" * 3 + "---:|" * 8]

    def num(value, fmt):
        return "–" if value is None else format(value, fmt)

    for r in rows:
        lines.append(
            f"| {r['system']} | {r['model']} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | "
            f"{r['p99_ms']:.2f} | {r['errors']} | {num(r.get('mean_batch'), '.1f')} | "
            + " | ".join(num(r.get(k), ".2f") for k in ("x_original", "x_bentoml", "x_inproc32"))
            + " |"
        )
    for name, limit in limits.items():
        for batch, sps in limit.items():
            cells = [f"in-process b{batch} (2 threads)", name, "–", f"{sps:.0f} samples/s", "–", "–", "–", batch]
            lines.append("| " + " | ".join(map(str, cells)) + " | – | – | – |")
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
            model_rows, limit_rounds[name] = bench_model(model, args, work)
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
