"""Where the torch workflow's model runs and in which floating precision: the device, the transfers of a batch to
it and of the output back, and the model's conversion to half or bfloat16.

Everything here runs in the runner process: ``resolve``, ``parse_precision``, ``convert`` and ``gpu_info`` while the
workflow sets up (and ``gpu_info`` again when the runner describes the model), ``to_device`` and ``to_host`` on the
model's thread, once per batch.
"""

from __future__ import annotations

from typing import Any

import torch

from core.errors import StartupError

# The ``precision`` keyword's vocabulary: torch's own names, so that ``float16`` reads as what the GPU runs.
PRECISIONS: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def precision_name(dtype: torch.dtype | None) -> str | None:
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def resolve(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``. Raises StartupError for an unknown device or a CUDA
    device on a machine without CUDA."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise StartupError(f"device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StartupError(f"device: {name} requested but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise StartupError(f"device: {name} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def parse_precision(name: str | None) -> torch.dtype | None:
    """The ``precision`` keyword -> a floating dtype (None: the model's own). Raises StartupError naming the choices."""
    if name is None:
        return None
    dtype = PRECISIONS.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise StartupError(f"precision: unknown precision {name!r}; expected one of {', '.join(PRECISIONS)}")
    return dtype


def convert(model: Any, own: torch.dtype | None, precision: torch.dtype) -> Any:
    """The model with its floating parameters and buffers in ``precision`` (integer ones stay as they are).

    Raises StartupError when the model has no floating parameters (nothing to run in another precision), holds
    complex ones (``Module.to`` would drop their imaginary part), or is not a module that can be converted.
    """
    if own is None:
        raise StartupError("precision: the model has no floating-point parameters to convert")
    if own == precision:
        return model
    if not callable(getattr(model, "to", None)) or not callable(getattr(model, "parameters", None)):
        raise StartupError(f"precision: a {type(model).__name__} cannot be converted; save a torch.nn.Module")
    held = [*model.parameters(), *(model.buffers() if callable(getattr(model, "buffers", None)) else ())]
    if any(t.is_complex() for t in held):
        raise StartupError("precision: the model has complex parameters; it runs only in its own precision")
    try:
        converted = model.to(precision)
    except Exception as e:
        raise StartupError(f"precision: cannot convert the model to {precision_name(precision)}: {e}") from None
    return model if converted is None else converted


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on ``device``, copied once. To a GPU the copy goes through pinned (page-locked) host memory and does
    not block: the forward queued after it on the same stream waits for it, the model thread does not."""
    if batch.device == device:
        return batch
    if device.type == "cuda" and batch.device.type == "cpu":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def to_host(output: Any, cast: dict[torch.dtype, torch.dtype] | None = None) -> Any:
    """A model's output (a tensor or nested dicts, lists and tuples of them) on the CPU, floating tensors of a dtype
    in ``cast`` converted to the dtype it maps to (on their own device, before the copy).

    From a GPU every tensor is copied without blocking and the stream is synchronised once for the whole output, so a
    dict of many tensors costs one wait, not one per tensor.
    """
    cast = cast or {}
    waits: set[torch.device] = set()

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.dtype in cast:
                value = value.to(cast[value.dtype])
            if value.device.type == "cpu":
                return value
            if value.device.type == "cuda":
                waits.add(value.device)
                return value.to("cpu", non_blocking=True)
            return value.cpu()
        if isinstance(value, dict):
            return {key: move(item) for key, item in value.items()}
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple keeps its type
            return type(value)(*(move(item) for item in value))
        if isinstance(value, (list, tuple)):
            return type(value)(move(item) for item in value)
        return value

    moved = move(output)
    for device in waits:
        torch.cuda.current_stream(device).synchronize()  # non-blocking copies to the CPU are not done until then
    return moved


def gpu_info(device: torch.device) -> dict[str, Any] | None:
    """The model's GPU as ``/info`` and ``/service-resources`` report it (None on a CPU): name, index, compute
    capability, CUDA runtime version, and memory (bytes, the whole device's, as ``cudaMemGetInfo`` sees it now)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    free_bytes, total_bytes = torch.cuda.mem_get_info(index)
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "name": torch.cuda.get_device_name(index),
        "index": index,
        "capability": f"{major}.{minor}",
        "cuda_version": torch.version.cuda,
        "memory_total_bytes": total_bytes,
        "memory_used_bytes": total_bytes - free_bytes,
        "memory_allocated_bytes": torch.cuda.memory_allocated(index),  # by this process's tensors: the model's share
    }
