"""The service's log under ``bentoml serve``: its own lines (the packages core, public, runner, workflows) written from
INFO up, through BentoML's handler and in its format, and every line through that handler bounded per line of code,
so that no client can fill the operator's disk.

    2026-12-01T10:59:00+0000 [INFO] [entry_service:infernet_torch_service:1] 127.0.0.1:50312 400: the request is ...

Why: BentoML's server logging (``configure_server_logging``, run in every process of ``bentoml serve`` before
service.py is imported) sets the root logger to WARNING, which dropped every INFO line of ours (a per-request model
evicted, a batch retried item by item, a client's unreadable request). ``show_service_logs`` runs once at import of
service.py, in every process (the server, each API worker, the runner), after that set-up. The operator's start-up lines
(workflows/progress.py) are printed to stderr and are not touched here; a client's refused per-request model is
logged through the ``workflows.progress`` logger, so it is bounded like the rest.

The bound (``RateLimit``, a filter on BentoML's handler): each call site (logger, file, line) writes at most
``LIMIT`` = 10 records per ``WINDOW_S`` = 60 s window, per process; the window opens with the site's first record.
Further records in the window are counted, not written. When the window closes, one line at the highest level
among them says ``N similar lines suppressed in the last 60 s (logger line L; the last: ...)``, written by a timer
(or by the next record through the handler, if it comes first), so the count shows even when the flood has
stopped. (Not at exit: uvicorn ends its process by SIGTERM's default action, which skips exit handlers.) So a flood
from one call site writes at most 11 lines a minute per process, and the call sites are lines of code (a fixed
set, so the filter's memory is bounded too). WARNING and ERROR share the bound: the per-request ones (a runner that
cannot be reached, a request that failed) repeat one fault each time, tracebacks are the longest lines of all, and
nothing is lost without a count.

Which lines (``bounded``): every record through BentoML's handler, ours and the libraries' alike (BentoML, uvicorn,
Starlette, circus, asyncio, OpenTelemetry), since a client can make a library log too: OpenTelemetry's propagators,
which BentoML's tracing middleware runs on every route but ``/service_output``, write a WARNING per malformed member of
a request's ``baggage`` or ``tracestate`` header (tests/test_logs.py). A line written once (an error while loading, the
port in use) is never held back. A written line's message is cut at 2000 characters (its traceback is kept), since
OpenTelemetry quotes an oversized header whole; and a record that reaches the handler twice (BentoML puts it on
``uvicorn.error`` and ``circus`` as well as on the root logger) is written and counted once. Not bounded: the access
log (``bentoml.access``, ``uvicorn.access``; off by default), which writes one line per request by design when the
operator turns it on; and what is printed to stdout or stderr without logging (the start-up lines, warnings).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

PACKAGES = ("core", "public", "runner", "workflows")
ACCESS_LOGS = ("bentoml.access", "uvicorn.access")  # one line per request by design, when the operator turns it on
LIMIT = 10  # records per call site per window
WINDOW_S = 60.0  # seconds
_SUMMARY = "_infernet_summary"  # set on the records RateLimit writes itself: they pass
_JUDGED = "_infernet_judged"  # on a record RateLimit has judged: the id of that RateLimit
_LAST_CHARS = 200  # of the last suppressed message, quoted in the summary
_MESSAGE_CHARS = 2000  # of a written record's message (its traceback is not cut)
_LATE_S = 0.05  # the timer fires this late, so that the window has surely closed by the clock


def bounded(record: logging.LogRecord) -> bool:
    """True for every record but the access log's (module docstring)."""
    return record.name not in ACCESS_LOGS


@dataclass
class _Site:
    opened: float  # when the window opened (the clock's seconds)
    written: int = 0  # records written in the window
    suppressed: int = 0  # records counted, not written, in the window
    level: int = logging.NOTSET  # the highest level among them
    last: str = ""  # the last one's message (not the record: its traceback would hold its frames alive)
    function: str | None = None  # the call site's function


