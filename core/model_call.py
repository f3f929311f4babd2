"""The runner call's item for a request that names a model other than the default.

A request for the default model crosses the hop as its tensor data alone (unchanged, so that path pickles exactly
what it did before many models); a request that names a model crosses as ``ForModel(model_id, data)``, the id in
its canonical text form (``core.model_ids.ModelId.__str__``), already checked against ``ALLOWED_MODELS`` by the API
worker. Built on an API worker's event loop, read on the runner's.

On BentoML's public path (INFERNET_FAST_PATH off) the call's items cross sealed (``seal``, ``unseal``): BentoML's
client dumps its arguments with pydantic before pickling them, which turns a ``ForModel`` into a dict and a
``core.terms.SentValues`` into a plain list, so the runner read a per-request model's request as today's layout
("dtype: missing") and named CHAIN values as their floats (explorer K7); its typed route dumps the answer the same
way. Sealed, items and outcomes arrive as the fast path's pickle delivers them, whatever types a layout or custom
workflow puts in them.
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


def seal(items: list[Any]) -> bytes:
    """A runner call's items (on an API worker's event loop) or its outcomes (on the runner's) as one pickle, which
    BentoML's client and typed route carry as bytes untouched. Raises what ``pickle.dumps`` raises for something that
    cannot be pickled (as the fast path would)."""
    return pickle.dumps(items, protocol=pickle.HIGHEST_PROTOCOL)


def unseal(sealed: bytes) -> list[Any]:
    """What ``seal`` sealed, with its own types. The bytes come only from the service's own processes (the runner's
    socket is the API workers' alone), as on the fast path, whose calls and answers are pickles too."""
    return pickle.loads(sealed)


@dataclass(slots=True, frozen=True)
class AskedFor:
    """A request's data with the names of the outputs its client asked for (the Open Inference Protocol's
    ``outputs``, public/open_inference.py), in the protocol's names: ``output_0`` for a lone tensor or a list's
    items, a dict's keys, joined with "." when nested (an ONNX model's outputs by their own names). Built on an API
    worker's event loop; the runner encodes only those outputs (workflows/base.py ``postprocess_all``), so an
    output nobody asked for can fail no check of the answer (explore_kinds K11)."""

    outputs: tuple[str, ...]
    data: Any

    def __reduce__(self) -> tuple[Any, ...]:
        return (AskedFor, (self.outputs, self.data))


class Unasked:
    """In a runner's answer, the place of an output the request did not ask for (``AskedFor``): left unencoded, it
    keeps its name for the protocol's list of the model's outputs."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Unasked, ())

    def __repr__(self) -> str:
        return "Unasked()"


UNASKED = Unasked()


def asked_outputs(request: Any) -> tuple[tuple[str, ...] | None, Any]:
    """(the outputs a request asks for, or None for every output; its data without the ``AskedFor``). Pure."""
    if type(request) is AskedFor:
        return request.outputs, request.data
    return None, request
