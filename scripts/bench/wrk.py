"""Running wrk with post.lua and reading its JSON summary."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

POST_LUA = Path(__file__).with_name("post.lua")
INSTALL_HINT = "wrk is not installed; on Debian/Ubuntu: sudo apt-get update && sudo apt-get install -y wrk"


def find_wrk() -> str | None:
    return shutil.which("wrk")


def parse(output: str) -> dict[str, float]:
    """The numbers post.lua prints, in requests/s and milliseconds; errors = non-2xx + socket errors."""
    for line in output.splitlines():
        if line.startswith("BENCH_JSON "):
            raw = json.loads(line[len("BENCH_JSON ") :])
            break
    else:
        raise ValueError(f"no BENCH_JSON line in wrk output:\n{output[-2000:]}")
    seconds = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "rps": raw["requests"] / seconds if seconds else 0.0,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "errors": raw["status"] + raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        "non_2xx": raw["status"],
        "socket_errors": raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
    }


def run(url: str, body: Path, connections: int, seconds: float, wrk: str = "wrk") -> dict[str, float]:
    """POST ``body`` to ``url`` (the system's route) from ``connections`` connections for ``seconds``."""
    # One client thread: it keeps up with every system here and leaves the 2 cores to the servers.
    # wrk takes whole seconds only.
    cmd = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(POST_LUA)]
    cmd += [url, "--", str(body)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True)
    return parse(done.stdout)