class RateLimit(logging.Filter):
    """At most ``limit`` records per ``window_s`` seconds per call site (``record.name``, ``pathname``, ``lineno``)
    among the records ``applies`` picks, then one summary line (module docstring). ``write`` takes each summary
    record: the handler's ``handle``, so that it gets the handler's other filters (BentoML's, which add the fields of
    its format). ``clock``: seconds, monotonic; ``schedule(delay_s, callback)`` calls ``callback`` in ``delay_s``
    seconds on a thread of its own (a daemon ``threading.Timer``; tests inject both). Thread-safe: records come from
    the event loop, the model thread and the download threads; summaries are written outside the lock. Raises nothing
    of its own."""

    def __init__(
        self,
        write: Callable[[logging.LogRecord], object],
        limit: int = LIMIT,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        applies: Callable[[logging.LogRecord], bool] = bounded,
        schedule: Callable[[float, Callable[[], None]], object] | None = None,
    ) -> None:
        super().__init__()
        self.write, self.limit, self.window_s, self.clock, self.applies = write, limit, window_s, clock, applies
        self.schedule = schedule or _timer
        self._sites: dict[tuple[str, str, int], _Site] = {}
        self._waiting: set[tuple[str, str, int]] = set()  # sites with suppressed records, their summary not written
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _SUMMARY, False):
            return True
        applies = self.applies(record)
        if not applies and not self._waiting:
            return True  # an access-log line: no clock, no lock
        if getattr(record, _JUDGED, None) == id(self):
            # The same record again: BentoML puts its handler on uvicorn.error and circus and on the root logger, so
            # their records reach it twice (and were written twice). Written once, counted once.
            return False
        setattr(record, _JUDGED, id(self))  # an int: a record stays picklable
        now = self.clock()
        key = (record.name, record.pathname, record.lineno)
        closes_at = None  # when this record is the first its site suppresses: the end of the window
        with self._lock:
            due = self._take_due(now) if self._waiting else []
            passes = True
            if applies:
                site = self._sites.get(key)
                if site is None or now - site.opened >= self.window_s:
                    site = self._sites[key] = _Site(opened=now)
                if site.written < self.limit:
                    site.written += 1
                else:
                    site.suppressed += 1
                    site.level = max(site.level, record.levelno)
                    site.last, site.function = _message(record), record.funcName
                    if key not in self._waiting:
                        self._waiting.add(key)
                        closes_at = site.opened + self.window_s
                    passes = False
        if passes and applies:
            _cut(record)
        if closes_at is not None:
            self.schedule(closes_at - now + _LATE_S, self.write_due)
        for summary in due:
            self.write(summary)
        return passes

    def write_due(self) -> None:
        """Write the summary of every site whose window has closed (the timer's callback)."""
        with self._lock:
            due = self._take_due(self.clock())
        for summary in due:
            self.write(summary)

    def _take_due(self, now: float) -> list[logging.LogRecord]:
        """The summaries of the waiting sites whose window has closed by ``now``; their windows end. Under the lock."""
        due = []
        for key in list(self._waiting):
            site = self._sites[key]
            if now - site.opened < self.window_s:
                continue
            self._waiting.discard(key)
            del self._sites[key]  # the site's next record opens a new window
            due.append(self._summary(key, site, now))
        return due

    def _summary(self, key: tuple[str, str, int], site: _Site, now: float) -> logging.LogRecord:
        name, path, line = key
        # Made by the logger, so through the record factory (core/secrets.py masks it too).
        record = logging.getLogger(name).makeRecord(
            name,
            site.level,
            path,
            line,
            "%d similar %s suppressed in the last %.0f s (%s line %d; the last: %s)",
            (
                site.suppressed,
                "line" if site.suppressed == 1 else "lines",
                min(now - site.opened, self.window_s),
                name,
                line,
                site.last,
            ),
            None,
            func=site.function,
        )
        setattr(record, _SUMMARY, True)
        return record


def _message(record: logging.LogRecord, chars: int = _LAST_CHARS) -> str:
    """``record``'s message, at most ``chars`` of it (masked already: core/secrets.py masks every record when it is
    made)."""
    try:
        message = record.getMessage()
    except Exception:  # logging reports it where the record is written; here it is only quoted
        message = str(record.msg)
    return message if len(message) <= chars else message[:chars] + "..."


def _cut(record: logging.LogRecord) -> None:
    """Cut a written record's message to ``_MESSAGE_CHARS``: a library may quote a client's header whole
    (OpenTelemetry's ``Baggage header `...` exceeded ...`` quotes up to the request head's limit, 64 KiB)."""
    message = _message(record, _MESSAGE_CHARS)
    if len(message) > _MESSAGE_CHARS:
        record.msg, record.args = message, None


def show_service_logs() -> None:
    """Write the service's own records from INFO up, bounded per call site (module docstring), in this process.

    The level follows BentoML's modes, read from the root logger's level that its set-up left: WARNING (the default)
    -> INFO; DEBUG (``--debug``, ``BENTOML_DEBUG``) -> DEBUG; ERROR (``--quiet``) -> ERROR. Our records reach
    BentoML's handler on the root logger by propagation; each handler there gets a ``RateLimit`` of its own.
    Called once at import of service.py; a second call changes nothing."""
    root = logging.getLogger()
    level = logging.INFO if root.level == logging.WARNING else root.level
    for name in PACKAGES:
        logging.getLogger(name).setLevel(level)
    for handler in root.handlers:
        if any(isinstance(f, RateLimit) for f in handler.filters):
            continue
        handler.addFilter(RateLimit(handler.handle))


def _timer(delay_s: float, callback: Callable[[], None]) -> None:
    timer = threading.Timer(delay_s, callback)
    timer.daemon = True  # never holds the process's exit
    timer.start()
