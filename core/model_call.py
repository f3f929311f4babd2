"""The runner call's item for a request that names a model other than the default.

A request for the default model crosses the hop as its tensor data alone (unchanged, so that path pickles exactly
what it did before many models); a request that names a model crosses as ``ForModel(model_id, data)``, the id in
its canonical text form (``core.model_ids.ModelId.__str__``), already checked against ``ALLOWED_MODELS`` by the API
worker. Built on an API worker's event loop, read on the runner's.

On BentoML's public path (INFERNET_FAST_PATH off) the call's items cross sealed (``seal``, ``unseal``): BentoML's
client dumps its arguments with pydantic before pickling them, which turns a ``ForModel`` into a dict and a
``core.terms.SentValues`` into a plain list, so the runner read a per-request model's request as today's layout
("dtype: missing") and named CHAIN values as their floats (explorer K7). Sealed, they arrive as the fast path's
pickle delivers them, whatever types a layout or custom workflow puts in them.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, frozen=True)
class ForModel:
    model_id: str
    data: Any

    def __reduce__(self) -> tuple[Any, ...]:
        # A constructor call pickles several times faster than the dataclass's default state protocol (as Outcome).
        return (ForModel, (self.model_id, self.data))


def seal(requests: list[Any]) -> bytes:
    """The runner call's items as one pickle, which BentoML's client carries as bytes untouched. On an API worker's
    event loop; raises what ``pickle.dumps`` raises for an item that cannot be pickled (so would the fast path)."""
    return pickle.dumps(requests, protocol=pickle.HIGHEST_PROTOCOL)


def unseal(sealed: bytes) -> list[Any]:
    """The items ``seal`` sealed, with their own types. On the runner's event loop. The bytes come only from the
    service's own API workers (the runner's socket is theirs alone), as the fast path's pickled call does."""
    return pickle.loads(sealed)
