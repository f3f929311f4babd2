"""TorchInferenceWorkflow: a PyTorch model behind the contract's tensor vocabulary, batched by shape."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from workflows import model_formats, sources, tensors
from workflows.base import InferenceWorkflow
from workflows.config import TorchSettings
from workflows.errors import ModelError, StartupError


class TorchInferenceWorkflow(InferenceWorkflow):
    """Keyword arguments (``CLASSIC_INF_WORKFLOW_KW_ARGS``):

    model selection: ``model_path`` | ``model_name`` | ``model_source`` + ``model_args``; optional ``revision``,
    ``sha256`` (pin). Loading: ``use_jit``, ``device`` ("auto", "cpu", "cuda", ...), ``num_threads``.
    Batching: ``batching`` (concatenate requests of equal trailing shape; default true), ``cast_inputs``
    (cast inputs to a floating model's parameter dtype; default true), ``max_elements`` per request.
    Start-up: ``warmup_input``, a request's OFFCHAIN data run once before the service reports ready.
    """

    def __init__(
        self,
        *,
        model_path: str | None = None,
        model_name: str | None = None,
        model_source: str | int | None = None,
        model_args: dict[str, Any] | None = None,
        revision: str | None = None,
        sha256: str | None = None,
        use_jit: bool | None = None,
        device: str = "auto",
        num_threads: int | None = None,
        batching: bool = True,
        cast_inputs: bool = True,
        max_elements: int | None = None,
        warmup_input: dict[str, Any] | None = None,
        settings: TorchSettings | None = None,
    ) -> None:
        self.settings = settings or TorchSettings.from_env()
        self.spec = sources.spec_from_kwargs(
            {
                "model_path": model_path,
                "model_name": model_name,
                "model_source": model_source,
                "model_args": model_args,
                "revision": revision,
                "sha256": sha256,
            },
            self.settings,
        )
        self.use_jit = self.settings.use_jit if use_jit is None else bool(use_jit)
        self.device_name = device
        self.num_threads = num_threads or self.settings.num_threads
        self.batching = batching
        self.cast_inputs = cast_inputs
        self.max_elements = max_elements or self.settings.max_elements
        self.warmup_input = warmup_input
        self.model: Any = None
        self.info: dict[str, Any] = {}

    def fetch(self) -> Path:
        """Download (if needed) and verify the model file; safe to call before any worker starts."""
        return sources.fetch(self.spec, self.settings)

    def setup(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        self.device = _device(self.device_name)
        path = self.fetch()
        try:
            self.model, kind = model_formats.load(path, self.use_jit, self.device)
        except StartupError as e:
            raise StartupError(f"model {self.spec.describe()}: {e}") from None
        self.model_dtype = model_formats.parameter_dtype(self.model)
        self.info = {
            "source": self.spec.source,
            "repo": self.spec.repo_id or str(self.spec.path),
            "file": self.spec.filename,
            "revision": self.spec.revision,
            "sha256": sources.model_sha256(path, self.spec, self.settings),
            "format": kind,
            "dtype": tensors.NAMES.get(self.model_dtype) if self.model_dtype else None,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "cache_dir": str(self.settings.model_cache_dir),
        }

    def warmup(self) -> bool:
        """One forward pass on ``warmup_input``, so the first request does not pay for lazy initialisation."""
        if self.warmup_input is None:
            return False
        try:
            self.run_model(self.preprocess(self.warmup_input))
        except Exception as e:
            raise StartupError(f"warmup_input: {type(e).__name__}: {e}") from None
        return True

    def describe(self) -> dict[str, Any]:
        return self.info

    def preprocess(self, data: Any) -> torch.Tensor:
        tensor = tensors.decode(data, self.max_elements)
        dtype = self.model_dtype
        if self.cast_inputs and dtype is not None and tensor.dtype != dtype and not tensor.is_complex():
            tensor = tensors.cast_to_model(tensor, dtype, data["values"])
        return tensor

    def batch_key(self, item: torch.Tensor) -> Any:
        if not self.batching or item.dim() == 0:
            return None
        return (item.dtype, tuple(item.shape[1:]))

    def batch(self, items: Sequence[torch.Tensor]) -> torch.Tensor:
        return items[0] if len(items) == 1 else torch.cat(list(items))

    def run_model(self, batch: torch.Tensor) -> Any:
        with torch.inference_mode():
            return self.model(batch.to(self.device))

    def unbatch(self, output: Any, items: Sequence[torch.Tensor]) -> list[Any]:
        if len(items) == 1:
            return [output]
        sizes = [item.shape[0] for item in items]
        if not isinstance(output, torch.Tensor) or output.dim() == 0 or output.shape[0] != sum(sizes):
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ModelError(f"output {got} does not split into {len(items)} items of leading sizes {sizes}")
        return list(torch.split(output, sizes))

    def postprocess(self, output: Any) -> Any:
        return tensors.encode_output(output)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise StartupError(f"device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StartupError(f"device: {name} requested but CUDA is not available")
    return device
