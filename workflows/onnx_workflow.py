"""ONNXInferenceWorkflow: an ONNX model run by onnxruntime behind the contract's tensor vocabulary.

Requests (OFFCHAIN ``data``), in three forms:

    {"inputs": {"x": {"dtype", "shape"?, "values"}, ...}}   named inputs, as infernet-ml 1.x's ONNX service took them
                                                            (2.0's, with dtype codes, arrive converted to this form:
                                                            public/infernet_ml_layouts.py)
    {"input": [[...]]}  or  {"x": [[...]], ...}             the original ONNX service: the model's input names mapped
                                                            to values; the key "input" names the model's first input
                                                            when no input has that name; dtypes are the model's own
    {"dtype", "shape"?, "values"}                           the contract's single tensor, for single-input models

Answers: a single-output model answers one tensor ``{"dtype", "shape", "values"}``, as the torch workflow does, so
the answer can be the next container's request; a model with several outputs answers ``{output_name: tensor}``.

``is_onnx(path)`` tells an ONNX file from the torch formats, for a default workflow that hands ``.onnx`` files here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from core.errors import InputError, ModelError, StartupError, first_line
from core.model_call import Unasked
from core.settings import TorchSettings
from workflows import sources, tensors
from workflows.base import InferenceWorkflow, check_kwargs, record_batch_check

# onnxruntime's element types -> the contract's dtype names; other types (strings, unsigned beyond uint8, bfloat16,
# sequences, maps) cannot travel in the contract's vocabulary.
_ORT_TYPES = {
    "tensor(float)": "float",
    "tensor(double)": "double",
    "tensor(float16)": "half",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int16)": "short",
    "tensor(int32)": "int",
    "tensor(int64)": "long",
    "tensor(bool)": "bool",
}
_CPU = "CPUExecutionProvider"
# ModelProto's fields 2..8 and 14 (producer_name .. opset_import, metadata_props, training_info, functions) with
# their wire types: what follows ir_version (field 1, a varint, always written first) in a serialized model.
_MODEL_PROTO_TAGS = frozenset({0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0x7A, 0x82})
# (rtol, atol) for "the same answer" at the start-up check: kernels block 1 row differently from 2.
_TOLERANCES = {np.float16: (1e-2, 1e-3), np.float32: (1e-4, 1e-5), np.float64: (1e-7, 1e-9)}


def is_onnx(path: str | Path) -> bool:
    """Whether ``path`` holds an ONNX model: a ``.onnx`` name, or bytes that open as a serialized ModelProto (field 1,
    ir_version, a small varint, then another ModelProto field). TorchScript and torch.export files are zip archives
    (``PK``) and pickles start with 0x80, so neither passes. Reads 3 bytes; any thread. Raises nothing: an unreadable
    file is not ONNX."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(3)
    except OSError:
        return False
    return len(head) == 3 and head[0] == 0x08 and 1 <= head[1] <= 0x7F and head[2] in _MODEL_PROTO_TAGS


class _Port:
    """One declared input or output: name, contract dtype, shape (ints, symbolic names, None for unknown)."""

    def __init__(self, arg: Any) -> None:
        self.name: str = arg.name
        self.type: str = arg.type
        self.dtype: str | None = _ORT_TYPES.get(arg.type)
        self.shape: list[int | str | None] | None = None if arg.shape is None else list(arg.shape)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype or self.type, "shape": self.shape}

    def shown(self) -> str:
        if self.shape is None:
            return "of any shape"
        return "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"

    def dynamic_batch(self) -> bool:
        """A first dimension declared as a name or unknown (or a negative size): the model takes any batch size."""
        if not self.shape:
            return False
        first = self.shape[0]
        return first is None or isinstance(first, str) or first < 0


