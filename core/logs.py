"""The service's own log lines (the packages core, public, runner, workflows) under ``bentoml serve``: written from
INFO up, through BentoML's handler and in its format, and bounded per line of code so that no client can fill the
operator's disk.

    2026-12-01T10:59:00+0000 [INFO] [entry_service:infernet_torch_service:1] 127.0.0.1:50312 400: the request is ...

Why: BentoML's server logging (``configure_server_logging``, run in every process of ``bentoml serve`` before
service.py is imported) sets the root logger to WARNING, which dropped every INFO line of ours (a per-request model
evicted, a batch retried item by item, a client's unreadable request). ``show_service_logs`` runs once at import of
service.py, in every process (the server, each API worker, the runner), after that set-up. The start-up lines of
workflows/progress.py are printed to stderr and are not touched here.

The bound (``RateLimit``, a filter on BentoML's handler): each call site (logger, file, line) writes at most
``LIMIT`` = 10 records per ``WINDOW_S`` = 60 s window, per process; the window opens with the site's first record.
Further records in the window are counted, not written. Once the window has closed, one line at the highest level
among them says ``N similar lines suppressed in the last 60 s (logger line L; the last: ...)``: before the site's next
record, or with any other record through the handler, or at the process's exit, whichever comes first. So a flood
from one call site writes at most 11 lines a minute per process, and the call sites are the code's own (a fixed
set, so the filter's memory is bounded too). WARNING and ERROR share the bound: the per-request ones (a runner that
cannot be reached, a request that failed) repeat one fault each time, tracebacks are the longest lines of all, and
nothing is lost without a count. Lines of BentoML, uvicorn and circus are not bounded here (the access log, off by
default, writes one line per request by design).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

PACKAGES = ("core", "public", "runner", "workflows")
LIMIT = 10  # records per call site per window
WINDOW_S = 60.0  # seconds
_SUMMARY = "_infernet_summary"  # set on the records RateLimit writes itself: they pass
_LAST_CHARS = 200  # of the last suppressed message, quoted in the summary


def ours(record: logging.LogRecord) -> bool:
    """True for a record of the service's own packages (``public.app``, ``runner.model_registry``, ...)."""
    return record.name.partition(".")[0] in PACKAGES


@dataclass
class _Site:
    opened: float  # when the window opened (the clock's seconds)
    written: int = 0  # records written in the window
    suppressed: int = 0  # records counted, not written, in the window
    level: int = logging.NOTSET  # the highest level among them
    last: logging.LogRecord | None = None  # the last of them


class RateLimit(logging.Filter):
    """At most ``limit`` records per ``window_s`` seconds per call site (``record.name``, ``pathname``, ``lineno``)
    among the records ``applies`` picks, then one summary line (module docstring). ``write`` takes each summary
    record: the handler's ``handle``, so that it gets the handler's other filters (BentoML's, which add the fields of
    its format). ``clock``: seconds, monotonic (tests inject one). Thread-safe: records come from the event loop, the
    model thread and the download threads; summaries are written outside the lock. Raises nothing of its own."""

    def __init__(
        self,
        write: Callable[[logging.LogRecord], object],
        limit: int = LIMIT,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        applies: Callable[[logging.LogRecord], bool] = ours,
    ) -> None:
        super().__init__()
        self.write, self.limit, self.window_s, self.clock, self.applies = write, limit, window_s, clock, applies
        self._sites: dict[tuple[str, str, int], _Site] = {}
        self._waiting: set[tuple[str, str, int]] = set()  # sites with suppressed records, their summary not written
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SUMMARY, False):
            return True
        now = self.clock()
        key = (record.name, record.pathname, record.lineno)
        with self._lock:
            due = self._take_due(now) if self._waiting else []
            passes = True
            if self.applies(record):
                site = self._sites.get(key)
                if site is None or now - site.opened >= self.window_s:
                    site = self._sites[key] = _Site(opened=now)
                if site.written < self.limit:
                    site.written += 1
                else:
                    site.suppressed += 1
                    site.level = max(site.level, record.levelno)
                    site.last = record
                    self._waiting.add(key)
                    passes = False
        for summary in due:
            self.write(summary)
        return passes

    def flush(self) -> None:
        """Write the summary of every site with suppressed records now, its window closed or not (at exit)."""
        with self._lock:
            due = self._take_due(None)
        for summary in due:
            self.write(summary)

    def _take_due(self, now: float | None) -> list[logging.LogRecord]:
        """The summaries of the waiting sites whose window has closed by ``now`` (all when None); their windows end.
        Under the lock."""
        due = []
        for key in list(self._waiting):
            site = self._sites[key]
            if now is not None and now - site.opened < self.window_s:
                continue
            self._waiting.discard(key)
            del self._sites[key]  # the site's next record opens a new window
            due.append(self._summary(site, now))
        return due

    def _summary(self, site: _Site, now: float | None) -> logging.LogRecord:
        last = site.last
        assert last is not None  # a waiting site has suppressed one at least
        seconds = (self.clock() if now is None else now) - site.opened
        try:
            message = last.getMessage()  # masked already: core/secrets.py scrubs every record when it is made
        except Exception:
            message = str(last.msg)
        if len(message) > _LAST_CHARS:
            message = message[:_LAST_CHARS] + "..."
        # Made by the logger, so through the record factory (core/secrets.py masks it too).
        record = logging.getLogger(last.name).makeRecord(
            last.name,
            site.level,
            last.pathname,
            last.lineno,
            "%d similar lines suppressed in the last %.0f s (%s line %d; the last: %s)",
            (site.suppressed, min(seconds, self.window_s), last.name, last.lineno, message),
            None,
            func=last.funcName,
        )
        setattr(record, _SUMMARY, True)
        return record


def show_service_logs() -> None:
    """Write the service's own records from INFO up, bounded per call site (module docstring), in this process.

    The level follows BentoML's modes, read from the root logger's level that its set-up left: WARNING (the default)
    -> INFO; DEBUG (``--debug``, ``BENTOML_DEBUG``) -> DEBUG; ERROR (``--quiet``) -> ERROR. Our records reach
    BentoML's handler on the root logger by propagation; each handler there gets a ``RateLimit`` of its own, whose
    summaries are written at exit too. Called once at import of service.py; a second call changes nothing."""
    root = logging.getLogger()
    level = logging.INFO if root.level == logging.WARNING else root.level
    for name in PACKAGES:
        logging.getLogger(name).setLevel(level)
    for handler in root.handlers:
        if any(isinstance(f, RateLimit) for f in handler.filters):
            continue
        limit = RateLimit(handler.handle)
        handler.addFilter(limit)
        atexit.register(limit.flush)  # after logging's own exit hook is registered, so it runs before it
