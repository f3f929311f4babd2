"""Arweave source (implemented in its own issue)."""

from __future__ import annotations

from pathlib import Path

from workflows.config import TorchSettings
from workflows.errors import StartupError
from workflows.sources import ModelSpec


def fetch(spec: ModelSpec, settings: TorchSettings) -> Path:
    raise StartupError("the Arweave source is not available in this build")
