"""The service's secrets (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, BEARER_TOKEN / BEARER_TOKEN_FILE): checked once at
start-up for what an HTTP header can carry, and scrubbed from any text that leaves the process (``scrub``; every log
record and everything written to stdout or stderr once ``scrub_logs`` has run).

Why both: a token an HTTP library refuses makes that library raise an error whose text quotes the header, token
and all; the check stops such a token at start-up, and ``scrub`` keeps any other library message that quotes a
token out of answers and logs. Imports nothing of the service's, so that core/errors.py can use it.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

# Variables whose values are secrets (BEARER_TOKEN_FILE's content is remembered when read: core/settings.py).
SECRET_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "BEARER_TOKEN")
MASK = "***"
_remembered: set[str] = set()


def check(name: str, value: str) -> str:
    """``value`` (already stripped of surrounding whitespace) when every character is printable ASCII other than a
    space, which is what an ``Authorization: Bearer`` header carries in every HTTP library; else ValueError with a
    one-line reason naming ``name`` and the fault, never the value. Remembers the value for ``scrub``."""
    remember(value)
    for c in value:
        if c in "\r\n":
            raise ValueError(f"{name}: contains a line break; a token is one line of printable ASCII")
        if c.isspace():
            raise ValueError(f"{name}: contains whitespace; a token is printable ASCII without spaces")
        if not "!" <= c <= "~":
            kind = "a control character" if ord(c) < 32 or ord(c) == 127 else "a non-ASCII character"
            raise ValueError(f"{name}: contains {kind} (U+{ord(c):04X}); a token is printable ASCII without spaces")
    return value


def remember(value: str) -> None:
    """Have ``scrub`` hide ``value`` (and each of its lines) from now on in this process."""
    for part in (value, *value.split()):
        if len(part) >= 4:  # shorter pieces would mask ordinary words
            _remembered.add(part)


def scrub(text: str) -> str:
    """``text`` with every secret of this process replaced by ``***``: those remembered, and the secret variables'
    values as they are in the environment now. Raises nothing."""
    secrets = set(_remembered)
    for name in SECRET_VARIABLES:
        raw = os.environ.get(name, "")
        secrets.update(part for part in (raw, raw.strip(), raw.strip().strip("'\""), *raw.split()) if len(part) >= 4)
    for secret in sorted(secrets, key=len, reverse=True):  # longest first: a line of a token is inside the token
        text = text.replace(secret, MASK)
    return text


def scrub_logs() -> None:
    """From now on in this process, secrets are masked (``scrub``) in everything it writes as text: every log record
    (its formatted message, its traceback's text and its stack), and every write to ``sys.stdout`` and ``sys.stderr``.

    Two places, because text leaves a process by two roads. Log records: masked at creation
    (``logging.setLogRecordFactory``) rather than by a handler's filter, since BentoML, uvicorn and circus configure
    their own handlers, some after service.py is imported, some holding the original stream object, and loggers
    that do not propagate (``bentoml``) never reach the root's; every record of every logger is made by the factory.
    Everything else: Python warnings printed by ``warnings.showwarning`` (not routed through logging unless
    ``logging.captureWarnings`` is on, and then they are records), ``print`` (the service's own start-up lines,
    a user's workflow), ``traceback.print_exc`` (BentoML's runner app), uncaught exceptions of the main thread and of
    threads (the default hooks write to ``sys.stderr``), unraisable exceptions: each looks ``sys.stdout`` /
    ``sys.stderr`` up when it writes, so one masking stream in their place covers them all.

    Not covered: text written before this runs (the imports above it in service.py), bytes written to a stream's
    ``buffer`` or to the file descriptors themselves (native code), and a secret written in two pieces by two
    writes (a secret has no whitespace, and writers split at whitespace and line ends). Called once at import of
    service.py, in every process that loads it (``bentoml serve``, the API workers, the runner); a second call
    changes nothing."""
    global _scrubbing
    if _scrubbing:
        return
    _scrubbing = True
    make_record = logging.getLogRecordFactory()

    def scrubbed_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        scrub_record(record)
        return record

    logging.setLogRecordFactory(scrubbed_record)
    if sys.stdout is not None:  # None without a console: print then writes nothing, and so it stays
        sys.stdout = ScrubbedStream(sys.stdout)
    if sys.stderr is not None:
        sys.stderr = ScrubbedStream(sys.stderr)


class ScrubbedStream:
    """A text stream that writes ``scrub(text)`` to the stream it wraps; everything else (``flush``, ``fileno``,
    ``isatty``, ``encoding``, ``buffer``) is the wrapped stream's. A non-text write raises what the wrapped stream
    raises (click tells text streams from binary ones by trying ``write(b"")``)."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: Any) -> int:
        if isinstance(text, str):
            text = scrub(text)
        return self._stream.write(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


_scrubbing = False
_formatter = logging.Formatter()


def scrub_record(record: logging.LogRecord) -> None:
    """Mask the secrets in ``record``'s message, exception text and stack, in place. A record whose message cannot
    be formatted is left for its handler to report, as logging does. Raises nothing."""
    try:
        message = record.getMessage()
    except Exception:
        return
    masked = scrub(message)
    if masked != message:
        record.msg, record.args = masked, ()
    if record.exc_info and not record.exc_text:
        # Formatters use exc_text when it is set, so the traceback is formatted here, once, and masked.
        record.exc_text = scrub(_formatter.formatException(record.exc_info))
    if record.stack_info:
        record.stack_info = scrub(record.stack_info)
