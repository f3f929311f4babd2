"""Exceptions that carry an HTTP status, so every layer reports failures in the contract's terms."""

from __future__ import annotations


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


class StartupError(Exception):
    """Configuration or model that cannot be used: start-up stops with this one-line message."""
