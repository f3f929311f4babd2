"""The log under ``bentoml serve`` (core/logs.py): the service's own lines at INFO and up in BentoML's format, tokens
masked, and at most ``LIMIT`` lines a window per line of code, the libraries' too, then a count of those suppressed.

The lines used over HTTP are those any client can cause at will: the API worker's per-connection refusal
(public/http_protocol.py; a client's unreadable request, answered 400, 501 for an unknown method, logged at INFO), and
OpenTelemetry's warnings about a request's malformed ``baggage`` and ``tracestate`` headers (BentoML's tracing
middleware reads them on every route but ``/service_output``).
"""

from __future__ import annotations

import json
import logging
import re
import socket
import sys
import time
from urllib.parse import urlsplit

import pytest

from core import logs
from core.logs import LIMIT, WINDOW_S, RateLimit
from tests.fixtures.server import serving

TOKEN = "LEAKYMETHODTOKEN"  # a valid method token and a valid bearer token: the refusal's line names the method
# BentoML's server format: time, level, component (the API worker), message.
LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[INFO\] \[(entry_service:infernet_torch_service:\d+)\] "
    r"127\.0\.0\.1:\d+ (\d{3}): (.*)$",
    re.M,
)
SUMMARY = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[INFO\] \[(entry_service:infernet_torch_service:\d+)\] "
    r"(\d+) similar lines? suppressed in the last \d+ s \(public\.http_protocol line \d+; the last: (.*)\)$",
    re.M,
)


def raw_request(url: str, data: bytes) -> tuple[int, dict]:
    """Send ``data`` on a new connection; the answer's status and JSON body (the server closes the connection)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def wait_for(server, pattern: re.Pattern, count: int = 1, timeout: float = 20) -> list[tuple[str, ...]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = pattern.findall(server.log())
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{pattern.pattern!r} not {count} times in the log:\n{server.log()[-3000:]}")


# --- over HTTP, a real `bentoml serve` ------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_info_line_of_the_service_is_written_in_bentomls_format_with_tokens_masked(tmp_path):
    with serving({"BEARER_TOKEN": TOKEN}, tmp_path) as server:
        status, body = raw_request(server.url, f"{TOKEN} / HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert status == 501 and body["code"] == "501"
        [(_, logged_status, message)] = wait_for(server, LINE)
        assert logged_status == "501"
        assert message.startswith("method *** is not supported")
        log = server.log()
    assert TOKEN not in log


@pytest.mark.slow
def test_a_flood_of_one_line_is_bounded_and_counted_and_every_request_answered(tmp_path):
    sent = 200
    with serving({}, tmp_path) as server:
        started = time.monotonic()
        statuses = [raw_request(server.url, b"NOT HTTP AT ALL\r\n\r\n")[0] for _ in range(sent)]
        windows = 1 + int((time.monotonic() - started) // WINDOW_S)  # one, unless the box is very slow
        assert statuses == [400] * sent  # the service answered every request
        assert server.get("/readyz").status_code == 200
        # When its window closes, each API worker that suppressed lines writes how many, flood over or not: every
        # refusal is then either written or counted (the count waits for the window, WINDOW_S, so this test does).
        deadline = time.monotonic() + WINDOW_S * windows + 60
        while time.monotonic() < deadline:
            log = server.log()
            written, summaries = LINE.findall(log), SUMMARY.findall(log)
            if len(written) + sum(int(n) for _, n, _ in summaries) >= sent:
                break
            time.sleep(1)
    assert summaries, log[-3000:]
    assert len(written) + sum(int(n) for _, n, _ in summaries) == sent, log[-3000:]
    # Per API worker (each process bounds its own lines): at most LIMIT lines a window, and one count.
    per_worker: dict[str, int] = {}
    for component, status, message in written:
        assert status == "400" and message.startswith("the request is not valid HTTP/1.1")
        per_worker[component] = per_worker.get(component, 0) + 1
    assert all(n <= LIMIT * windows for n in per_worker.values()), per_worker
    assert len(summaries) <= len(per_worker) * windows
    assert all(last.startswith("127.0.0.1:") and "400: the request is not valid" in last for _, _, last in summaries)


# BentoML's format at WARNING: time, level, component (the API worker), message.
WARNING = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} \[WARNING\] \[(entry_service:infernet_torch_service:\d+)\] "
BAGGAGE = "Baggage list-member `m\\d` doesn't match the format"
TRACESTATE = "Member doesn't match the w3c identifiers format !!!=x"


def counted(logger: str, message: str) -> re.Pattern:
    """The summary line of ``logger``'s call site whose suppressed lines were ``message``."""
    return re.compile(
        WARNING + rf"(\d+) similar lines? suppressed in the last \d+ s \({re.escape(logger)} line \d+; the last: "
        rf"{message}\)$",
        re.M,
    )


