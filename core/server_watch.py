"""Workers that stop when their ``bentoml serve`` dies: no orphan keeps serving the port.

``bentoml serve`` runs BentoML's process manager (a circus arbiter) inside its own main process; the API workers and
the runner are its children. When that main process is stopped with SIGTERM it stops them (graceful shutdown,
docs/reliability.md). When it dies without that chance (SIGKILL, the OOM killer, a crash) nothing tells the
children: they are re-parented to init and go on answering on the inherited listening socket, a server nobody
manages any more, holding the port and the memory of the model, and never restarted if they fail.

So each worker runs a watchdog thread. The main process puts its pid in ``INFERNET_SERVER_PID`` before any worker
starts (``mark_server_process``); a worker compares its parent's pid with it twice a second (``getppid`` is a system
call, no process table is read). Once the server is gone, the worker logs one line and sends itself SIGTERM, so it
stops as on a graceful shutdown (requests in flight finish within SHUTDOWN_TIMEOUT_S, the port closes at once), and
exits hard if that has not ended it after ``grace_s``.

Why not ``prctl(PR_SET_PDEATHSIG)``: it is Linux only; set by the worker itself after exec (circus spawns the
workers; our code runs only once Python has started) it misses a server that died before; and it fires when the
*thread* that forked the worker exits, not the process, so a process manager that spawns from a short-lived thread
would stop healthy workers. A parent's pid is not reused while it has a child, so ``getppid() ==
INFERNET_SERVER_PID`` is an exact test, on any POSIX system.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from core import bentoml_seam

SERVER_PID_VAR = "INFERNET_SERVER_PID"
POLL_S = 0.5  # how late a worker notices its server's death, at most


def mark_server_process() -> None:
    """In ``bentoml serve``'s main process, before any worker starts: the workers inherit its pid."""
    os.environ[SERVER_PID_VAR] = str(os.getpid())


def server_pid() -> int | None:
    """In a worker: the pid of its ``bentoml serve`` while that process is alive and still its parent; None when it
    has died, or when this process is not a worker of a server (in-process use, tests, the main process itself)."""
    pid = _marked_pid()
    if pid is None or os.getppid() != pid:
        return None
    return pid


def exit_with_server(grace_s: float) -> bool:
    """In a worker, first thing in its service's ``__init__`` (before a model load that may take minutes): start the
    watchdog thread. ``grace_s``: seconds the graceful stop gets after the server's death before the worker exits
    with status 1. False (and no thread) when this process is not a worker of a ``bentoml serve``; a worker whose
    server died before this call stops at once."""
    pid = _marked_pid()
    if pid is None:
        return False
    if os.getppid() != pid and _exists(pid):
        # Not the process model this was written for (BentoML 1.4: the workers are the server's children).
        _say(f"this worker (pid {os.getpid()}) is not a child of its bentoml serve (pid {pid}): not watched")
        return False
    threading.Thread(target=_watch, args=(pid, grace_s), name="server-watch", daemon=True).start()
    return True


def _marked_pid() -> int | None:
    """``INFERNET_SERVER_PID``; None when unset, invalid or this process's own (the server itself)."""
    try:
        pid = int(os.environ.get(SERVER_PID_VAR, ""))
    except ValueError:
        return None
    return None if pid == os.getpid() else pid


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(pid: int, grace_s: float) -> None:
    while os.getppid() == pid:
        time.sleep(POLL_S)
    _orphaned(grace_s)


def _orphaned(grace_s: float) -> None:
    _say(
        f"its bentoml serve (pid {os.environ.get(SERVER_PID_VAR)}) has died: this worker (pid {os.getpid()}) "
        f"stops too, within {grace_s:g} s"
    )
    os.kill(os.getpid(), signal.SIGTERM)  # the worker's own graceful stop (uvicorn's handler, the runner's Drain)
    time.sleep(grace_s)
    os._exit(1)  # a graceful stop that hangs still ends


def _say(line: str) -> None:
    # print, not logging: the watchdog may speak before BentoML has configured a worker's logging.
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} [WARNING] [server_watch] {line}", file=sys.stderr, flush=True)


# --- the main process's own bound on a graceful stop ---------------------------------------------------------------
#
# BentoML's process manager gives each worker a day (circus ``graceful_timeout=86400``) to exit after SIGTERM. A
# worker that cannot exit (a runner stopped with SIGSTOP, an event loop stuck in a workflow's pre-processing) held
# the whole server for that long, answering nothing, until the orchestrator's SIGKILL ended it without a word.

SHUTDOWN_MARGIN_S = 4.0  # past SHUTDOWN_TIMEOUT_S; under Kubernetes' 5 s margin (docs/deploy.md), so the line is seen


def bound_shutdown(shutdown_timeout_s: float, before_exit: Callable[[], None] = lambda: None) -> None:
    """In ``bentoml serve``'s main process, before its process manager starts: once that manager begins a stop
    (SIGTERM, SIGINT, SIGQUIT), every worker still alive ``shutdown_timeout_s + SHUTDOWN_MARGIN_S`` seconds later is
    SIGKILLed, one line names each one and what it was doing (stopped by a signal, or running: stuck), and the
    server exits with status 1 after ``before_exit``. A stop that finishes in time is untouched (status 0)."""
    limit_s = shutdown_timeout_s + SHUTDOWN_MARGIN_S
    armed = threading.Event()

    def arm() -> None:  # in the signal handler: start the clock, nothing that blocks
        if not armed.is_set():
            armed.set()
            threading.Thread(target=_enforce, args=(limit_s, before_exit), name="shutdown-bound", daemon=True).start()

    bentoml_seam.on_process_manager_stop(arm)


def _enforce(limit_s: float, before_exit: Callable[[], None]) -> None:
    time.sleep(limit_s)  # a daemon thread: a stop that ends in time ends it with the process
    import psutil  # BentoML's own dependency; imported only here, where a stop has overrun

    left = psutil.Process().children(recursive=True)
    what = ", ".join(_described(p) for p in left) or "no worker is left; the process manager itself did not return"
    _say(
        f"shutdown did not finish within SHUTDOWN_TIMEOUT_S + {SHUTDOWN_MARGIN_S:g} s ({limit_s:g} s): {what}; "
        "killed; exit status 1"
    )
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()  # SIGKILL ends a stopped process too
    before_exit()
    os._exit(1)


def _described(process: Any) -> str:
    import psutil

    try:
        role = "the model runner" if bentoml_seam.is_runner_command(process.cmdline()) else "an API worker"
        state = process.status()
    except psutil.Error:
        return f"a worker (pid {process.pid}, gone meanwhile)"
    if state == psutil.STATUS_STOPPED:
        return f"{role} (pid {process.pid}) is stopped (SIGSTOP or SIGTSTP)"
    return f"{role} (pid {process.pid}) is still running: stuck"
