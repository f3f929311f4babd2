"""The runner call's item for a request that names a model other than the default.

A request for the default model crosses the hop as its tensor data alone (unchanged, so that path pickles exactly
what it did before many models); a request that names a model crosses as ``ForModel(model_id, data)``, the id in
its canonical text form (``core.model_ids.ModelId.__str__``), already checked against ``ALLOWED_MODELS`` by the API
worker. Built on an API worker's event loop, read on the runner's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True, frozen=True)
class ForModel:
    model_id: str
    data: Any

    def __reduce__(self) -> tuple[Any, ...]:
        # A constructor call pickles several times faster than the dataclass's default state protocol (as Outcome).
        return (ForModel, (self.model_id, self.data))
