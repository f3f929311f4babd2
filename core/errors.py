"""Exceptions that carry an HTTP status, so every layer reports failures in the contract's terms; and a request's
``Outcome``, the one value that crosses from the workflow to the HTTP answer (``failure``: exception -> status).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.secrets import scrub


class ServiceError(Exception):
    """A request failed; ``status`` is the HTTP status the client sees."""

    status = 500


class InputError(ServiceError):
    """The request's data is malformed or does not fit the model (400)."""

    status = 400


class ModelError(ServiceError):
    """The model raised on this input (422)."""

    status = 422


class Overloaded(ServiceError):
    """The request waited longer than MAX_LATENCY_MS for the model; retry later (503)."""

    status = 503


class RequestError(ServiceError):
    """A request the public side answers itself with ``status`` (bad body, wrong route, limits, timeouts), before
    or instead of the model; ``errors`` lists pydantic's per-field findings when there are some; ``model``: where
    the per-request model it waited for stands (a 504 while it downloads: runner/model_registry.py ``progress``)."""

    def __init__(
        self,
        status: int,
        description: str,
        errors: list[dict[str, Any]] | None = None,
        model: dict[str, Any] | None = None,
    ):
        super().__init__(description)
        self.status = status
        self.description = description
        self.errors = errors
        self.model = model


class StartupError(Exception):
    """Configuration or model that cannot be used: start-up stops with this one-line message."""


class StartupStopped(BaseException):
    """SIGTERM or SIGINT arrived while start-up fetched the model (``workflows/startup.py`` ``stop_on_signal``).
    A BaseException, like KeyboardInterrupt: no ``except Exception`` on the way turns it into a failure, and every
    ``finally`` (a partial download's removal) runs. ``signum``: the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class FetchError(StartupError):
    """A model source (Hugging Face Hub, Arweave) refused or failed to give a model file; ``status`` is what a
    per-request client sees: 404 the repository, revision, file or transaction is not there; 403 the Hub refused
    the token or the gate; 502 anything else on the source's side (unreachable, malformed, unverifiable answers);
    413 and 507 when the file does not fit the model cache's bound (workflows/sources/disk_bound.py).
    Decided from the source's own answer (exception types, HTTP status), never from the message's words."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


def unwritable(error: OSError) -> str:
    """``path (reason)`` for a file-system error, its path when it names one."""
    where = f"{error.filename} " if error.filename is not None else ""
    return f"{where}({error.strerror or error})"


def first_line(error: BaseException) -> str:
    """The line of an exception's message that says what failed (the class name for an empty message).

    TorchScript wraps the real error in a traceback of the scripted code; its last line says what failed."""
    # Every exception's text becomes an answer or a log line through here: secrets are masked first.
    lines = [line.strip() for line in scrub(str(error)).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if "TorchScript" in lines[0] else lines[0]


# One request's result, from the workflow to the HTTP answer: ``Outcome``; and the one exception -> status mapping.
#
# The runner sends a list of them back to the API worker in its pickle (one per request); the public side turns each
# into its HTTP answer (public/app.py ``respond``). Nothing else decides a status from an exception.

OK = 200


@dataclass(slots=True)
class Outcome:
    """``status`` 200 with ``body`` (what the client receives, JSON-serialisable), or a failure's ``status`` with
    its ``description`` (the contract's error body says it)."""

    status: int
    body: Any = None
    description: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled across the hop once per request: a constructor call pickles and loads ~5x faster than the
        # dataclass's default state protocol (about as fast as the dicts it replaces).
        return (Outcome, (self.status, self.body, self.description))


def answer(body: Any) -> Outcome:
    return Outcome(OK, body)


def failure(error: BaseException) -> Outcome:
    """The outcome of a failed request: a ``ServiceError``'s own status, 500 for anything else; its first line."""
    status = error.status if isinstance(error, ServiceError) else 500
    return Outcome(status, None, first_line(error))
