"""Server CPU per request: utime + stime of every process of a system, from /proc (Linux), over one wrk run.

Where a target cannot be met on the bench's 2 cores, this says what each process of each system spends on a
request, measured in the same run as the requests/s it explains. Resolution: the kernel counts CPU time in clock
ticks (SC_CLK_TCK, 100 a second here: 10 ms), so each process's figure is off by up to one tick per run; over a
5 s run of thousands of requests that is a few µs per request, well under the differences it is read for. A short
run of few requests (c=1 on the heavy model, the smoke test's 1 s runs) is correspondingly coarser.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from scripts.bench.servers import BEFORE

TICK_S = 1 / os.sysconf("SC_CLK_TCK")
# Roles of a system's processes, for the systems that have them; any other system reports its total only.
RUNNER_MARK = "--service-name WorkflowRunner"
API_WORKER_MARK = "_bentoml_impl.worker.service"


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    start: int  # ticks after boot; with the pid it names one process even if the pid is reused
    cpu_s: float  # utime + stime, seconds
    comm: str
    cmdline: str


def read(pid: int) -> Proc | None:
    """One process's /proc figures, or None when it has exited (or cannot be read)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    # comm is in parentheses and may itself hold spaces or parentheses: split around the last ")".
    head, rest = stat.rsplit(")", 1)
    f = rest.split()  # f[0] is field 3 (state): field n is f[n - 3]
    cpu = (int(f[11]) + int(f[12])) * TICK_S
    return Proc(pid, int(f[1]), int(f[2]), int(f[19]), cpu, head.split("(", 1)[1], cmdline)


def tree(root: int) -> dict[tuple[int, int], Proc]:
    """Every live process in ``root``'s process group or descended from it, keyed by (pid, start).

    Read afresh at each run: a server may restart a worker between runs. ``root`` is the Popen that
    servers.serve starts in a session of its own, so its group is the system and nothing else.
    """
    procs = [p for p in map(read, (int(d) for d in os.listdir("/proc") if d.isdigit())) if p is not None]
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    found = {p.pid: p for p in procs if p.pgid == root or p.pid == root}
    stack = list(found.values())
    while stack:  # descendants that left the group (a worker that made a session of its own) still count
        for child in children.get(stack.pop().pid, []):
            if child.pid not in found:
                found[child.pid] = child
                stack.append(child)
    return {(p.pid, p.start): p for p in found.values()}


def role(system: str, root: int, proc: Proc) -> str | None:
    """Which part of ``system`` ``proc`` is: None for a system without roles."""
    if system in ("ours", BEFORE):  # bentoml serve: its arbiter (root), the runner, the API workers
        if RUNNER_MARK in proc.cmdline:
            return "runner"
        return "api" if API_WORKER_MARK in proc.cmdline else "other"
    if system == "mosec":  # python mosec_app.py (root) starts the Rust front and the Python workers
        if proc.comm == "mosec":
            return "front"
        return "other" if proc.pid == root else "workers"
    return None


def per_request(
    system: str, root: int, before: dict[tuple[int, int], Proc], after: dict[tuple[int, int], Proc], requests: int
) -> dict:
    """Server CPU µs per completed request between two ``tree`` snapshots: the total, per role, per process.

    A process born during the run counts all its CPU; one that exited during it loses what it spent after
    ``before`` (a worker restarting mid-run, which the errors column would show).
    """
    if not requests:
        return {"cpu_us_per_req": None}
    roles: dict[str, float] = {}
    processes = []
    for key, proc in sorted(after.items()):
        spent = proc.cpu_s - (before[key].cpu_s if key in before else 0.0)
        us = spent / requests * 1e6
        name = role(system, root, proc)
        if name is not None:
            roles[name] = roles.get(name, 0.0) + us
        processes.append({"pid": proc.pid, "role": name, "command": proc.cmdline[:120], "us_per_req": us})
    out: dict = {"cpu_us_per_req": sum(p["us_per_req"] for p in processes), "cpu_processes": processes}
    if roles:  # "other" (the arbiter or launcher, idle under load) last
        out["cpu_roles"] = dict(sorted(roles.items(), key=lambda kv: kv[0] == "other"))
    return out