class ONNXInferenceWorkflow(
    InferenceWorkflow[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]
):
    """Keyword arguments (``CLASSIC_INF_WORKFLOW_KW_ARGS``):

    model selection, as the torch workflow: ``model_path`` | ``model_name`` | ``model_source`` + ``model_args``
    (``load_args``, the original library's name, is taken too); optional ``revision``, ``sha256`` (pin).
    ``output_names``: the outputs to return (default: all; the original service's OUTPUT_NAMES).
    Running: ``providers`` (onnxruntime execution providers, default CPU only), ``num_threads`` (default
    TORCH_NUM_THREADS, else one fewer than the CPUs), ``max_elements`` per request (all inputs together).
    Batching: ``batching`` (default true) joins requests along the first axis, only when every input and output of
    the model declares that axis dynamic and the request's inputs have rank >= 2 and one leading size.
    Start-up: ``warmup_input``, a request's OFFCHAIN data run once alone and once as a batch of two; batching is
    turned off when the two answers differ.

    Constructed in each process that builds the workflow; ``setup``, ``warmup`` and the hooks run in the runner.
    Raises StartupError for KW_ARGS that do not name a model.
    """

    def __init__(
        self,
        model_source: str | int | None = None,
        model_args: dict[str, Any] | None = None,
        *,
        model_path: str | None = None,
        model_name: str | None = None,
        load_args: dict[str, Any] | None = None,
        revision: str | None = None,
        sha256: str | None = None,
        output_names: list[str] | str | None = None,
        providers: list[str] | None = None,
        num_threads: int | None = None,
        batching: bool = True,
        max_elements: int | None = None,
        warmup_input: dict[str, Any] | None = None,
        settings: TorchSettings | None = None,
    ) -> None:
        check_kwargs(
            ONNXInferenceWorkflow.__init__,
            {k: v for k, v in locals().items() if k not in ("self", "settings")},
            positive=("num_threads", "max_elements"),
        )
        self.settings = settings or TorchSettings.from_env()
        self.spec = sources.spec_from_kwargs(
            {
                "model_path": model_path,
                "model_name": model_name,
                "model_source": model_source,
                "model_args": model_args if model_args is not None else load_args,
                "revision": revision,
                "sha256": sha256,
            },
            self.settings,
        )
        if isinstance(output_names, str):
            output_names = [name.strip() for name in output_names.split(",") if name.strip()]
        self.requested_outputs = list(output_names or [])
        self.providers = list(providers or [_CPU])
        self.num_threads = num_threads or self.settings.num_threads
        self.batching = batching
        self.max_elements = max_elements or self.settings.max_elements
        self.warmup_input = warmup_input
        self.session: Any = None
        self.inputs: list[_Port] = []
        self.outputs: list[_Port] = []
        self.info: dict[str, Any] = {}

    def fetch(self) -> Path:
        """Download (if needed) and verify the model file; safe to call before any worker starts."""
        return sources.fetch(self.spec, self.settings)

    def setup(self) -> None:
        """In the runner process: the session on the verified file. Raises StartupError for a file onnxruntime cannot
        open, a provider it does not have, or inputs/outputs the contract cannot carry."""
        import onnxruntime as ort  # here, not at import: is_onnx must stay cheap for whoever imports this module

        path = self.fetch()
        missing = [name for name in self.providers if name not in ort.get_available_providers()]
        if missing:
            available = ", ".join(ort.get_available_providers())
            raise StartupError(f"providers: {', '.join(missing)} not available in onnxruntime (has {available})")
        options = ort.SessionOptions()
        if self.num_threads:
            options.intra_op_num_threads = self.num_threads
        options.inter_op_num_threads = 1  # one forward at a time, on the model thread
        try:
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self._model_error(f"cannot load {path.name} as ONNX: {reason}")
        self.inputs = [_Port(arg) for arg in self.session.get_inputs()]
        declared = [_Port(arg) for arg in self.session.get_outputs()]
        self.outputs = self._chosen_outputs(declared)
        for port in self.inputs + self.outputs:
            if port.dtype is None:
                kind = "input" if port in self.inputs else "output"
                self._model_error(
                    f"{kind} {port.name!r} has type {port.type}, which requests and "
                    f"answers cannot carry (supported: {', '.join(sorted(set(_ORT_TYPES.values())))})"
                    + ("; choose other outputs with output_names" if kind == "output" else "")
                )
        self.by_name = {port.name: port for port in self.inputs}
        reason = self._batching_reason()
        if reason is not None:
            self.batching = False
        self.info = {
            "source": self.spec.source,
            "repo": self.spec.repo_id or str(self.spec.path),
            "file": self.spec.filename,
            "revision": self.spec.revision,
            "sha256": sources.model_sha256(path, self.spec, self.settings),
            "format": "onnx",
            "dtype": self.inputs[0].dtype if self.inputs else None,
            "device": "cpu" if self.session.get_providers()[0] == _CPU else self.session.get_providers()[0],
            "providers": self.session.get_providers(),
            "threads": self.num_threads,
            "inputs": [port.describe() for port in self.inputs],
            "outputs": [port.describe() for port in self.outputs],
            "batching": {
                "enabled": self.batching,
                "checked": False,
                "reason": reason
                or "not checked: no warmup_input (CLASSIC_INF_WORKFLOW_KW_ARGS) to compare a batch with",
            },
        }

    def _model_error(self, reason: str) -> NoReturn:
        """Raises StartupError: the start-up line names the model's source and place; the reason alone is its cause,
        which is what a per-request model's client is told (workflows/per_request.py), as for the torch workflow."""
        raise StartupError(f"model {self.spec.describe()}: {reason}") from StartupError(reason)

    def _chosen_outputs(self, declared: list[_Port]) -> list[_Port]:
        if not self.requested_outputs:
            return declared
        names = {port.name: port for port in declared}
        unknown = [name for name in self.requested_outputs if name not in names]
        if unknown:
            raise StartupError(
                f"CLASSIC_INF_WORKFLOW_KW_ARGS: output_names: the model has no output {', '.join(map(repr, unknown))}"
                f" (its outputs: {', '.join(names)})"
            )
        return [names[name] for name in self.requested_outputs]

    def _batching_reason(self) -> str | None:
        """Why this model's requests must run alone, or None when its first axis is a batch axis by declaration."""
        if not self.batching:
            return "turned off by CLASSIC_INF_WORKFLOW_KW_ARGS batching=false"
        if not self.inputs:
            return "the model has no inputs; each request runs alone"
        fixed = [port.name for port in self.inputs + self.outputs if not port.dynamic_batch()]
        if fixed:
            return (
                f"the model declares a fixed or no first dimension on {', '.join(fixed)}; each request runs alone "
                "(export it with a dynamic first axis to batch)"
            )
        return None

    def warmup(self) -> bool:
        """In the runner process, after ``setup``: ``warmup_input`` alone, then (batching on) ``check_batching`` with
        it. Raises StartupError when the model fails on the input alone."""
        if self.warmup_input is None:
            return False
        try:
            item = self.preprocess(self.warmup_input)
            if self.batching and self.batch_key(item) is not None:  # the check runs the input alone first
                self.check_batching(item)
            else:
                self.unbatch(self.run_model(self.batch([item])), [item])
        except Exception as e:
            raise StartupError(f"warmup_input: {type(e).__name__}: {first_line(e)}") from None
        if not self.batching:
            return True
        if self.batch_key(item) is None:
            reason = "not checked: warmup_input has an input of rank < 2 or unequal leading sizes, which run alone"
            self.info["batching"] = {"enabled": True, "checked": False, "reason": reason}
        return True

    def check_batching(self, item: dict[str, np.ndarray], first: str = "the warm-up input") -> None:
        """In the runner process, on the thread that runs the model (at start-up; for a per-request model, before its
        first shared forward): ``item`` (a preprocessed input with a batch key, named ``first`` in the reason) in one
        batch with variants of it (``_variants``), which must give each the answer it gets alone; when they do not,
        or the model cannot take the batch, batching is turned off. ``describe()`` says which.
        Raises what the model raises on ``item`` alone."""
        record_batch_check(self, item, _difference, _variants, first)

    def describe(self) -> dict[str, Any]:
        """In the runner process: what ``GET /info`` reports under ``model``."""
        return self.info

    def preprocess(self, data: Any) -> dict[str, np.ndarray]:
        """On the runner's event loop: a request's data -> {input name: array of the model's dtype and shape}, in
        the model's input order. Raises InputError naming the input, the place and what the model expects."""
        if not isinstance(data, dict):
            raise InputError(f"data: expected an object; {self._expected()}")
        # name -> (tensor, values as sent, (prefix, strip): how an error's place is written in the request's terms)
        decoded: dict[str, tuple[torch.Tensor, Any, tuple[str, str]]] = {}
        inputs = data.get("inputs")
        if isinstance(inputs, dict):
            for name, tensor in inputs.items():
                port = self._port(name, f"inputs.{name}")
                if not isinstance(tensor, dict):
                    raise InputError(f"inputs.{name}: expected an object with 'dtype' and 'values'")
                prefix = f"inputs.{name}."
                decoded[port.name] = (self._decode(tensor, prefix), tensor.get("values"), (prefix, ""))
        elif "dtype" in data and "dtype" not in self.by_name:
            if len(self.inputs) != 1:
                raise InputError(f"data: the model takes {len(self.inputs)} inputs; {self._expected()}")
            decoded[self.inputs[0].name] = (self._decode(data, ""), data.get("values"), ("", ""))
        else:
            if not data:
                raise InputError(f"data: empty; {self._expected()}")
            for key, values in data.items():
                name = self.inputs[0].name if key == "input" and "input" not in self.by_name and self.inputs else key
                port = self._port(name, key)
                if not isinstance(values, list):
                    raise InputError(f"{key}: expected a (nested) list of numbers; {self._expected()}")
                tensor = self._decode({"dtype": port.dtype, "values": values}, key, strip="values")
                decoded[port.name] = (tensor, values, (key, "values"))
        missing = [port.name for port in self.inputs if port.name not in decoded]
        if missing:
            raise InputError(f"data: missing input {', '.join(map(repr, missing))}; {self._expected()}")
        total = sum(tensor.numel() for tensor, _, _ in decoded.values())
        if total > self.max_elements:
            raise InputError(f"data: {total} elements exceed the limit of {self.max_elements} per request")
        arrays = {port.name: self._fit(port, *decoded[port.name]) for port in self.inputs}
        self._check_shared_dimensions(arrays)
        return arrays

    def _check_shared_dimensions(self, arrays: dict[str, np.ndarray]) -> None:
        """A dimension the model names (``n`` in ``a [n, 4]`` and ``b [n, 2]``) is one size in every input that
        names it: onnxruntime does not check it, and broadcasting would answer each input's rows mixed up."""
        seen: dict[str, tuple[int, str]] = {}
        for port in self.inputs:
            for dim, size in zip(port.shape or [], arrays[port.name].shape):
                if not isinstance(dim, str):
                    continue
                known, named_by = seen.setdefault(dim, (size, port.name))
                if known != size:
                    alone = named_by == port.name  # [n, n]: one input's own axes
                    who = f"input {port.name!r} differs" if alone else f"inputs {named_by!r} and {port.name!r} differ"
                    sizes = f"{known} and {size}" if alone else f"{known} in {named_by!r}, {size} in {port.name!r}"
                    raise InputError(
                        f"data: {who} in the model's dimension {dim!r} ({sizes}), which must be one size; the "
                        f"model's inputs: {self._signature()}"
                    )

    def _port(self, name: Any, label: str) -> _Port:
        port = self.by_name.get(name)
        if port is None:
            raise InputError(f"{label}: the model has no input {name!r}; its inputs: {self._signature()}")
        return port

    def _decode(self, data: dict[str, Any], prefix: str, strip: str = "") -> torch.Tensor:
        try:
            return tensors.decode(data, self.max_elements)
        except InputError as e:
            raise InputError(_relabel(str(e), prefix, strip)) from None

    def _fit(self, port: _Port, tensor: torch.Tensor, values: Any, place: tuple[str, str]) -> np.ndarray:
        """The decoded tensor cast to the input's dtype (refusing values the cast would change) and checked against
        its declared shape."""
        assert port.dtype is not None
        prefix, strip = place
        label = prefix.rstrip(".") or "data"
        target = tensors.DTYPES[port.dtype]
        if tensor.dtype != target:
            if tensor.is_complex():
                raise InputError(f"{label}: {tensors.NAMES[tensor.dtype]} does not fit the model's {port.dtype}")
            try:
                tensor = tensors.cast_to_model(tensor, target, values)
            except InputError as e:
                raise InputError(_relabel(str(e), prefix, strip)) from None
        shape = list(tensor.shape)
        expected = port.shape
        if expected is not None and (
            len(shape) != len(expected)
            or any(isinstance(d, int) and d >= 0 and d != n for d, n in zip(expected, shape))
        ):
            raise InputError(f"{label}: shape {shape} does not fit the model's input {port.name!r} {port.shown()}")
        return np.ascontiguousarray(tensor.numpy())

    def _signature(self) -> str:
        return ", ".join(f"{port.name!r} {port.dtype} {port.shown()}" for port in self.inputs)

    def _expected(self) -> str:
        return f'send {{"inputs": {{name: {{"dtype", "shape", "values"}}}}}} for the inputs {self._signature()}'

    def describe_input(self, item: dict[str, np.ndarray]) -> str | None:
        """For the 422 of a forward that raised: the inputs as they reached the model and as the model declares
        them (``the input was 'x' float [3, 5]; the model declares 'x' float [n, 4]``)."""
        dtypes = {port.name: port.dtype for port in self.inputs}
        had = ", ".join(f"{name!r} {dtypes.get(name)} {list(array.shape)}" for name, array in item.items())
        return f"the input{'s were' if len(item) > 1 else ' was'} {had}; the model declares {self._signature()}"

    def batch_key(self, item: dict[str, np.ndarray]) -> Any:
        # Only a first axis that the model declares dynamic everywhere may be joined, and only for requests of rank
        # >= 2: a rank-1 request's only axis is its features.
        if not self.batching:
            return None
        arrays = list(item.values())
        if any(array.ndim < 2 for array in arrays) or len({array.shape[0] for array in arrays}) != 1:
            return None
        return tuple((array.dtype.str, array.shape[1:]) for array in arrays)

    def batch(self, items: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        if len(items) == 1:
            return items[0]
        return {name: np.concatenate([item[name] for item in items]) for name in items[0]}

    def run_model(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """On the model thread: one forward; {output name: array}."""
        names = [port.name for port in self.outputs]
        return dict(zip(names, self.session.run(names, batch), strict=True))

    def unbatch(self, output: dict[str, np.ndarray], items: Sequence[dict[str, np.ndarray]]) -> list[Any]:
        if len(items) == 1:
            return [output]
        sizes = [next(iter(item.values())).shape[0] for item in items]
        cuts = np.cumsum(sizes)[:-1]
        parts: dict[str, list[np.ndarray]] = {}
        for name, array in output.items():
            if not isinstance(array, np.ndarray) or array.ndim == 0 or array.shape[0] != sum(sizes):
                got = list(array.shape) if isinstance(array, np.ndarray) else type(array).__name__
                raise ModelError(
                    f"output {name!r} {got} does not split into {len(items)} items of leading sizes {sizes}"
                )
            parts[name] = np.split(array, cuts)
        return [{name: parts[name][i] for name in output} for i in range(len(items))]

    def postprocess(self, output: dict[str, np.ndarray]) -> Any:
        encoded = {name: _encode(name, array) for name, array in output.items()}
        if len(encoded) == 1:
            [single] = encoded.values()
            return single
        return encoded

    postprocess.passes_unasked = True  # type: ignore[attr-defined]  # _encode leaves an Unasked as it is


def _encode(name: str, array: Any) -> Any:
    if isinstance(array, Unasked):  # an output the request did not ask for (workflows/base.py postprocess_all)
        return array
    if not isinstance(array, np.ndarray):
        raise ModelError(f"output {name!r}: a {type(array).__name__}, not a tensor")
    return tensors.encode(torch.from_numpy(np.ascontiguousarray(array)))


def _relabel(message: str, prefix: str, strip: str) -> str:
    """A decode error's place under the request's own key: "values[0]: ..." -> "inputs.x.values[0]: ..."."""
    if strip and message.startswith(strip):
        message = message[len(strip) :]
    return f"{prefix}{message}" if prefix else message


_REVERSED = "values reversed along the last axis"


def _variants(item: dict[str, np.ndarray]) -> list[tuple[dict[str, np.ndarray], str]]:
    """Other inputs of ``item``'s shapes and dtypes, for the batching check, each (input, how it was made): as the
    torch workflow's ``_variants``, per array: values reversed along the last axis; floats times 2 plus 1 and times
    -3 plus 0.5; integers (ids, indices) filled with their own smallest and largest value, and halved (rounded down);
    booleans negated. Variants equal to ``item`` are left out."""

    def scaled(array: np.ndarray, times: float, plus: float) -> np.ndarray:
        return (array * times + plus).astype(array.dtype) if array.dtype.kind in "fc" else array

    def filled(array: np.ndarray, pick: Callable[[np.ndarray], Any]) -> np.ndarray:
        return np.full_like(array, pick(array)) if array.dtype.kind in "iu" and array.size else array

    def changed(array: np.ndarray) -> np.ndarray:
        if array.dtype.kind == "b":
            return ~array
        return array // 2 if array.dtype.kind in "iu" else array

    made = [
        ({name: np.ascontiguousarray(np.flip(a, -1)) for name, a in item.items()}, _REVERSED),
        ({name: scaled(a, 2, 1) for name, a in item.items()}, "float values times 2 plus 1"),
        ({name: scaled(a, -3, 0.5) for name, a in item.items()}, "float values times -3 plus 0.5"),
        ({name: filled(a, np.min) for name, a in item.items()}, "integers filled with their smallest value"),
        ({name: filled(a, np.max) for name, a in item.items()}, "integers filled with their largest value"),
        ({name: changed(a) for name, a in item.items()}, "integers halved and booleans negated"),
    ]
    return [
        (other, f"its {how}")
        for other, how in made
        if any(not np.array_equal(other[name], array) for name, array in item.items())
    ]


def _difference(alone: dict[str, np.ndarray], batched: dict[str, np.ndarray]) -> str | None:
    for name, solo in alone.items():
        other = batched[name]
        if solo.shape != other.shape or solo.dtype != other.dtype:
            return (
                f"output {name!r}: shape {list(other.shape)} {other.dtype} instead of {list(solo.shape)} {solo.dtype}"
            )
        rtol, atol = _TOLERANCES.get(solo.dtype.type, (0.0, 0.0))
        if not np.allclose(other, solo, rtol=rtol, atol=atol, equal_nan=True):
            if solo.dtype.kind == "f":
                gap = np.nan_to_num(np.abs(other.astype(np.float64) - solo), nan=math.inf).max()
                return f"output {name!r}: largest difference {gap:.3g}"
            return f"output {name!r}: values differ"
    return None
