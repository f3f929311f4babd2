"""Per-request models' counters on /metrics, and the loader the runner's ModelRegistry calls (ALLOWED_MODELS).

Imported by the runner only when the operator allows per-request models (``ModelRegistry.from_settings``), so the
single-model path creates no per-model metrics. Labels are only ids the operator allowed (the API workers refuse
the rest before they reach the runner) whose file was found, at most MAX_COUNTED_MODELS, and ``other``: the registry
chooses the label (runner/model_registry.py), so clients inventing ids add no series.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import bentoml

from core.settings import ServiceSettings
from runner.model_registry import Loaded

model_counters = {
    event: bentoml.metrics.Counter(name=f"infernet_model_{event}_total", documentation=text, labelnames=["model_id"])
    for event, text in (
        ("loads", "Per-request model loads"),
        ("hits", "Requests served by a per-request model already loaded or loading"),
        ("evictions", "Per-request models evicted from the LRU (MAX_LOADED_MODELS, MAX_LOADED_MODEL_BYTES)"),
        ("failures", "Per-request model loads that failed"),
    )
}


def count_model_event(event: str, model_id: str) -> None:
    """On the runner's event loop (the registry's ``on_event``)."""
    model_counters[event].labels(model_id=model_id).inc()


class PerRequestLoader:
    """The registry's ``Loader`` (runner/model_registry.py) for the models requests name: workflows/per_request.py,
    bounded by MAX_LOADED_MODEL_BYTES. Each method runs on a thread of the runner's registry."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings

    def is_cached(self, model_id: str) -> bool:
        from workflows.per_request import is_cached

        return is_cached(self.settings, model_id)

    def fetch(self, model_id: str, on_bytes: Callable[[int, int | None], None] | None) -> Path:
        from workflows.per_request import fetch_model

        return fetch_model(self.settings, model_id, self.settings.max_loaded_model_bytes, on_bytes)

    def load(self, model_id: str, fetched: Path) -> Loaded:
        from workflows.per_request import load_model

        return Loaded(*load_model(self.settings, model_id, fetched, self.settings.max_loaded_model_bytes))
