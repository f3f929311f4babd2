"""Loads a model file in whichever of the three formats it holds, recognised from the archive itself."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from core.errors import StartupError

log = logging.getLogger("workflows.model_formats")

TORCHSCRIPT, EXPORT, PICKLE = "torchscript", "torch.export", "pickle"
# Neither loads: UNKNOWN is no model format at all (loading it would be a guess), DAMAGED a zip archive (what
# TorchScript, torch.export and torch.save write) that cannot be read, e.g. truncated.
UNKNOWN, DAMAGED = "unknown", "damaged"
_PROBLEMS = {
    UNKNOWN: "not a TorchScript, torch.export or pickle file",
    DAMAGED: "a damaged zip archive (truncated or corrupted TorchScript, torch.export or torch.save file)",
}
_ZIP_MAGIC = b"PK\x03\x04"
# pickle's error for a class it cannot find in the module the pickle names (for a script's class: __main__)
_MISSING_CLASS = re.compile(r"Can't get attribute '([^']+)' on <module")
_PICKLE_PROTO = 0x80  # a pickle of protocol 2 or later (torch.save's legacy format starts with one) starts with it
# torch's zip writer stores one entry per tensor plus a few for code and metadata: thousands at most for real models.
MAX_ARCHIVE_ENTRIES = 10_000


class ArchiveTooLarge(StartupError):
    """A zip archive whose central directory declares more bytes or entries than may be loaded (``check_archive``);
    ``status``: what a per-request client sees (413)."""

    status = 413


def detect(path: Path, name: str | None = None) -> str:
    """The format of the model file at ``path``, from its bytes: TORCHSCRIPT, EXPORT, PICKLE, or UNKNOWN / DAMAGED
    for a file that is no model (``problem()`` says so in words). ``name``: the file's name in messages. Raises
    ArchiveTooLarge for a zip archive that states more than MAX_ARCHIVE_ENTRIES entries (before its directory is
    parsed), OSError when it cannot be read."""
    with open(path, "rb") as file:
        head = file.read(4)
    if not zipfile.is_zipfile(path):
        if head.startswith(_ZIP_MAGIC):
            return DAMAGED
        return PICKLE if head[:1] == bytes([_PICKLE_PROTO]) else UNKNOWN
    _check_entry_count(_stated_entries(path), name or path.name)
    try:
        with zipfile.ZipFile(path) as archive:
            names = {name.split("/", 1)[-1] for name in archive.namelist()}
    except (zipfile.BadZipFile, ValueError):
        return DAMAGED
    if "constants.pkl" in names or any(name.startswith("code/") for name in names):
        return TORCHSCRIPT
    if "archive_format" in names or any(name.startswith("models/") and name.endswith(".json") for name in names):
        return EXPORT
    return PICKLE if "data.pkl" in names else UNKNOWN


# Bounds on what export_pickles reads into memory: the configs are a few KiB, sample inputs a few tensors.
_MAX_CONFIG_BYTES = 16 * 1024 * 1024
_MAX_SAMPLE_INPUTS_BYTES = 64 * 1024 * 1024
# torch.export.load unpickles (torch.load weights_only=False, pickle.loads) any weight or constant whose config says
# use_pickle, every custom_obj_/opaque_obj_ constant, legacy data/weights|constants/<model>.pt files, and sample
# inputs that the safe unpickler refuses; a tensor entry it reads as raw bytes.
_PAYLOAD_CONFIG = re.compile(r"(?:^|/)data/(weights|constants)/[^/]+_(weights|constants)_config\.json$")
_LEGACY_PAYLOAD = re.compile(r"(?:^|/)data/(weights|constants)/[^/]+\.pt$")
_SAMPLE_INPUTS = re.compile(r"(?:^|/)data/sample_inputs/[^/]+\.pt$")
_RAW_TENSOR_PREFIXES = ("weight_", "tensor_")


def export_pickles(path: Path) -> str | None:
    """Why loading the torch.export archive at ``path`` would unpickle (run code of) what it holds, or None when it
    loads from raw tensor bytes and JSON alone. Reads the archive with zipfile, the sample inputs with torch's
    restricted unpickler (weights_only=True), never running the archive's code. Runs in the process that fetched the
    file, before it is loaded. Raises OSError when the file cannot be read."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = info.filename
                if _LEGACY_PAYLOAD.search(name):
                    return f"it holds pickled {name.split('/')[-2]} ({name.split('/', 1)[-1]}, the legacy format)"
                if _PAYLOAD_CONFIG.search(name):
                    if info.file_size > _MAX_CONFIG_BYTES:
                        return f"its {name.split('/', 1)[-1]} is {info.file_size} bytes, too big to check"
                    config = json.loads(archive.read(info)).get("config", {})
                    for fqn, entry in config.items():
                        if not isinstance(entry, dict):
                            return f"its {name.split('/', 1)[-1]} is malformed"
                        path_name = str(entry.get("path_name", ""))
                        if entry.get("use_pickle") or not path_name.startswith(_RAW_TENSOR_PREFIXES):
                            return f"{fqn!r} in its {name.split('/', 1)[-1]} is pickled"
                elif _SAMPLE_INPUTS.search(name):
                    if info.file_size > _MAX_SAMPLE_INPUTS_BYTES:
                        return f"its {name.split('/', 1)[-1]} is {info.file_size} bytes, too big to check"
                    data = archive.read(info)
                    if data:
                        try:
                            # torch.export.load retries these with weights_only=False when this refuses them.
                            torch.load(io.BytesIO(data), weights_only=True)
                        except Exception:
                            return f"its {name.split('/', 1)[-1]} holds more than tensors (a pickle)"
    except (zipfile.BadZipFile, ValueError, AttributeError, RuntimeError) as e:
        return f"it cannot be checked ({type(e).__name__})"
    return None