@pytest.mark.slow
def test_a_librarys_warnings_that_a_client_causes_are_bounded_counted_and_cut_short(tmp_path):
    # Each request: 3 malformed baggage members (a warning each) and a malformed tracestate (one more); a few with a
    # baggage header past OpenTelemetry's 8 KiB, which its warning quotes whole.
    sent = 30
    headers = {
        "baggage": "m0,m1,m2",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "!!!=x",
    }
    kinds = {  # the line, its summary, how many the requests caused
        "baggage": (
            re.compile(WARNING + f"({BAGGAGE})$", re.M),
            counted("opentelemetry.baggage.propagation", BAGGAGE),
            3 * sent,
        ),
        "tracestate": (
            re.compile(WARNING + f"({re.escape(TRACESTATE)})$", re.M),
            counted("opentelemetry.trace.span", re.escape(TRACESTATE)),
            sent,
        ),
    }
    with serving({}, tmp_path) as server:
        started = time.monotonic()
        for _ in range(sent):
            assert server.get("/schema.json", headers=headers).status_code == 200
        for _ in range(3):
            assert server.get("/schema.json", headers={"baggage": "k=" + "v" * 20_000}).status_code == 200
        windows = 1 + int((time.monotonic() - started) // WINDOW_S)
        deadline = time.monotonic() + WINDOW_S * windows + 60
        while time.monotonic() < deadline:
            log = server.log()
            found = {kind: (line.findall(log), summary.findall(log)) for kind, (line, summary, _) in kinds.items()}
            if all(len(w) + sum(int(n) for _, n in s) >= kinds[kind][2] for kind, (w, s) in found.items()):
                break
            time.sleep(1)
    for kind, (written, summaries) in found.items():
        caused = kinds[kind][2]
        assert summaries, (kind, log[-3000:])
        assert len(written) + sum(int(n) for _, n in summaries) == caused, (kind, log[-3000:])
        per_worker: dict[str, int] = {}
        for component, _ in written:
            per_worker[component] = per_worker.get(component, 0) + 1
        assert all(n <= LIMIT * windows for n in per_worker.values()), (kind, per_worker)
        assert len(summaries) <= len(per_worker) * windows, (kind, summaries)
    # The long header's warning: written, its message cut (the header was 20 kB).
    [*quoted] = re.findall(WARNING + r"(Baggage header `k=v+.*)$", log, re.M)
    assert quoted and all(len(message) <= 2100 for _, message in quoted), [len(m) for _, m in quoted]


# --- the filter, with an injected clock -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(message: str, line: int = 10, name: str = "public.app", level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord(name, level, "/srv/public/app.py", line, "%s", (message,), None)


class Timers:
    """What RateLimit schedules: run by hand once the injected clock has moved past them."""

    def __init__(self) -> None:
        self.due: list[tuple[float, object]] = []

    def __call__(self, delay_s: float, callback) -> None:
        self.due.append((delay_s, callback))

    def run(self) -> None:
        due, self.due = self.due, []
        for _, callback in due:
            callback()


def test_each_line_of_code_writes_at_most_the_limit_a_window_then_a_count_of_the_rest():
    clock, timers, written = Clock(), Timers(), []
    limit = RateLimit(written.append, limit=10, window_s=60, clock=clock, schedule=timers)
    passed = [limit.filter(record(f"request {i}")) for i in range(25)]
    assert passed == [True] * 10 + [False] * 15
    assert written == []  # the window is still open
    assert [round(delay) for delay, _ in timers.due] == [60]  # one timer, for the window's end
    # Another line of code has a bound of its own, and so has another logger.
    assert limit.filter(record("other line", line=11))
    assert limit.filter(record("other logger", name="runner.model_registry"))

    clock.now += 59.9
    assert not limit.filter(record("still within the window"))
    timers.run()  # early (the timer fires 0.05 s late, by this clock it did not): nothing is due yet
    assert written == []
    clock.now += 0.2  # the window has closed: the count comes first, then the line opens a new window
    assert limit.filter(record("a new window"))
    [summary] = written
    assert summary.levelno == logging.INFO and summary.name == "public.app" and summary.lineno == 10
    assert summary.getMessage() == (
        "16 similar lines suppressed in the last 60 s (public.app line 10; the last: still within the window)"
    )
    assert limit.filter(summary)  # the count itself is never suppressed
    passed = [limit.filter(record(f"again {i}")) for i in range(12)]
    assert passed == [True] * 9 + [False] * 3


def test_the_count_is_written_when_the_window_closes_at_the_highest_level_suppressed():
    clock, timers, written = Clock(), Timers(), []
    limit = RateLimit(written.append, limit=1, window_s=60, clock=clock, schedule=timers)
    assert limit.filter(record("first", level=logging.WARNING))
    assert not limit.filter(record("second", level=logging.ERROR))
    assert not limit.filter(record("third " + "x" * 500, level=logging.WARNING))
    clock.now += 61
    timers.run()  # the flood has stopped: the timer writes the count
    [summary] = written
    assert summary.levelno == logging.ERROR and summary.getMessage().startswith("2 similar lines suppressed")
    assert summary.getMessage().endswith("x" * 150 + "...)")  # the last line, cut short
    timers.run()
    assert len(written) == 1  # nothing twice
    # Or by any record through the handler, should it come before the timer.
    assert limit.filter(record("fourth"))
    assert not limit.filter(record("fifth"))
    clock.now += 61
    assert limit.filter(record("an access-log line", name="bentoml.access"))  # never bounded
    assert len(written) == 2 and "1 similar line suppressed in" in written[1].getMessage()


def test_the_libraries_lines_are_bounded_too_and_the_access_log_is_not():
    clock, timers, written = Clock(), Timers(), []
    limit = RateLimit(written.append, limit=2, window_s=60, clock=clock, schedule=timers)
    for name in ("opentelemetry.baggage.propagation", "uvicorn.error", "bentoml._internal.server", "asyncio"):
        assert [limit.filter(record("x", name=name, level=logging.WARNING)) for _ in range(5)] == [True] * 2 + [
            False
        ] * 3
    # The access log writes one line per request by design, when the operator turns it on.
    assert all(limit.filter(record("access", name=name)) for name in logs.ACCESS_LOGS for _ in range(50))
    clock.now += 61
    timers.run()
    assert sorted(r.name for r in written) == [
        "asyncio",
        "bentoml._internal.server",
        "opentelemetry.baggage.propagation",
        "uvicorn.error",
    ]
    assert all(r.getMessage().startswith("3 similar lines suppressed") for r in written)


def test_a_record_that_reaches_the_handler_twice_is_written_and_counted_once():
    # BentoML's set-up puts its one handler on uvicorn.error (and circus) and on the root logger: each of their
    # records reaches it twice. A real logger hierarchy, with a handler that keeps what it writes.
    kept: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = kept.append
    clock, timers = Clock(), Timers()
    handler.addFilter(RateLimit(handler.handle, limit=3, window_s=60, clock=clock, schedule=timers))
    parent, child = logging.getLogger("test_logs_parent"), logging.getLogger("test_logs_parent.child")
    try:
        for logger in (parent, child):
            logger.addHandler(handler)
        child.propagate, parent.propagate = True, False
        for i in range(5):
            child.warning("line %d", i)
        assert [r.getMessage() for r in kept] == ["line 0", "line 1", "line 2"]
        clock.now += 61
        timers.run()
        assert kept[-1].getMessage().startswith("2 similar lines suppressed")  # not 7: each record counted once
        assert len(kept) == 4
    finally:
        for logger in (parent, child):
            logger.removeHandler(handler)


def test_a_long_message_is_cut_and_its_traceback_kept():
    limit = RateLimit(lambda r: None, clock=Clock(), schedule=Timers())
    try:
        raise ValueError("boom")
    except ValueError:
        exc_info = sys.exc_info()
    long = logging.LogRecord(
        "opentelemetry.baggage.propagation",
        logging.WARNING,
        "/x.py",
        94,
        "Baggage header `%s`",
        ("v" * 70_000,),
        exc_info,
    )
    assert limit.filter(long)
    message = long.getMessage()
    assert message.startswith("Baggage header `vvv") and message.endswith("...") and len(message) == 2003
    assert long.exc_info == exc_info
    short = record("short")
    assert limit.filter(short) and short.args == ("short",)  # left as it was


@pytest.mark.parametrize(
    ("bentoml_root", "ours"),
    [(logging.WARNING, logging.INFO), (logging.DEBUG, logging.DEBUG), (logging.ERROR, logging.ERROR)],
    ids=["default", "debug", "quiet"],
)
def test_the_level_follows_bentomls_modes_and_the_bound_is_put_on_its_handler_once(monkeypatch, bentoml_root, ours):
    # What BentoML's server set-up leaves on the root logger (its level per mode, its one handler), put back after
    # (through setLevel, which also clears the levels the loggers cached).
    root = logging.getLogger()
    handler = logging.StreamHandler()
    monkeypatch.setattr(root, "handlers", [handler])
    names = ("", *logs.PACKAGES)
    saved = {name: logging.getLogger(name).level for name in names}
    try:
        root.setLevel(bentoml_root)
        for name in logs.PACKAGES:
            logging.getLogger(name).setLevel(logging.NOTSET)
        logs.show_service_logs()
        logs.show_service_logs()  # a second call changes nothing
        assert {logging.getLogger(name).getEffectiveLevel() for name in logs.PACKAGES} == {ours}
        assert logging.getLogger("workflows.sources.arweave").getEffectiveLevel() == ours
        assert logging.getLogger("bentoml_or_another").getEffectiveLevel() == bentoml_root
        assert [type(f) for f in handler.filters] == [RateLimit]
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
