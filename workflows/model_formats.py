"""Loads a model file in whichever of the three formats it holds, recognised from the archive itself."""

from __future__ import annotations

import contextlib
import logging
import zipfile
from pathlib import Path
from typing import Any

import torch

from core.errors import StartupError

log = logging.getLogger("workflows.model_formats")

TORCHSCRIPT, EXPORT, PICKLE = "torchscript", "torch.export", "pickle"


def detect(path: Path) -> str:
    if not zipfile.is_zipfile(path):
        return PICKLE  # torch.save's legacy (non-zip) format
    with zipfile.ZipFile(path) as archive:
        names = {name.split("/", 1)[-1] for name in archive.namelist()}
    if "constants.pkl" in names or any(name.startswith("code/") for name in names):
        return TORCHSCRIPT
    if "archive_format" in names or any(name.startswith("models/") and name.endswith(".json") for name in names):
        return EXPORT
    return PICKLE


def load(path: Path, use_jit: bool, device: torch.device) -> tuple[Any, str]:
    """(callable model on ``device`` in eval mode, format name)."""
    kind = TORCHSCRIPT if use_jit else detect(path)
    try:
        if kind == TORCHSCRIPT:
            model = torch.jit.load(str(path), map_location=device)
        elif kind == EXPORT:
            model = torch.export.load(str(path)).module().to(device)
        else:
            # Pickles run code when loaded. Every source only yields files the operator named
            # (local path, their Hugging Face repo, or an allow-listed Arweave owner's upload).
            model = torch.load(str(path), map_location=device, weights_only=False)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StartupError(f"cannot load {path.name} as {kind}: {reason}") from None
    if not callable(model):
        what = "a state_dict" if isinstance(model, dict) else type(model).__name__
        raise StartupError(
            f"{path.name} holds {what}, not a model; save the whole module "
            "(torch.save(model), torch.jit.save or torch.export.save)"
        )
    if kind == PICKLE:
        log.warning("loaded a pickled module from %s: pickles run code, so only trusted sources are allowed", path)
    if hasattr(model, "eval"):
        # torch.export modules may refuse eval(); they are already traced in inference form.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            model.eval()
    return model, kind


def parameter_dtype(model: Any) -> torch.dtype | None:
    """The floating dtype of the model's parameters, if it has any."""
    for tensors in (getattr(model, "parameters", None), getattr(model, "buffers", None)):
        if tensors is None:
            continue
        for tensor in tensors():
            if tensor.is_floating_point():
                return tensor.dtype
    return None