def pickled(path: Path, kind: str) -> str | None:
    """What loading the file at ``path`` (of format ``kind``, from ``detect``) would unpickle, in words for the 403
    (core/model_ids.py ``pickle_refused``): ``a pickle``, ``a torch.export archive with pickled entries (NAMES)``;
    None when loading it unpickles nothing. Raises OSError when the file cannot be read."""
    if kind == PICKLE:
        return "a pickle"
    entries = export_pickles(path) if kind == EXPORT else None
    return f"a torch.export archive with pickled entries ({entries})" if entries else None


def check_archive(path: Path, max_bytes: int, name: str) -> None:
    """Refuse, before torch opens it, a zip archive (TorchScript, torch.export and torch.save all write one) whose
    central directory declares more than MAX_ARCHIVE_ENTRIES entries, or more bytes uncompressed than the larger of
    ``max_bytes`` (MAX_LOADED_MODEL_BYTES) and the file's own size. Why: torch reads entries whole into memory, so a
    small file of deflated zeros (a zip bomb) would expand into gigabytes; torch writes entries stored, not
    compressed, so a real model's archive declares about its own size and a large start-up model still loads.
    Reads only the directory (stdlib zipfile). A file that is not a readable zip is left to ``detect`` (ONNX models
    are protobuf, not zip, and never come here). Raises ArchiveTooLarge naming the sizes; OSError when unreadable."""
    if not zipfile.is_zipfile(path):
        return
    _check_entry_count(_stated_entries(path), name)
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, ValueError):
        return  # detect() calls it DAMAGED
    _check_entry_count(len(entries), name)
    declared = sum(entry.file_size for entry in entries)
    if declared > max(max_bytes, size):
        raise ArchiveTooLarge(
            f"{name} is {size} bytes but its zip archive declares {declared} bytes uncompressed, more than "
            f"MAX_LOADED_MODEL_BYTES ({max_bytes}) and the file's own size allow; refused before loading it"
        )


def _check_entry_count(entries: int | None, name: str) -> None:
    if entries is not None and entries > MAX_ARCHIVE_ENTRIES:
        raise ArchiveTooLarge(
            f"{name}: its zip archive has {entries} entries, more than the {MAX_ARCHIVE_ENTRIES} a model may have"
        )


def _stated_entries(path: Path) -> int | None:
    """The entry count the archive's end-of-central-directory record states (ZIP64 too), read before zipfile parses
    the directory (a directory of millions of entries would take gigabytes as ZipInfo objects). zipfile's own reader
    of that record is private: where it is missing, None, and the count is checked after parsing."""
    reader, index = getattr(zipfile, "_EndRecData", None), getattr(zipfile, "_ECD_ENTRIES_TOTAL", None)
    if reader is None or index is None:
        return None
    try:
        with open(path, "rb") as file:
            end = reader(file)
    except (OSError, zipfile.BadZipFile):
        return None
    return end[index] if end and isinstance(end[index], int) else None


def problem(kind: str) -> str | None:
    """Why a file of format ``kind`` (``detect``) is no model, or None when it is one."""
    return _PROBLEMS.get(kind)


def load(
    path: Path, use_jit: bool, device: torch.device, name: str | None = None, *, max_bytes: int
) -> tuple[Any, str]:
    """(callable model on ``device`` in eval mode, format name). ``name``: the file's name in messages (``path`` may
    be a cache blob named by its hash); ``max_bytes``: MAX_LOADED_MODEL_BYTES, the bound ``check_archive`` applies
    before torch opens the file (every model torch loads passes here, the start-up model included). Raises
    ArchiveTooLarge, or StartupError with a one-line reason, without the path's folder."""
    name = name or path.name
    kind = TORCHSCRIPT if use_jit else detect(path, name)
    if problem(kind):
        raise StartupError(f"{name}: {problem(kind)}")
    check_archive(path, max_bytes, name)
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
        missing = _MISSING_CLASS.match(reason) if kind == PICKLE else None
        if missing:
            # The usual notebook case: the class was defined in the script that saved it, which is not here.
            raise StartupError(
                f"cannot load {name} as a pickle: it names class {missing[1]!r}, which cannot be imported here; put "
                "the class in a module on PYTHONPATH (a pickle stores only where to find it), or save the model with "
                "torch.jit.save or torch.export.save"
            ) from None
        raise StartupError(f"cannot load {name} as {kind}: {reason.replace(str(path), name)}") from None
    if not callable(model):
        what = "a state_dict" if isinstance(model, dict) else type(model).__name__
        raise StartupError(
            f"{name} holds {what}, not a model; save the whole module "
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
