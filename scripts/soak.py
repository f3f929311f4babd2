"""Soak: a bounded run at fixed concurrency with a mix of good and bad requests against a real server.

Passes (exit 0) when every request got an answer with the status its kind expects, no process of the server was
replaced, and the resident memory of every process grew by less than --max-growth between the end of the warm-up
and the end of the run. Starts its own ``bentoml serve`` on loopback unless --url is given.

    make soak                    # 5 minutes
    SOAK_SECONDS=30 make soak    # the short version that `make test` runs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.fixtures.server import serving  # noqa: E402

IRIS = [1.0380048, 0.5586108, 1.1037828, 1.712096]
MAX_REQUEST_BYTES = 64 * 1024


def chain_hex(values: list[float]) -> str:
    from eth_abi import encode

    return encode(["int256[]"], [[int(v * 10**18) for v in values]]).hex()


def request_kinds() -> dict[str, tuple[int, bytes, int]]:
    """name -> (weight, body, expected status)."""

    def body(obj: object) -> bytes:
        return json.dumps(obj).encode()

    offchain = {"source": 1, "data": {"dtype": "float", "values": [IRIS]}}
    return {
        "good": (40, body(offchain), 200),
        "good batch of 8": (10, body({"source": 1, "data": {"dtype": "double", "values": [IRIS] * 8}}), 200),
        "good chain": (10, body({"source": 0, "destination": 0, "data": chain_hex(IRIS)}), 200),
        "not JSON": (5, b"{not json", 400),
        "ragged": (5, body({"source": 1, "data": {"dtype": "float", "values": [IRIS, [1.0]]}}), 400),
        "unknown dtype": (5, body({"source": 1, "data": {"dtype": "float128", "values": [IRIS]}}), 400),
        "proof": (5, body({**offchain, "requires_proof": True}), 400),
        "wrong features": (10, body({"source": 1, "data": {"dtype": "float", "values": [[1.0, 2.0]]}}), 422),
        "too large": (2, body({**offchain, "padding": "x" * MAX_REQUEST_BYTES}), 413),
        "deep": (3, b"[" * 2000 + b"]" * 2000, 400),
        "NaN": (5, b'{"source":1,"data":{"dtype":"float","values":[[NaN,1,1,1]]}}', 400),
    }


def tree(pid: int) -> dict[int, psutil.Process]:
    root = psutil.Process(pid)
    return {p.pid: p for p in [root, *root.children(recursive=True)]}


def rss(processes: dict[int, psutil.Process]) -> dict[int, int]:
    return {pid: p.memory_info().rss for pid, p in processes.items() if p.is_running()}


def describe(process: psutil.Process) -> str:
    line = " ".join(process.cmdline())
    if "--service-name WorkflowRunner" in line:
        return "runner"
    if "--worker-id " in line:  # the API workers (the runner matched above)
        return "api worker " + line.split("--worker-id ")[-1].split()[0]
    return "arbiter"


async def soak(url: str, pid: int, seconds: float, warmup: float, concurrency: int, seed: int) -> dict:
    kinds = request_kinds()
    names = list(kinds)
    weights = [kinds[n][0] for n in names]
    rng = random.Random(seed)
    statuses: Counter[str] = Counter()
    unexpected: Counter[str] = Counter()
    latencies: list[float] = []
    started = time.monotonic()
    deadline = started + seconds
    processes = tree(pid)
    baseline: dict[int, int] = {}
    timeout = aiohttp.ClientTimeout(total=60)

    async def caller(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            name = rng.choices(names, weights)[0]
            _, body, expected = kinds[name]
            sent = time.monotonic()
            try:
                async with session.post(f"{url}/service_output", data=body) as response:
                    payload = await response.read()
                    status = response.status
                    if status != 200:
                        error = json.loads(payload)
                        if error.get("code") != str(status):
                            status = -1  # not the contract's error body
            except (aiohttp.ClientError, TimeoutError, ValueError) as e:
                status, payload = -2, type(e).__name__.encode()
            latencies.append(time.monotonic() - sent)
            statuses[f"{name}: {status}"] += 1
            if status != expected:
                unexpected[f"{name}: expected {expected}, got {status} {payload[:120]!r}"] += 1

    async def sampler() -> None:
        nonlocal baseline
        await asyncio.sleep(warmup)
        baseline = rss(processes)
        print(f"warm-up done after {warmup:.0f}s: {len(latencies)} requests", flush=True)

    timeline: list[dict] = []

    async def recorder() -> None:
        # RSS over time tells a one-time rise to a working set (flat afterwards) from a leak (steady growth).
        while time.monotonic() < deadline:
            sample = {describe(processes[p]): round(b / 2**20, 1) for p, b in rss(processes).items()}
            timeline.append({"t": round(time.monotonic() - started), "requests": len(latencies), "rss_mib": sample})
            await asyncio.sleep(min(30.0, max(seconds / 20, 1.0)))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(sampler(), recorder(), *(caller(session) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    final = rss(processes)
    replaced = sorted(set(tree(pid)) ^ set(processes))
    memory = {
        f"{describe(processes[p])} (pid {p})": {
            "after_warmup_mib": round(baseline.get(p, 0) / 2**20, 1),
            "end_mib": round(final.get(p, 0) / 2**20, 1),
            "growth": round(final.get(p, 0) / baseline[p] - 1, 4) if baseline.get(p) else None,
        }
        for p in processes
    }
    latencies.sort()
    return {
        "seconds": round(elapsed, 1),
        "warmup_seconds": warmup,
        "concurrency": concurrency,
        "requests": len(latencies),
        "requests_per_second": round(len(latencies) / elapsed, 1),
        "latency_ms": {
            "p50": round(latencies[len(latencies) // 2] * 1000, 1),
            "p99": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
            "max": round(latencies[-1] * 1000, 1),
        },
        "statuses": dict(sorted(statuses.items())),
        "unexpected": dict(unexpected),
        "processes_replaced": replaced,
        "memory": memory,
        "memory_timeline": timeline,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", 300)))
    parser.add_argument("--warmup", type=float, help="seconds before the memory baseline (default: half, at most 60)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-growth", type=float, default=0.10, help="allowed RSS growth per process after warm-up")
    parser.add_argument("--url", help="soak a running server instead of starting one (needs --pid)")
    parser.add_argument("--pid", type=int, help="pid of that server's `bentoml serve`, to watch its memory")
    parser.add_argument("--report", type=Path, help="write the result as JSON here")
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    warmup = args.warmup if args.warmup is not None else min(60.0, args.seconds / 2)

    def run(url: str, pid: int) -> dict:
        return asyncio.run(soak(url, pid, args.seconds, warmup, args.concurrency, args.seed))

    if args.url:
        if not args.pid:
            parser.error("--url needs --pid")
        result = run(args.url.rstrip("/"), args.pid)
    else:
        with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
            env = {"MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)}
            with serving(env, Path(tmp)) as server:
                result = run(server.url, server.process.pid)

    growth = {name: m["growth"] for name, m in result["memory"].items()}
    result["max_growth_allowed"] = args.max_growth
    result["passed"] = bool(
        result["requests"]
        and not result["unexpected"]
        and not result["processes_replaced"]
        and all(g is not None and g < args.max_growth for g in growth.values())
    )
    text = json.dumps(result, indent=2)
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    print("soak " + ("passed" if result["passed"] else "FAILED"), flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
