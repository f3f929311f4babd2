"""Exceptions that carry an HTTP status, so every layer reports failures in the contract's terms."""

from __future__ import annotations

from typing import Any


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
    or instead of the model; ``errors`` lists pydantic's per-field findings when there are some."""

    def __init__(self, status: int, description: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(description)
        self.status = status
        self.description = description
        self.errors = errors


class StartupError(Exception):
    """Configuration or model that cannot be used: start-up stops with this one-line message."""


def first_line(error: BaseException) -> str:
    """The line of an exception's message that says what failed (the class name for an empty message).

    TorchScript wraps the real error in a traceback of the scripted code; its last line says what failed."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[-1] if "TorchScript" in lines[0] else lines[0]
