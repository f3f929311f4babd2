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
