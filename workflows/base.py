"""The workflow contract: one small class whose hooks follow the data.

    setup()                      once, before the first request: load the model
    preprocess(data) -> item     one request's ``data`` -> model input (raise InputError on bad data)
    batch_key(item) -> key       items with equal keys may share one forward; None runs the item alone
    batch(items) -> batch        combine items that share a key
    run_model(batch) -> output   the forward pass
    unbatch(output, items)       split a batch's output back, one entry per item
    postprocess(output) -> JSON  one item's output -> what the client receives

The runner calls ``batch``, ``run_model`` and ``unbatch`` on the model's own thread, one batch after another, and
``preprocess``, ``batch_key`` and ``postprocess`` on its event loop, alongside the forward of another batch: keep
those short, and keep them off state that ``run_model`` changes.

The rule batching keeps: a request's answer is the same whether it ran alone or in a batch. ``batch_key`` must
therefore return None unless the item's leading axis is a batch axis by construction (the torch workflow: rank >= 2,
equal dtype and trailing shape), and ``run_model`` must treat the rows of a batch independently; the default key
(None) never batches. A workflow may also define ``warmup()`` (run once at start-up, after ``setup``) and report in
``describe()["batching"]`` whether batching is on and why (the torch workflow checks a batch of two there).

``inference(data)`` chains them for a single request, as the original library's workflows did. Classes
that only define ``setup()`` and ``inference()`` (no base class) are served too, one request at a time.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any


class InferenceWorkflow:
    def setup(self) -> None:
        """Load whatever the workflow needs. Runs once, in the runner process."""

    def preprocess(self, data: Any) -> Any:
        return data

    def batch_key(self, item: Any) -> Hashable | None:
        """None (the default): the item runs alone. A key only for items whose leading axis is a batch axis."""
        return None

    def batch(self, items: Sequence[Any]) -> Any:
        return list(items)

    def run_model(self, batch: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement run_model()")

    def unbatch(self, output: Any, items: Sequence[Any]) -> list[Any]:
        return list(output)

    def postprocess(self, output: Any) -> Any:
        return output

    def describe(self) -> dict[str, Any]:
        """What ``GET /info`` reports about this workflow's model."""
        return {}

    def inference(self, data: Any) -> Any:
        item = self.preprocess(data)
        if self.batch_key(item) is None:
            return self.postprocess(self.run_model(item))
        [output] = self.unbatch(self.run_model(self.batch([item])), [item])
        return self.postprocess(output)
