"""Per-request models' counters on /metrics, and the loader the runner's ModelRegistry calls (ALLOWED_MODELS).

Imported by the runner only when the operator allows per-request models (``ModelRegistry.from_settings``), so the
single-model path creates no per-model metrics. Labels are only ids the operator allowed (the API workers refuse
the rest before they reach the runner) whose file was found, at most MAX_COUNTED_MODELS, and ``other``: the registry
chooses the label (runner/model_registry.py), so clients inventing ids add no series.
"""

from __future__ import annotations

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


def load_model(settings: ServiceSettings, model_id: str) -> Loaded:
    """On a loader thread of the runner (runner/model_registry.py). Raises ServiceError (workflows/per_request.py)."""
    from workflows.per_request import load_model as load

    return Loaded(*load(settings, model_id, settings.max_loaded_model_bytes))
