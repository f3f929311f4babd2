"""A model file on local disk, named by the operator."""

from __future__ import annotations

from pathlib import Path

from core.errors import StartupError
from core.settings import TorchSettings
from workflows.sources import ModelSpec, OnBytes, check_pin_digest, model_sha256


def fetch(
    spec: ModelSpec,
    settings: TorchSettings,
    max_bytes: int | None = None,
    on_bytes: OnBytes | None = None,
    reserve: object = None,
) -> Path:
    # max_bytes, on_bytes, reserve: nothing is downloaded; sources.fetch checks the file's size
    assert spec.path is not None
    if not spec.path.exists():
        raise StartupError("no such file")
    if not spec.path.is_file():
        raise StartupError("not a regular file")
    if spec.sha256:
        check_pin_digest(model_sha256(spec.path, spec, settings), spec)  # start-up's verify stage reads it afresh
    return spec.path.resolve()


def is_cached(spec: ModelSpec, settings: TorchSettings) -> bool:
    return spec.path is not None and spec.path.is_file()  # nothing to download
