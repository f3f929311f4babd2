"""Keeps the runner serving for a moment after SIGTERM, until the API workers have sent what they hold.

BentoML's process manager sends SIGTERM to every worker at once. The runner's server would stop accepting
connections at once, so requests that an API worker had received but not yet passed on would fail with 503
although the operator asked for a graceful stop. Instead the runner hands the signal on to its server only once
no call is running and none has arrived for ``idle_s``, or after ``max_s`` at most; calls still running by then are
cancelled (SHUTDOWN_TIMEOUT_S bounds the whole shutdown, docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from core.asgi import bound_uvicorn


class Drain:
    def __init__(self, idle_s: float = 0.5, max_s: float = 30.0) -> None:
        self.idle_s = idle_s
        self.max_s = max_s
        self._active = 0
        self._last = time.monotonic()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                self._last = time.monotonic()

    def install(self) -> bool:
        """Wrap the server's SIGTERM handler; call in the worker's main thread after the server installed its own."""
        if threading.current_thread() is not threading.main_thread():
            return False
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return False

        def deferred(signum: int, frame: Any) -> None:
            threading.Thread(target=self._pass_on, args=(previous, signum, frame), daemon=True).start()

        signal.signal(signal.SIGTERM, deferred)
        return True

    def _pass_on(self, handler: Any, signum: int, frame: Any) -> None:
        deadline = time.monotonic() + self.max_s
        while time.monotonic() < deadline:
            with self._lock:
                idle = self._active == 0 and time.monotonic() - self._last >= self.idle_s
            if idle:
                break
            time.sleep(0.05)
        # A call that arrived just before the hand-over still gets the rest of the bound, and no more.
        bound_uvicorn(handler, max(1.0, deadline - time.monotonic()))
        handler(signum, frame)  # uvicorn's handler only sets flags its main loop polls
