"""One request's result, from the workflow to the HTTP answer: ``Outcome``; and the one exception -> status mapping.

The runner sends a list of them back to the API worker in its pickle (one per request); the public side turns each
into its HTTP answer (public/answers.py). Nothing else decides a status from an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from core.errors import ServiceError, first_line

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
