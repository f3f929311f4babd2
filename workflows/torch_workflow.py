"""TorchInferenceWorkflow: a PyTorch model behind the contract's tensor vocabulary, batched by shape."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import orjson
import torch

from core.errors import ModelError, StartupError, first_line
from core.settings import EMBEDDED_MODEL, EMBEDDED_WARMUP_INPUT, TorchSettings
from core.tensor_values import SentTensor
from workflows import model_formats, sources, tensors
from workflows.base import TensorWorkflow, check_kwargs, record_batch_check


class TorchInferenceWorkflow(TensorWorkflow[dict[str, Any], Any]):
    """Keyword arguments (``CLASSIC_INF_WORKFLOW_KW_ARGS``):

    model selection: ``model_path`` | ``model_name`` | ``model_source`` + ``model_args``; optional ``revision``,
    ``sha256`` (pin). Loading: ``use_jit``, ``device`` ("auto", "cpu", "cuda", ...), ``num_threads``.
    Batching: ``batching`` (concatenate requests of rank >= 2 and equal dtype and trailing shape along dim 0;
    default true), ``cast_inputs`` (cast inputs to a floating model's parameter dtype; default true),
    ``max_elements`` per request.
    Start-up: ``warmup_input``, a request's OFFCHAIN data run once before the service reports ready, alone and as a
    batch of two; batching is turned off when the two answers differ (the embedded model has one built in).
    Precision: ``precision`` ("float32", "float16", "bfloat16", "float64"; default: the model's own) converts the
    floating parameters at load and float inputs before the forward; floating outputs come back in the model's own
    dtype (below: where the model runs).

    ``batch_key``, ``batch``, ``unbatch`` and ``postprocess`` are TensorWorkflow's (workflows/base.py).
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
        precision: str | None = None,
        num_threads: int | None = None,
        batching: bool = True,
        cast_inputs: bool = True,
        max_elements: int | None = None,
        warmup_input: dict[str, Any] | None = None,
        settings: TorchSettings | None = None,
    ) -> None:
        check_kwargs(
            TorchInferenceWorkflow.__init__,
            {k: v for k, v in locals().items() if k not in ("self", "settings")},
            positive=("num_threads", "max_elements"),
        )
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
        self.use_jit = self.settings.use_jit if use_jit is None else use_jit
        self.device_name = device
        self.precision_name = precision
        self.num_threads = num_threads or self.settings.num_threads
        self.batching = batching
        self.cast_inputs = cast_inputs
        self.max_elements = max_elements or self.settings.max_elements
        # The embedded model's own warm-up input, unless the operator gave one: its failure must not read as theirs.
        self.builtin_warmup = (
            warmup_input is None and self.spec.path is not None and _same_file(self.spec.path, EMBEDDED_MODEL)
        )
        self.warmup_input = EMBEDDED_WARMUP_INPUT if self.builtin_warmup else warmup_input
        self.model: Any = None
        self.info: dict[str, Any] = {}

    def fetch(self) -> Path:
        """Download (if needed) and verify the model file; safe to call before any worker starts."""
        return sources.fetch(self.spec, self.settings)

    def setup(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        self.device = resolve(self.device_name)
        precision = parse_precision(self.precision_name)
        path = self.fetch()
        try:
            self.model, kind = model_formats.load(
                path, self.use_jit, self.device, self.spec.filename, max_bytes=self.settings.max_loaded_model_bytes
            )
        except StartupError as e:
            # Chained: a per-request load (workflows/per_request.py) tells its client the reason alone, not the path.
            raise StartupError(f"model {self.spec.describe()}: {e}") from e
        self.model_dtype = model_formats.parameter_dtype(self.model)
        if kind == model_formats.EXPORT:
            self.expected_input = _exported_input(self.model)
        # model_dtype stays the model's own: requests are cast to it and answers come back in it, whatever the
        # precision the forward runs in (docs/contract.md, "Precision").
        self.compute_dtype = self.model_dtype
        if precision is not None:
            self.model = convert(self.model, self.model_dtype, precision)
            self.compute_dtype = precision
        self.info = {
            "source": self.spec.source,
            "repo": self.spec.repo_id or str(self.spec.path),
            "file": self.spec.filename,
            "revision": self.spec.revision,
            "sha256": sources.model_sha256(path, self.spec, self.settings),
            "format": kind,
            "dtype": tensors.NAMES.get(self.model_dtype) if self.model_dtype else None,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
            "precision": precision_name(self.compute_dtype),
            "threads": torch.get_num_threads(),
            "cache_dir": str(self.settings.model_cache_dir),
            "batching": {"enabled": self.batching, "checked": False, "reason": _NOT_CHECKED},
        }
        if not self.batching:
            self.info["batching"]["reason"] = "turned off by CLASSIC_INF_WORKFLOW_KW_ARGS batching=false"

    def warmup(self) -> bool:
        """In the runner process, after ``setup``: ``warmup_input`` alone, so the first request does not pay for lazy
        initialisation, then (batching on) ``check_batching`` with it.
        Raises StartupError when the model fails on the input alone (saying so when the input was the embedded
        model's built-in one, not the operator's)."""
        if self.warmup_input is None:
            return False
        try:
            item = self.preprocess(self.warmup_input)
            if self.batching and self.batch_key(item) is not None:
                self.check_batching(item)
            else:  # nothing to check: the input alone is the warm-up
                self.run_model(item)
        except Exception as e:
            if self.builtin_warmup:
                raise StartupError(self._builtin_warmup_failed(e)) from None
            raise StartupError(f"warmup_input: {_reason(e)}") from None
        if self.expected_input is None:  # a torch.export file's own input spec says more than one example
            self.expected_input = ("warmed up with", list(item.shape), tensors.NAMES.get(item.dtype))
        if not self.batching:
            return True
        if self.batch_key(item) is None:
            reason = f"not checked: warmup_input has rank {item.dim()}, and requests of rank < 2 always run alone"
            self.info["batching"] = {"enabled": True, "checked": False, "reason": reason}
        return True

    def check_batching(self, item: torch.Tensor, first: str = "the warm-up input") -> None:
        """In the runner process, on the thread that runs the model (at start-up; for a per-request model, before its
        first shared forward): ``item`` (a preprocessed input of rank >= 2, named ``first`` in the reason) in one
        batch with variants of it (``_variants``), which must give each the answer it gets alone; when they do not,
        or the model cannot take the batch, batching is turned off. ``describe()`` says which.
        Raises what the model raises on ``item`` alone."""
        record_batch_check(self, item, _difference, _variants, first)

    def _builtin_warmup_failed(self, error: Exception) -> str:
        """Why the embedded model's built-in warm-up input failed, and how to get past it: that input is double,
        which reaches a float model only cast (``cast_inputs``)."""
        dtype = self.warmup_input["dtype"]
        model = tensors.NAMES.get(self.model_dtype) if self.model_dtype is not None else None
        reason = _reason(error)
        fix = "give CLASSIC_INF_WORKFLOW_KW_ARGS a warmup_input of the requests you will send"
        if not self.cast_inputs and model is not None and model != dtype:
            example = orjson.dumps({**self.warmup_input, "dtype": model}).decode()
            fix = f'set cast_inputs to true, or {fix}, e.g. "warmup_input": {example}'
        return (
            f"the embedded model's built-in warm-up input ({dtype}; no warmup_input was given) failed: {reason}; {fix}"
        )

    def describe(self) -> dict[str, Any]:
        """In the runner process. ``gpu`` (None on a CPU) is measured at each call: the runner asks once, when the
        model is ready."""
        return {**self.info, "gpu": gpu_info(self.device)} if self.info else self.info

    def preprocess(self, data: dict[str, Any] | SentTensor) -> torch.Tensor:
        """The request's tensor (its ``data``, or the ``SentTensor`` an API worker decoded it to) in the model's
        dtype; InputError for a value the cast does not keep (``NeedsValues`` for a ``SentTensor``'s)."""
        sent = tensors.decode(data, self.max_elements)
        tensor, dtype = sent, self.model_dtype
        values = None if type(data) is SentTensor else data["values"]
        if self.cast_inputs and dtype is not None and tensor.dtype != dtype and not tensor.is_complex():
            tensor = tensors.cast_to_model(tensor, dtype, values)
        compute = self.compute_dtype
        if compute != dtype and tensor.is_floating_point() and tensor.dtype != compute:
            # The forward runs in the lowered precision: the value that reaches the model is the one cast from what
            # was sent (2049 as half is 2048, 70000 is inf), so the contract's fit rules apply to that dtype too.
            tensor = tensors.cast_to_model(sent, compute, values, "the precision the model runs in")
        return tensor

    preprocess.takes_sent_tensors = True  # type: ignore[attr-defined]  # workflows/base.py takes_sent_tensors

    def run_model(self, batch: torch.Tensor) -> Any:
        """On the model thread: the batch to the device once, the forward, the whole output back to the CPU once
        (floating outputs in a lowered precision cast back to the model's own dtype first)."""
        if self.num_threads and getattr(_on_this_thread, "threads", None) != self.num_threads:
            # MKL keeps its thread count per thread: set in ``setup`` (another thread), it did not reach the model
            # thread, whose matrix products then woke a second thread per forward (docs/performance.md, section 24).
            torch.set_num_threads(self.num_threads)
            _on_this_thread.threads = self.num_threads
        with torch.inference_mode():
            batch = to_device(batch, self.device)
            compute, own = self.compute_dtype, self.model_dtype
            if compute != own and batch.is_floating_point():
                batch = batch.to(compute)  # on the device: a GPU casts faster than the model thread would
            try:
                output = self.model(batch)
            except Exception as e:
                cast = self.cast_inputs and own is not None and batch.is_floating_point()
                if not (cast and _WANTS_INTEGERS.search(first_line(e))):
                    raise
                # The client's integer ids reached the model cast to its float dtype: the error blames a FloatTensor
                # nobody sent, and the fix is the operator's.
                error = ModelError(
                    f"the model failed on this input: {first_line(e)} (cast_inputs is true, so inputs are cast to the "
                    f'model\'s {tensors.NAMES.get(own, own)}; for a model that takes integer ids set "cast_inputs": '
                    "false in CLASSIC_INF_WORKFLOW_KW_ARGS)"
                )
                # No shape-and-dtype note after it (workflows/base.py): it would name the cast dtype, not the sent one.
                error.input_described = True  # type: ignore[attr-defined]
                raise error from None
            return to_host(output, {compute: own} if compute != own else None)


def _exported_input(model: Any) -> tuple[str, list[int | str | None], str | None] | None:
    """A torch.export module's one tensor input as it was exported (its dynamic dimensions None), for the 422 of a
    model that raised (``describe_input``); None for several inputs or a graph that does not say."""
    try:
        inputs = [node.meta.get("val") for node in model.graph.nodes if node.op == "placeholder"]
        if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor):
            return None
        shape = [d if isinstance(d, int) else None for d in inputs[0].shape]
        return ("exported for", shape, tensors.NAMES.get(inputs[0].dtype))
    except Exception:  # a hint only: a graph of another torch's making must not stop start-up
        return None


# A model error that asks for an integer tensor (embeddings, indexing): what the cast to a float dtype breaks.
_WANTS_INTEGERS = re.compile(r"\b(Long|Int)\b|must be long|integer tensor", re.IGNORECASE)


def _reason(error: Exception) -> str:
    """``error`` in one line for the start-up line: TorchScript's errors carry the script's traceback, whose last
    line says what went wrong (and names the exception itself)."""
    if isinstance(error, ModelError):
        return str(error).removeprefix("the model failed on this input: ")
    last = (str(error).strip().splitlines() or [""])[-1]
    return last if last.startswith(f"{type(error).__name__}:") else f"{type(error).__name__}: {last}"


def _variants(item: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
    """Other inputs of ``item``'s shape and dtype, for the batching check, each (input, how it was made). Features
    that a row's own symmetries keep (sums, means, sorts, max-pooling: all the same for values reversed) must differ
    too, so the values also change: floats times 2 plus 1 and times -3 plus 0.5 (no value but -1, resp. 0.125, stays
    put: between them they move every row); integers, which may be token ids or indices, only take values the input
    already has (filled with its smallest, and with its largest) or values between 0 and its own (halved, rounded
    down: a constant row of ids changes too); booleans (masks) are negated. Variants equal to ``item`` are left
    out."""
    made = [(item.flip(-1), "its values reversed along the last axis")]
    if item.is_floating_point() or item.is_complex():
        made += [(item * 2 + 1, "its values times 2 plus 1"), (item * -3 + 0.5, "its values times -3 plus 0.5")]
    elif item.dtype == torch.bool:
        made += [(~item, "its values negated")]
    elif item.numel():
        made += [(torch.full_like(item, item.min().item()), "filled with its smallest value")]
        made += [(torch.full_like(item, item.max().item()), "filled with its largest value")]
        made += [(torch.div(item, 2, rounding_mode="floor"), "its values halved")]
    return [(other, how) for other, how in made if not torch.equal(other, item)]


_on_this_thread = threading.local()  # the torch thread count applied to the calling thread
_NOT_CHECKED = "not checked: no warmup_input (CLASSIC_INF_WORKFLOW_KW_ARGS) to compare a batch with"

# (rtol, atol) for "the same answer": CPU and GPU kernels pick other blockings for 1 row than for 2, so a batched
# float32 answer may differ from the solo one in its last bits (~1e-7); rows that a batch mixes differ far more.
_TOLERANCES = {
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
    torch.float32: (1e-4, 1e-5),
    torch.float64: (1e-7, 1e-9),
    torch.complex64: (1e-4, 1e-5),
    torch.complex128: (1e-7, 1e-9),
}


def _difference(alone: Any, batched: Any) -> str | None:
    """How a batched item's output differs from its solo output, or None when they agree within float tolerance."""
    if type(alone) is not type(batched):
        return f"a {type(batched).__name__} instead of a {type(alone).__name__}"
    if isinstance(alone, (list, tuple)):
        if len(alone) != len(batched):
            return f"{len(batched)} outputs instead of {len(alone)}"
        return next(filter(None, map(_difference, alone, batched)), None)
    if isinstance(alone, dict):
        if alone.keys() != batched.keys():
            return f"keys {sorted(batched)} instead of {sorted(alone)}"
        return next(filter(None, (_difference(alone[k], batched[k]) for k in alone)), None)
    if not isinstance(alone, torch.Tensor):
        return None if alone == batched else f"{batched!r} instead of {alone!r}"
    if alone.shape != batched.shape or alone.dtype != batched.dtype:
        return f"shape {list(batched.shape)} {batched.dtype} instead of {list(alone.shape)} {alone.dtype}"
    rtol, atol = _TOLERANCES.get(alone.dtype, (0.0, 0.0))
    alone, batched = alone.detach().cpu(), batched.detach().cpu()
    if torch.allclose(batched, alone, rtol=rtol, atol=atol, equal_nan=True):
        return None
    if alone.dtype == torch.bool:
        return "boolean values differ"
    gap = (batched.to(torch.complex128 if alone.is_complex() else torch.float64) - alone).abs()
    gap = gap.nan_to_num(nan=float("inf")).masked_fill(alone.isnan() & batched.isnan(), 0.0)
    return f"largest difference {gap.max().item():.3g}"


def _same_file(path: Path, other: Path) -> bool:
    try:
        return path.resolve() == other.resolve()
    except OSError:
        return False


# Where the torch workflow's model runs and in which floating precision: the device, the transfers of a batch to
# it and of the output back, and the model's conversion to half or bfloat16.
#
# Everything here runs in the runner process: ``resolve``, ``parse_precision``, ``convert`` and ``gpu_info`` while the
# workflow sets up (and ``gpu_info`` again when the runner describes the model), ``to_device`` and ``to_host`` on the
# model's thread, once per batch.

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
