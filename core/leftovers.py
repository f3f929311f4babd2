"""What a ``bentoml serve`` that died without its exit handlers (SIGKILL, the OOM killer) left on disk, removed by
the next server that starts on the same host.

A server's main process makes two directories of its own and removes them at exit: its Prometheus multiprocess
directory (``$BENTOML_HOME/prometheus_multiproc_dir.<host>.<pid>``, core/bentoml_seam.py) and its crash records
(``$TMPDIR/infernet-crashes.<host>.<pid>.<random>``, core/crash_records.py). Killed, it removes neither. A new server
never reads them (each picks a directory of its own), so they pollute neither ``/metrics`` nor the crash records, but
they would pile up, one pair per kill, in a crash-looping container on a kept volume.

Which are dead: the name says which host and process made the directory. On this host a directory is a dead
server's when its process no longer exists, or when the process with that pid started after the directory was
last written (the pid was reused: a container's server is often pid 1 after every restart), or when the directory
is older than the host's last boot. Directories of other hosts (a ``BENTOML_HOME`` on a volume several hosts share)
and of other users are left alone: nothing here can tell whether their server lives.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("core.leftovers")

MAX_SCANNED = 1000  # directories looked at per start: a full /tmp must not delay start-up


def owner_tag() -> str:
    """``<host>.<pid>`` of this process: the part of a directory's name that tells whose it is."""
    return f"{socket.gethostname()}.{os.getpid()}"


def remove_dead(parent: Path, prefix: str, random_tail: bool = False) -> list[Path]:
    """In a server's main process at start-up, before it makes its own: remove the directories
    ``parent/<prefix><host>.<pid>`` (``random_tail``: followed by ``.<random>``, as ``mkdtemp`` names them) whose
    server is dead (module docstring), and returns them. One warning line per directory removed (a server was
    killed: the operator may want to know). Raises nothing."""
    removed: list[Path] = []
    try:
        entries = [entry for _, entry in zip(range(MAX_SCANNED), _matching(parent, prefix))]
    except OSError:  # no such parent yet, or unreadable: nothing of ours to clean
        return removed
    for entry in entries:
        why = _why_dead(entry, entry.name[len(prefix) :], random_tail)
        if why is None:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        if not os.path.exists(entry.path):
            log.warning("removed %s, left by a server that died without its exit (%s)", entry.path, why)
            removed.append(Path(entry.path))
    return removed


def _matching(parent: Path, prefix: str) -> Iterator[os.DirEntry[str]]:
    with os.scandir(parent) as entries:
        for entry in entries:
            if entry.name.startswith(prefix) and entry.is_dir(follow_symlinks=False):
                yield entry


def _why_dead(entry: os.DirEntry[str], tag: str, random_tail: bool) -> str | None:
    """Why the directory's server is dead, or None when it may live (or is not this host's or this user's)."""
    try:
        stat = entry.stat(follow_symlinks=False)
    except OSError:
        return None
    if stat.st_uid != os.getuid():
        return None
    boot_s = _boot_time_s()
    if boot_s is not None and stat.st_mtime < boot_s:
        return "made before this host's last boot"
    parts = tag.rsplit(".", 2 if random_tail else 1)
    if len(parts) != (3 if random_tail else 2) or not parts[1].isdigit():
        return None  # another naming (an older version's): its owner is unknown
    host, pid = parts[0], int(parts[1])
    if host != socket.gethostname():
        return None
    if pid == os.getpid():  # this process's own name: a previous life of it (same pid) only if older than it
        started_s = _started_s(pid)
        return "its pid is this new server's" if started_s is not None and started_s > stat.st_mtime else None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"process {pid} is gone"
    except PermissionError:
        pass  # alive, another user's
    started_s = _started_s(pid)
    if started_s is not None and started_s > stat.st_mtime + 1:  # 1 s: /proc's start time is in clock ticks
        return f"pid {pid} now belongs to a process started later"
    return None


def _boot_time_s() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _started_s(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; None where there is no /proc."""
    boot_s = _boot_time_s()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, starttime; the name may hold spaces
    except (OSError, ValueError, IndexError):
        return None
    return None if boot_s is None else boot_s + ticks / os.sysconf("SC_CLK_TCK")
