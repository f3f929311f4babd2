"""The request and answer layouts of the newer Infernet torch services (infernet-ml 1.x and 2.0), in our vocabulary.

Every request is turned into this service's own tensor form, ``{"dtype": NAME, "shape": [..], "values": [..]}``
(NAME one of ``float double cfloat cdouble half bfloat16 uint8 int8 short int long bool``; complex values as
``[real, imag]`` pairs), plus the model it names and a :class:`Reply` saying how to write the answer, so the rest of
the service is unchanged. Pure functions (numpy and eth_abi only): they run where a request is parsed (an API
worker's event loop). Every malformed request raises :class:`LayoutError` (a ``ValueError``; the service answers
400) or ``core.model_ids.ModelIdError`` for a malformed model id (400 too).

Formats, read from ``ritual-net/infernet-monorepo`` (no code taken from it):

OFFCHAIN
  * today's form (the original service): ``data = {"dtype": NAME, "values": NESTED, "shape"?}``. Unchanged.
  * 1.x (tag v1.0.0, ``torch_inference_service/src/app.py``, ``utils/common_types.py`` ``TensorInput``):
    ``data = {"input": {"dtype": NAME, "shape", "values": NESTED}, "model_source"?, "load_args"?}``; the answer is
    1.x's ``{"dtype": the request's NAME, "shape": the output's, "values": FLAT}`` (``format_offchain_answer``).
  * 2.0 (tags v2.0.0/v2.1.0, ``services/torch.py`` ``TorchInferenceRequest``, ``utils/codec/vector.py``
    ``RitualVector``): ``data = {"model_id"?: ID, "input": {"dtype": CODE, "shape", "values": FLAT},
    "output_arithmetic"?: "ieee" | "fixed_point", "output_num_decimals"?: int}``; the answer is a vector in the
    same layout, ``{"dtype": CODE, "shape", "values": FLAT}``. A bare 2.0 vector (``{"dtype": CODE, ...}`` without
    the envelope) is accepted too and answered the same way.
  * 2.0 ONNX (``services/onnx.py`` ``ONNXInferenceRequest``): ``data = {"model_id"?, "inputs": {NAME: VECTOR_2_0},
    "output_arithmetic"?, "output_num_decimals"?}``; each vector becomes our form under its name (the ONNX
    workflow checks the names), and the answer is 2.0's ``{"result": [VECTOR_2_0 per output]}``; on chain one vector,
    so several outputs are a LayoutError that says to ask OFFCHAIN or serve one output (``encode_chain_answer``).
    ``inputs`` with our dtype names (1.x ONNX's form) is the ONNX workflow's own data, answered in our form.

  How they are told apart: ``dtype`` at the top level is today's form (a name) or a bare 2.0 vector (an integer);
  otherwise ``input`` is an envelope, 2.0 when its ``dtype`` is an integer, 1.x when it is a name. The model fields
  (``model_id``, or ``model_source`` + ``load_args``) name the model; not both kinds at once.

CHAIN (``data`` is hex of ABI bytes)
  * today's: ``abi.encode(int256[] values)``, SD59x18; first word ``0x20`` (the array's offset).
  * 1.x (``app.py`` v1.0.0): ``abi.encode(uint8 source, string repo_id, string filename, string version,
    bytes vector)``; three empty strings mean the default model. The first word is the source: 0, 1 or 2.
    ``vector`` is 1.x ``encode_vector``: ``abi.encode(uint8 dtype, uint16[] shape, T[] values)`` with the 1.x
    ``DataType`` numbering (our names, in order: float 0 ... bool 11) and T per dtype (``SOLIDITY_TYPE_LOOKUP``):
    float ``uint32`` (IEEE bits), double ``uint64``, cfloat ``uint64`` (real bits << 32 | imaginary bits), cdouble
    ``uint128`` (the same with 64-bit halves), half ``uint16``, bfloat16 ``uint16`` (1.x writes *IEEE half* bits
    here, so they are read as half), uint8 ``uint8``, int8 ``int8``, short ``int16``, int ``int32``, long ``int64``,
    bool ``bool``. The answer's ``raw_output`` is a 1.x vector in the dtype of the request's vector (1.x's
    ``encode_vector(dtype, ...)``: a contract decodes fixed types), the values cast to it where nothing but
    floating rounding is lost, else a 422; ``raw_input`` echoes the request's hex, as 1.x did.
  * 2.0 (``services/torch.py``): ``abi.encode(bytes model_id, bytes vector)``; empty ``model_id`` means the default
    model, else it is the ABI model id of ``core.model_ids``. The first word is ``0x40`` (the first offset past a
    two-word head); ``0x60`` and ``0x80`` are the same with the optional trailing ``uint8`` output options of 2.0's
    client encoder, which the 2.0 service ignored and so do we. ``vector`` is 2.0 ``RitualVector.to_web3``:
    ``abi.encode(uint8 arithmetic, uint8 decimals, uint8 dtype, uint16[] shape, T[] values)``, arithmetic 0 =
    IEEE bits, 1 = fixed point (values times 10**decimals), dtype in the 2.0 numbering (:data:`V2_CODES`). The
    answer's ``raw_output`` is a 2.0 vector (IEEE, decimals byte 18, as the 2.0 service wrote); ``raw_input`` is
    empty, as 2.0 did.

  How they are told apart (``CHAIN_LAYOUT=auto``): by the first 32-byte word, which no two layouts share in a
  canonical encoding (what Solidity's ``abi.encode`` writes): 0..2 -> 1.x, 0x20 -> int256[], 0x40/0x60/0x80 ->
  2.0; anything else is a 400 naming the word. ``CHAIN_LAYOUT=int256|v1|v2`` reads every request in one layout.
  Every layout must be canonical, and bytes after the payload are ignored (in the vectors too), as infernet-ml's
  eth_abi ``decode`` ignored them. A CHAIN answer, and a 2.0 OFFCHAIN answer, hold one tensor: an answer of
  several is a LayoutError saying what it holds (:func:`describe_answer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

import numpy as np
from eth_abi import decode, encode
from eth_abi.exceptions import DecodingError, EncodingError

from core.model_ids import (
    ModelId,
    decode_model_id_abi,
    model_id_from_v1,
    model_id_from_v1_chain,
    parse_model_id,
    short_message,
)
from core.terms import MAX_RANK, SentValues, json_text, too_many_dimensions

SCALE = 10**18
# Whatever the caller's own limit, no vector may claim more elements than this (MAX_REQUEST_ELEMENTS' default).
MAX_ELEMENTS = 4_000_000
_WORD = 32
_UINT16_MAX = 2**16 - 1
_INT128 = (-(2**127), 2**127 - 1)
_INT256 = (-(2**255), 2**255 - 1)
_LONG_MAX = 2**63 - 1

# 1.x DataType: the code is the index (utils/codec/vector.py at v1.0.0).
V1_NAMES = ("float", "double", "cfloat", "cdouble", "half", "bfloat16", "uint8", "int8", "short", "int", "long", "bool")
_V1_SOLIDITY = {
    "float": "uint32",
    "double": "uint64",
    "cfloat": "uint64",
    "cdouble": "uint128",
    "half": "uint16",
    "bfloat16": "uint16",
    "uint8": "uint8",
    "int8": "int8",
    "short": "int16",
    "int": "int32",
    "long": "int64",
    "bool": "bool",
}

# 2.0 DataType (utils/codec/vector.py at v2.0.0): code -> (2.0 name, our name, Solidity type). float128 and
# float256 are float64 values in wider words; uint16/32 widen to our int/long, uint64 to long. A wider dtype keeps
# the declared one's range: an unsigned value below 0 or above its maximum is refused, as is a uint64 beyond long.
V2_CODES: dict[int, tuple[str, str, str]] = {
    0: ("float16", "half", "int16"),
    1: ("float32", "float", "int32"),
    2: ("float64", "double", "int64"),
    3: ("float128", "double", "int128"),
    4: ("float256", "double", "int256"),
    5: ("int8", "int8", "int8"),
    6: ("int16", "short", "int16"),
    7: ("int32", "int", "int32"),
    8: ("int64", "long", "int64"),
    9: ("uint8", "uint8", "uint8"),
    10: ("uint16", "int", "uint16"),
    11: ("uint32", "long", "uint32"),
    12: ("uint64", "long", "uint64"),
    13: ("complex64", "cfloat", "uint64"),
    14: ("complex128", "cdouble", "uint128"),
    15: ("bool", "bool", "bool"),
}
# Our name -> 2.0 code for answers. bfloat16 has no 2.0 code: float32 holds every bfloat16 value exactly.
V2_CODE_OF = {
    "half": 0,
    "float": 1,
    "bfloat16": 1,
    "double": 2,
    "int8": 5,
    "short": 6,
    "int": 7,
    "long": 8,
    "uint8": 9,
    "cfloat": 13,
    "cdouble": 14,
    "bool": 15,
}
# Answers whose values keep their own unsigned dtype (workflows/tensors.py encode: named int or long) take its code.
_OWN_V2_CODE = {np.dtype(np.uint16): 10, np.dtype(np.uint32): 11, np.dtype(np.uint64): 12}
_UNSIGNED_V2 = {10: 2**16 - 1, 11: 2**32 - 1, 12: 2**64 - 1}  # the declared maximum of each widened unsigned code
_WIDENED_V2 = (3, 4, 10, 11, 12)  # codes whose values reach the model in a wider dtype of ours
_INTEGER_NUMPY = {"uint8": np.uint8, "int8": np.int8, "short": np.int16, "int": np.int32, "long": np.int64}
_FIXED_POINT_CODE = 3  # 2.0 writes every fixed-point vector as float128 (int128 words)
_FLOAT_V2 = {0: np.float16, 1: np.float32, 2: np.float64, 3: np.float64, 4: np.float64}
_INT_VIEW_V2 = {0: np.int16, 1: np.int32, 2: np.int64, 3: np.int64, 4: np.int64}
COMPLEX_NAMES = ("cfloat", "cdouble")  # the contract's complex dtypes: [real, imag] pairs in JSON
_COMPLEX = COMPLEX_NAMES
_FLOATING = ("half", "bfloat16", "float", "double")
CHAIN_LAYOUTS = ("auto", "int256", "v1", "v2")


class LayoutError(ValueError):
    """A request (or an answer) that does not fit its layout; the message says which part and why."""


class Layout(StrEnum):
    """Which service's layout a request used, so its answer is written in the same one."""

    CLASSIC = "classic"  # today's: OFFCHAIN {"dtype": NAME, ...}; CHAIN int256[]
    V1 = "v1"
    V2 = "v2"


@dataclass(frozen=True)
class Reply:
    """How to write the answer: the layout; for 2.0 CHAIN answers the arithmetic and decimals byte; for 1.x answers
    the request's dtype name (``dtype``: 1.x answered in the dtype the request named, whatever the model's output
    was); ``results``: the answer is the ONNX services' ``{"result": [vector, ...]}`` (one per output)."""

    layout: Layout = Layout.CLASSIC
    fixed_point: bool = False
    decimals: int = 18
    raw_input: str = ""
    dtype: str = ""
    results: bool = False


def split_request(
    data: Any, max_elements: int | None = None, names_served: Callable[[str], bool] | None = None
) -> tuple[ModelId | None, Any, Reply]:
    """OFFCHAIN ``data`` of any supported layout -> (model named or None, tensor data in our form, reply layout).

    ``names_served(model_id)``: whether a model id's text names the served model in any form it is advertised in (its
    id, file name or sha256: public/resources.py ``supports``); a request naming it so (2.0 ``model_id``, or 1.x
    ``model_source`` + ``load_args``, a LOCAL source included) is the default call (model None), as
    ``/service-resources?model_id=`` says it is supported.

    Today's form and anything unrecognised come back unchanged (the tensor decoder reports what is wrong, as
    today). ``{"inputs": {name: vector}}`` is the ONNX services' form (:func:`_split_named_inputs`). An ``input``
    is an envelope's only when the data names a model or ``input`` holds a ``dtype``; any other ``input`` (the ONNX
    service's ``{"input": [[...]]}``, a custom workflow's) is the workflow's own data.
    Raises LayoutError or ModelIdError (both 400).
    """
    if not isinstance(data, dict):
        return None, data, Reply()
    if "dtype" in data:
        if _is_code(data["dtype"]):
            return None, vector_v2_to_ours(data, max_elements), Reply(Layout.V2)
        return None, data, Reply()
    v1_fields = "model_source" in data or "load_args" in data
    names_model = v1_fields or "model_id" in data
    if "inputs" in data and "input" not in data:
        return _split_named_inputs(data, max_elements, names_served, names_model)
    if "input" not in data:
        return None, data, Reply()
    vector = data["input"]
    if not names_model and not (isinstance(vector, dict) and "dtype" in vector):
        # Not an envelope: a workflow's own `input` (the ONNX service's {"input": [[...]]}, a custom workflow's
        # object) goes to the workflow unchanged.
        return None, data, Reply()
    if not isinstance(vector, dict):
        raise LayoutError("input: expected an object with dtype, shape and values")
    model = _named_model(data, names_served)
    if _is_code(vector.get("dtype")):
        reply = Reply(Layout.V2, *_output_options(data))
        return model, vector_v2_to_ours(vector, max_elements, where="input"), reply
    tensor = {key: vector[key] for key in ("dtype", "shape", "values") if key in vector}
    dtype = vector.get("dtype")
    return model, tensor, Reply(Layout.V1, dtype=dtype if isinstance(dtype, str) else "")


def _named_model(data: dict[str, Any], names_served: Callable[[str], bool] | None) -> ModelId | None:
    """The model an envelope names (2.0 ``model_id``, or 1.x ``model_source`` + ``load_args``); None for the served
    model or none named. Raises LayoutError for both kinds at once, ModelIdError for a malformed id."""
    if ("model_source" in data or "load_args" in data) and "model_id" in data:
        raise LayoutError("data: model_id (2.0) and model_source/load_args (1.x) together; name the model one way")
    if "model_id" in data:
        # A local id may name the served model (public/app.py refuses any other: a request never names a file).
        text = data["model_id"]
        if text is None or (names_served is not None and isinstance(text, str) and names_served(text)):
            return None
        return parse_model_id(text, allow_local=True)
    if "model_source" in data or "load_args" in data:
        return model_id_from_v1(data.get("model_source"), data.get("load_args"), names_served)
    return None


def _split_named_inputs(
    data: dict[str, Any], max_elements: int | None, names_served: Callable[[str], bool] | None, names_model: bool
) -> tuple[ModelId | None, Any, Reply]:
    """The ONNX services' ``{"inputs": {name: vector}, ...}``: 2.0's when a vector's dtype is a code (each vector
    becomes our form; the answer is 2.0's ``{"result": [vector, ...]}``), else the workflow's own named inputs
    (1.x's form, our dtype names), which keep our answer. The model fields are read in both, so a request naming
    another model is never answered by the served one. Which names the model has is the workflow's to check (its
    400 lists them)."""
    inputs = data["inputs"]
    model = _named_model(data, names_served) if names_model else None
    if not isinstance(inputs, dict) or not any(
        isinstance(vector, dict) and _is_code(vector.get("dtype")) for vector in inputs.values()
    ):
        rest = {key: value for key, value in data.items() if key not in ("model_id", "model_source", "load_args")}
        return model, rest, Reply()
    ours = {name: vector_v2_to_ours(vector, max_elements, where=f"inputs.{name}") for name, vector in inputs.items()}
    return model, {"inputs": ours}, Reply(Layout.V2, *_output_options(data), results=True)


def format_offchain_answer(answer: Any, reply: Reply) -> Any:
    """Our answer -> the answer in the request's layout.

    1.x (``reply.dtype`` set): ``{"dtype": the request's dtype name, "shape": the output's, "values": FLAT}``, as
    1.x's torch service wrote it (``result.outputs``, flattened, labelled with the request's dtype); floating values
    as float64 numbers, the digits 1.x's ``tolist()`` printed (a float32 0.1 is 0.10000000149011612), so a client
    reading them in the labelled dtype gets the model's value. Complex values are ``[real, imag]`` pairs, labelled
    with their own dtype when the request's is real.
    2.0: one vector (2.0's ``TorchInferenceResult.output``): an answer of several tensors (a model's tuple, list or
    dict) raises LayoutError (the service answers 422), as for the 2.0 CHAIN answer; with ``reply.results`` (the
    ONNX services' named ``inputs``) ``{"result": [vector, ...]}``, one per output in the model's order, as 2.0's
    ONNX service answered. A workflow's own JSON without tensors is returned as it is. Pure; on the API worker's
    event loop.
    """
    if reply.layout == Layout.V1 and reply.dtype and _is_tensor(answer):
        # Complex values are pairs, which no real dtype reads: those keep their own name (1.x failed on them).
        complex_only = answer["dtype"] in _COMPLEX and reply.dtype not in _COMPLEX
        name = answer["dtype"] if complex_only else reply.dtype
        return {"dtype": name, "shape": list(answer["shape"]), "values": _flat_as_sent(answer)}
    if reply.layout != Layout.V2:
        return answer
    if reply.results:
        if _is_tensor(answer):
            tensors = [answer]
        else:
            tensors = list(answer.values()) if isinstance(answer, dict) else list(answer) if _is_list(answer) else []
        if not tensors or not all(_is_tensor(t) for t in tensors):
            raise LayoutError(f"output: the answer holds {describe_answer(answer)}; 2.0's result is a list of vectors")
        return {"result": [ours_to_vector_v2(t) for t in tensors]}
    if _is_tensor(answer):
        return ours_to_vector_v2(answer)
    if _count_tensors(answer):
        raise LayoutError(f"output: the answer holds {describe_answer(answer)}; a 2.0 answer holds one vector")
    return answer


def _flat_as_sent(answer: dict[str, Any]) -> Any:
    """An answer's values flattened as 1.x sent them: floating values widened to float64, complex as pairs."""
    values = np.asarray(answer["values"])
    if answer["dtype"] in _COMPLEX:
        return values.reshape(-1, 2).astype(np.float64)
    flat = values.reshape(-1)
    return flat.astype(np.float64) if flat.dtype.kind == "f" else flat


def vector_v2_to_ours(vector: Any, max_elements: int | None = None, where: str = "data") -> dict[str, Any]:
    """A 2.0 OFFCHAIN vector ``{"dtype": CODE, "shape": [..], "values": FLAT}`` -> our form.

    ``shape`` may be omitted (then ``[len(values)]``); complex values are ``[real, imag]`` pairs (2.0 had no JSON
    form for them). Raises LayoutError naming the field.
    """
    if not isinstance(vector, dict):
        raise LayoutError(f"{where}: expected an object with dtype, shape and values")
    code = vector.get("dtype")
    if not _is_code(code) or code not in V2_CODES:
        raise LayoutError(f"{where}.dtype: {json_text(code)} is not a 2.0 dtype code (0..15: {_v2_code_list()})")
    values = vector.get("values")
    if not isinstance(values, list):
        raise LayoutError(f"{where}.values: expected a flat list of numbers")
    limit = _limit(max_elements)
    if len(values) > limit:
        raise LayoutError(f"{where}.values: {len(values)} elements exceed the limit of {limit}")
    name = V2_CODES[code][1]
    shape = vector.get("shape")
    if shape is None:
        shape = [len(values)]
    _check_shape(shape, f"{where}.shape", limit)
    for i, value in enumerate(values):
        if isinstance(value, list) and name not in _COMPLEX:
            raise LayoutError(f"{where}.values[{i}]: a 2.0 vector's values are flat; got a list")
    if math.prod(shape) != len(values):
        raise LayoutError(f"{where}: shape {list(shape)} holds {math.prod(shape)} elements, values has {len(values)}")
    if code in _UNSIGNED_V2:
        _check_unsigned(values, code)
    if code in _WIDENED_V2:
        values = SentValues(values, "values", V2_CODES[code][0])  # a cast names the declared dtype, not ours
    return {"dtype": name, "shape": list(shape), "values": values}


def _check_unsigned(values: list[Any], code: int) -> None:
    """Refuse what the declared unsigned dtype cannot hold, in the tensor decoder's words for uint8 (our wider dtype
    would let a negative or too large value through). Values of other types are left to the tensor decoder."""
    label, high = V2_CODES[code][0], _UNSIGNED_V2[code]
    for i, value in enumerate(values):
        if isinstance(value, bool):
            raise LayoutError(f"values[{i}]: {label} expects numbers, got {'true' if value else 'false'}")
        if isinstance(value, float) and not value.is_integer():
            raise LayoutError(f"values[{i}]: {label} expects integers, got {value!r}")
        if not isinstance(value, (int, float)):
            continue
        if not 0 <= value <= high:
            shown = str(value) if isinstance(value, int) else repr(value)
            raise LayoutError(f"values[{i}]: {shown} is out of range for {label} [0, {high}]")
        if value > _LONG_MAX:
            raise LayoutError(f"values[{i}]: {value} ({label}) does not fit long, the widest integer dtype")


def ours_to_vector_v2(answer: dict[str, Any]) -> dict[str, Any]:
    """Our answer ``{"dtype": NAME, "shape", "values": NESTED}`` -> a 2.0 vector ``{"dtype": CODE, "shape", FLAT}``.

    Values stay a numpy array when they were one (orjson writes non-finite floats as null, as for our form);
    complex values become a flat list of ``[real, imag]`` pairs. Raises LayoutError for a dtype without a code, or
    integer values the code cannot hold (a workflow's own tensor-like JSON; a tensor's values always fit).
    """
    name = answer["dtype"]
    if name not in V2_CODE_OF:
        raise LayoutError(f"output: dtype {name!r} has no 2.0 dtype code")
    values = np.asarray(answer["values"])
    flat = values.reshape(-1, 2) if name in _COMPLEX else values.reshape(-1)
    code = answer_code_v2(name, values)
    if code == V2_CODE_OF[name] and name in _INTEGER_NUMPY and flat.dtype != _INTEGER_NUMPY[name]:
        _check_integers(name, flat)
    if isinstance(answer["values"], list):
        flat = flat.tolist()
    return {"dtype": code, "shape": list(answer["shape"]), "values": flat}


def answer_code_v2(name: str, values: Any) -> int:
    """The 2.0 code of an answer: its values' own dtype's when 2.0 has one our vocabulary lacks (uint16, uint32,
    uint64: the tensor encoder keeps them), else its name's. ``name`` must have a code (V2_CODE_OF)."""
    own = _OWN_V2_CODE.get(values.dtype) if isinstance(values, np.ndarray) else None
    return V2_CODE_OF[name] if own is None else own


def _check_integers(name: str, flat: np.ndarray) -> None:
    info = np.iinfo(_INTEGER_NUMPY[name])
    low, high = int(info.min), int(info.max)
    for i, value in enumerate(flat.tolist()):
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not whole or not low <= value <= high:
            raise LayoutError(f"output: values[{i}]: {value!r} does not fit {name} [{low}, {high}]")


def parse_chain_layout(raw: str | None, name: str = "CHAIN_LAYOUT") -> str:
    """The ``CHAIN_LAYOUT`` setting: ``auto`` (default), ``int256``, ``v1`` or ``v2``. Raises LayoutError naming it."""
    value = (raw or "auto").strip().lower()
    if value not in CHAIN_LAYOUTS:
        raise LayoutError(f"{name}: expected one of {', '.join(CHAIN_LAYOUTS)}, got {raw!r}")
    return value


def detect_chain_layout(blob: bytes) -> Layout:
    """Which layout CHAIN bytes use, from their first word (see the module's docstring). Raises LayoutError."""
    if len(blob) < _WORD:
        raise LayoutError(f"data: {len(blob)} bytes, shorter than one 32-byte ABI word")
    first = int.from_bytes(blob[:_WORD], "big")
    if first in (0, 1, 2):
        return Layout.V1
    if first == 0x20:
        return Layout.CLASSIC
    if first in (0x40, 0x60, 0x80):
        return Layout.V2
    shown = hex(first) if first < 2**64 else f"{blob[:_WORD].hex()[:16]}..."
    raise LayoutError(
        f"data: first ABI word {shown} fits no CHAIN layout (0x20: int256[]; 0, 1, 2: infernet-ml 1.x source; "
        "0x40: infernet-ml 2.0 (bytes model_id, bytes vector))"
    )


def split_chain_request(
    hex_data: str,
    layout: str = "auto",
    max_elements: int | None = None,
    names_served: Callable[[str], bool] | None = None,
) -> tuple[ModelId | None, dict[str, Any], Reply]:
    """CHAIN hex -> (model named or None, tensor data in our form, reply layout). ``names_served`` as for
    :func:`split_request`: a 1.x or 2.0 model id that names the served model is the default call (None).

    ``layout`` is the ``CHAIN_LAYOUT`` setting. ``hex_data`` is already checked hex
    (``public.app.parse_input``), without ``0x``. Raises LayoutError or ModelIdError (both 400).
    """
    try:
        blob = bytes.fromhex(hex_data)
    except ValueError:
        raise LayoutError("data: not a hex string") from None
    found = detect_chain_layout(blob) if layout == "auto" else Layout({"int256": "classic"}.get(layout, layout))
    if found == Layout.CLASSIC:
        return None, decode_int256(blob, max_elements), Reply()
    if found == Layout.V1:
        source, repo_id, filename, version, vector = _abi_decode(
            ("uint8", "string", "string", "string", "bytes"), blob, "data (1.x layout)"
        )
        model = model_id_from_v1_chain(source, repo_id, filename, version, names_served)
        tensor = decode_vector_v1(vector, max_elements)
        return model, tensor, Reply(Layout.V1, raw_input=hex_data, dtype=tensor["dtype"])
    head = int.from_bytes(blob[:_WORD], "big") if len(blob) >= _WORD else 0
    extra = {0x60: ("uint8",), 0x80: ("uint8", "uint8")}.get(head, ())
    model_blob, vector, *_ = _abi_decode(("bytes", "bytes", *extra), blob, "data (2.0 layout)")
    return decode_model_id_abi(model_blob, names_served), decode_vector_v2(vector, max_elements), Reply(Layout.V2)


def encode_chain_answer(answer: dict[str, Any], reply: Reply) -> dict[str, str]:
    """Our answer (one tensor) -> the five-key CHAIN answer, ``raw_output`` a vector of the request's layout.

    For 1.x and 2.0 layouts only (today's int256[] answer is ``public.chain.encode_output``). Raises LayoutError when
    the answer is not one tensor (saying what it holds; for a 2.0 ``inputs`` request of a model with several outputs,
    also what to send instead) or does not fit the encoding (a dimension beyond uint16, fixed point overflow).
    """
    if not _is_tensor(answer):
        version = "1.x" if reply.layout == Layout.V1 else "2.0"
        held = describe_answer(answer)
        if reply.results:  # the 2.0 ONNX ``inputs`` request: its OFFCHAIN answer holds every output
            raise LayoutError(
                f"output: the answer holds {held}; a 2.0 CHAIN answer holds one vector (raw_output is one "
                "RitualVector), and putting only the first on chain would drop the others unseen: ask with "
                'destination 1 (OFFCHAIN) for {"result": [a vector per output]}, or serve one output '
                "(the ONNX workflow's output_names)"
            )
        raise LayoutError(f"output: the answer holds {held}; a {version} CHAIN answer holds one vector")
    if reply.layout == Layout.V1:
        # 1.x wrote its answer in the dtype the request's vector named (encode_vector(dtype, ...)).
        raw = encode_vector_v1(reply.dtype or answer["dtype"], answer["shape"], answer["values"], answer["dtype"])
    elif reply.layout == Layout.V2:
        raw = encode_vector_v2(answer["dtype"], answer["shape"], answer["values"], reply.fixed_point, reply.decimals)
    else:
        raise LayoutError("the int256[] answer is written by public.chain.encode_output")
    return {
        "raw_input": reply.raw_input,
        "processed_input": "",
        "raw_output": raw.hex(),
        "processed_output": "",
        "proof": "",
    }


def encode_vector_v1(name: str, shape: Any, values: Any, values_dtype: str | None = None) -> bytes:
    """Values of dtype ``values_dtype`` (default ``name``) -> 1.x ``encode_vector`` bytes in dtype ``name``, as 1.x
    wrote an answer in the request's dtype: numbers are cast to it. A floating dtype rounds (bfloat16 is code 5
    with IEEE half bits, as 1.x wrote it and as our decoder reads it back); an integer or bool dtype takes only
    values it holds exactly (1.x's encoder failed on the others); real values fill a complex dtype with imaginary
    0. Raises LayoutError naming the value for a cast that cannot be made (complex into a real dtype, a float into
    an integer dtype, a value beyond the dtype's range, NaN or infinity)."""
    if name not in V1_NAMES:
        raise LayoutError(f"output: dtype {name!r} has no 1.x dtype code")
    own = values_dtype or name
    dims = _answer_shape(shape)
    flat = _finite(own, _flat(own, values, dims))
    if own in _COMPLEX and name not in _COMPLEX:
        raise LayoutError(f"output: complex values ({own}) cannot be written as {name}, the request's dtype")
    if name in _COMPLEX and own not in _COMPLEX:
        flat = np.stack([np.asarray(flat, dtype=np.float64), np.zeros(len(flat))], axis=-1)
    if name in _FLOATING:
        view = {"float": (np.float32, np.uint32), "double": (np.float64, np.uint64)}.get(name, (np.float16, np.uint16))
        words = _within_range(name, flat, view[0]).view(view[1]).tolist()
    else:
        if name in _COMPLEX:
            # cfloat's parts are float32: a wider value would become infinite, which the next input refuses.
            _within_range(name, flat, np.float32 if name == "cfloat" else np.float64)
        else:
            _check_exact(name, flat)
        words = _exact_words(name, flat)
    return _encode(["uint8", "uint16[]", f"{_V1_SOLIDITY[name]}[]"], [V1_NAMES.index(name), dims, words])


def _within_range(name: str, flat: Any, part: type) -> np.ndarray:
    """``flat`` (finite numbers) cast to ``part``, the float type of the request's dtype ``name``; LayoutError for a
    value beyond its range (the cast would make it infinite)."""
    with np.errstate(over="ignore"):
        cast = np.asarray(flat, dtype=np.float64).astype(part)
    if not np.isfinite(cast).all():
        raise LayoutError(f"output: a value beyond {name}'s range (the request's dtype, which 1.x answered in)")
    return cast


def _check_exact(name: str, flat: Any) -> None:
    """Refuse values an integer or bool dtype does not hold exactly (LayoutError naming the first)."""
    if name != "bool":
        array = np.asarray(flat)
        _check_integers(name, array.astype(np.int64) if array.dtype.kind == "b" else array)  # a bool is 0 or 1
        return
    for i, value in enumerate(np.asarray(flat).tolist()):
        if value not in (0, 1):  # True and False are 1 and 0
            raise LayoutError(f"output: values[{i}]: {value!r} does not fit bool, the request's dtype")


def _exact_words(name: str, flat: Any) -> list[Any]:
    """ABI words of a complex, bool or integer answer, the same in both encodings (floats differ: their bit views)."""
    if name in _COMPLEX:
        return _complex_words(flat, name)
    if name == "bool":
        return [bool(v) for v in np.asarray(flat).tolist()]
    return [int(v) for v in np.asarray(flat).tolist()]


def decode_vector_v1(blob: bytes, max_elements: int | None = None) -> dict[str, Any]:
    """1.x ``encode_vector`` bytes -> a tensor in our form. Raises LayoutError."""
    code = _vector_head(blob, 1, "1.x vector", max_elements)
    if code >= len(V1_NAMES):
        raise LayoutError(f"1.x vector: dtype code {code} is unknown (0..11: {', '.join(V1_NAMES)})")
    name = V1_NAMES[code]
    _, shape, words = _abi_decode(("uint8", "uint16[]", f"{_V1_SOLIDITY[name]}[]"), blob, "1.x vector")
    if name in ("float", "double", "half", "bfloat16"):
        view = {"float": (np.uint32, np.float32), "double": (np.uint64, np.float64)}.get(name, (np.uint16, np.float16))
        values = np.asarray(words, dtype=view[0]).view(view[1]).astype(np.float64).tolist()
    elif name in _COMPLEX:
        values = _complex_values(words, name)
    else:
        values = list(words)
    return _ours(name, shape, values, "1.x vector", name)


def encode_vector_v2(name: str, shape: Any, values: Any, fixed_point: bool = False, decimals: int = 18) -> bytes:
    """A tensor in our form -> 2.0 ``RitualVector.to_web3`` bytes. Raises LayoutError.

    IEEE: the dtype's code and bits, the decimals byte as given (2.0 wrote 18 by default). Fixed point: as 2.0,
    every vector becomes float128 (int128 words) of value * 10**decimals; a floating value is taken as its
    shortest decimal in its own dtype (:func:`shortest_decimal`: a float 0.1 is 0.1, not its float64 widening)
    and rounded half-even (2.0 multiplied in binary floating point and truncated, which can differ in the last
    units). Complex values have no fixed-point form.
    """
    if not 0 <= decimals <= 255:
        raise LayoutError(f"output_num_decimals: {decimals} is not a uint8")
    if name not in V2_CODE_OF:
        raise LayoutError(f"output: dtype {name!r} has no 2.0 dtype code")
    dims = _answer_shape(shape)
    flat = _flat(name, values, dims)
    _finite(name, flat)
    if fixed_point:
        if name in _COMPLEX:
            raise LayoutError("output: complex values have no fixed-point encoding")
        array = np.asarray(flat)
        items = array if array.dtype.kind == "f" else array.tolist()  # numpy floats keep their own dtype
        words = [_fixed(v, decimals, _INT128, name) for v in items]
        return _encode(
            ["uint8", "uint8", "uint8", "uint16[]", "int128[]"], [1, decimals, _FIXED_POINT_CODE, dims, words]
        )
    code = answer_code_v2(name, flat)
    if code in _FLOAT_V2:
        words = np.asarray(flat, dtype=_FLOAT_V2[code]).view(_INT_VIEW_V2[code]).tolist()
    else:
        words = _exact_words(name, flat)
    return _encode(["uint8", "uint8", "uint8", "uint16[]", f"{V2_CODES[code][2]}[]"], [0, decimals, code, dims, words])


def decode_vector_v2(blob: bytes, max_elements: int | None = None) -> dict[str, Any]:
    """2.0 ``RitualVector.to_web3`` bytes -> a tensor in our form. Raises LayoutError."""
    code = _vector_head(blob, 3, "2.0 vector", max_elements)
    if code not in V2_CODES:
        raise LayoutError(f"2.0 vector: dtype code {code} is unknown (0..15: {_v2_code_list()})")
    _, name, solidity = V2_CODES[code]
    arithmetic, decimals, _, shape, words = _abi_decode(
        ("uint8", "uint8", "uint8", "uint16[]", f"{solidity}[]"), blob, "2.0 vector"
    )
    if arithmetic not in (0, 1):
        raise LayoutError(f"2.0 vector: arithmetic {arithmetic} is unknown (0 = IEEE, 1 = fixed point)")
    if arithmetic == 1 and code in _FLOAT_V2:
        values: list[Any] = [w / 10**decimals for w in words]
    elif arithmetic == 1 and name in _COMPLEX:
        half = 32 if name == "cfloat" else 64
        values = [
            [_signed(w >> half, half) / 10**decimals, _signed(w & (2**half - 1), half) / 10**decimals] for w in words
        ]
    elif code in _FLOAT_V2:
        if code in (3, 4) and any(not -(2**63) <= w <= _LONG_MAX for w in words):
            raise LayoutError(f"2.0 vector: a {V2_CODES[code][0]} word beyond 64 bits (2.0 stores float64 bits)")
        values = np.asarray(words, dtype=_INT_VIEW_V2[code]).view(_FLOAT_V2[code]).astype(np.float64).tolist()
    elif name in _COMPLEX:
        values = _complex_values(words, name)
    else:
        if code == 12 and words and max(words) > _LONG_MAX:
            raise LayoutError(f"2.0 vector: uint64 value {max(words)} does not fit long, the widest integer dtype")
        values = list(words)
    return _ours(name, shape, values, "2.0 vector", V2_CODES[code][0])


def _vector_head(blob: bytes, dtype_word: int, what: str, max_elements: int | None) -> int:
    """Check the vector's head and array lengths before decoding, so no count is trusted; return the dtype code."""
    head_words = dtype_word + 2  # the uint8 words, then the offsets of shape and values
    if len(blob) < (head_words + 2) * _WORD:
        raise LayoutError(f"{what}: {len(blob)} bytes, too short for its head")
    words = [int.from_bytes(blob[i * _WORD : (i + 1) * _WORD], "big") for i in range(head_words)]
    code = words[dtype_word - 1]
    if code > 255:
        raise LayoutError(f"{what}: dtype word {code} is not a uint8")
    shape_at = words[dtype_word]
    if shape_at != head_words * _WORD:
        raise LayoutError(f"{what}: shape offset {shape_at}, expected {head_words * _WORD}")
    rank = int.from_bytes(blob[shape_at : shape_at + _WORD], "big")
    if rank > MAX_RANK:
        raise LayoutError(f"{what}: shape: {too_many_dimensions(rank)}")
    values_at = shape_at + _WORD * (1 + rank)
    if words[dtype_word + 1] != values_at:
        raise LayoutError(f"{what}: values offset {words[dtype_word + 1]}, expected {values_at}")
    if len(blob) < values_at + _WORD:
        raise LayoutError(f"{what}: {len(blob)} bytes, truncated before the values' length")
    count = int.from_bytes(blob[values_at : values_at + _WORD], "big")
    limit = _limit(max_elements)
    if count > limit:
        raise LayoutError(f"{what}: {count} values exceed the limit of {limit}")
    expected = values_at + _WORD * (1 + count)
    if len(blob) < expected:  # more is what infernet-ml's decoder ignored (see _abi_decode)
        raise LayoutError(f"{what}: {len(blob)} bytes for {count} values, expected {expected} (truncated)")
    return code


def _ours(name: str, shape: tuple[int, ...], values: list[Any], what: str, sent_dtype: str) -> dict[str, Any]:
    if math.prod(shape) != len(values):
        raise LayoutError(f"{what}: shape {list(shape)} holds {math.prod(shape)} elements, values has {len(values)}")
    if name in ("float", "double", "half", "bfloat16", *_COMPLEX):
        flat = (x for v in values for x in (v if isinstance(v, list) else (v,)))
        if not all(math.isfinite(x) for x in flat):
            raise LayoutError(f"{what}: a value is NaN or infinite; inputs must be finite numbers")
    if name not in _COMPLEX:  # complex inputs are never cast, and their pairs would not match the tensor's order
        values = SentValues(values, "vector.values", sent_dtype)
    return {"dtype": name, "shape": list(shape), "values": values}


def decode_int256(blob: bytes, max_elements: int | None = None) -> dict[str, Any]:
    """Today's CHAIN layout, ABI ``int256[]`` in 18-decimal fixed point -> a ``double`` tensor of shape [1, N] whose
    values name the int256 as sent (``data[i]``) in an error. The one reader of the layout (``public.chain`` too).
    Trailing bytes are ignored, as in every layout (see ``_abi_decode``). Raises LayoutError."""
    if len(blob) >= 2 * _WORD:
        count = int.from_bytes(blob[_WORD : 2 * _WORD], "big")
        if count > _limit(max_elements):
            raise LayoutError(f"data: {count} int256 values exceed the limit of {_limit(max_elements)}")
    (numbers,) = _abi_decode(("int256[]",), blob, "data", "an ABI-encoded int256[]")
    if not numbers:
        raise LayoutError("data: the int256[] is empty")
    return {
        "dtype": "double",
        "shape": [1, len(numbers)],
        "values": SentValues([n / SCALE for n in numbers], "data", "int256", list(numbers)),
    }


def _abi_decode(types: tuple[str, ...], blob: bytes, what: str, kind: str = "") -> tuple[Any, ...]:
    """eth_abi's decode of CHAIN bytes, which must start with the canonical encoding of the values (what Solidity's
    ``abi.encode`` writes: offsets, lengths, zero padding); bytes after it are ignored, in every layout and in the
    vectors inside them, because infernet-ml's services (eth_abi's ``decode``, which reads only what the types
    need) ignored them: a contract that appends bytes works here as it did there. Raises LayoutError."""
    kind = kind or f"an ABI encoding of ({', '.join(types)})"
    try:
        values = decode(list(types), blob)
    except (DecodingError, ValueError, OverflowError) as e:  # UnicodeDecodeError is a ValueError
        raise LayoutError(f"{what}: not {kind} ({short_message(e)})") from None
    canonical = encode(list(types), list(values))
    if blob[: len(canonical)] != canonical:
        raise LayoutError(
            f"{what}: not the canonical ABI encoding of ({', '.join(types)}) (offsets, lengths or padding differ "
            "from what abi.encode writes)"
        )
    return values


def _output_options(data: dict[str, Any]) -> tuple[bool, int]:
    arithmetic = data.get("output_arithmetic")
    if arithmetic in (None, "ieee", 0):
        fixed = False
    elif arithmetic in ("fixed_point", 1) and not isinstance(arithmetic, bool):
        fixed = True
    else:
        raise LayoutError(f"output_arithmetic: {json_text(arithmetic)} is unknown (ieee or fixed_point)")
    decimals = data.get("output_num_decimals")
    if decimals is None or decimals == 0:
        return fixed, 18  # 2.0 wrote `decimals or 18`
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 < decimals <= 38:
        raise LayoutError(f"output_num_decimals: {json_text(decimals)} is not an integer from 1 to 38 (int128 words)")
    return fixed, decimals


def _encode(types: list[str], values: list[Any]) -> bytes:
    try:
        return encode(types, values)
    except (EncodingError, ValueError, OverflowError, TypeError) as e:
        raise LayoutError(f"output: cannot be encoded as ({', '.join(types)}) ({short_message(e)})") from None


def _answer_shape(shape: Any) -> list[int]:
    dims = list(shape)
    if len(dims) > MAX_RANK or any(not isinstance(d, int) or not 0 <= d <= _UINT16_MAX for d in dims):
        raise LayoutError(f"output: shape {dims} does not fit uint16[] (each dimension 0..65535)")
    return dims


def _flat(name: str, values: Any, dims: list[int]) -> np.ndarray:
    array = np.asarray(values)
    flat = array.reshape(-1, 2) if name in _COMPLEX else array.reshape(-1)
    if len(flat) != math.prod(dims):
        raise LayoutError(f"output: shape {dims} holds {math.prod(dims)} elements, values has {len(flat)}")
    return flat


def _finite(name: str, flat: np.ndarray) -> np.ndarray:
    """``flat`` when every value is finite. A NaN or infinity has IEEE bits, but a CHAIN answer must be the next
    container's input, and inputs refuse them (``decode_vector_v1``/``_v2``), as the int256[] and fixed-point
    answers do: LayoutError (422)."""
    if name in _FLOATING or name in _COMPLEX:
        with np.errstate(invalid="ignore"):
            numbers = np.asarray(flat, dtype=np.float64)  # null (None) from the answer reads as NaN
        if not np.isfinite(numbers).all():
            raise LayoutError(_NOT_FINITE)
    return flat


# The one refusal of a non-finite value in every 1.x and 2.0 CHAIN answer, IEEE or fixed point (docs/contract.md).
_NOT_FINITE = (
    "output: a value is NaN or infinite; a CHAIN vector holds finite numbers only (the next container could not "
    "read it)"
)


def _complex_words(pairs: np.ndarray, name: str) -> list[int]:
    part, bits, half = (np.float32, np.uint32, 32) if name == "cfloat" else (np.float64, np.uint64, 64)
    array = np.asarray(pairs, dtype=part).reshape(-1, 2)
    real = array[:, 0].view(bits).tolist()
    imag = array[:, 1].view(bits).tolist()
    return [(r << half) | i for r, i in zip(real, imag, strict=True)]


def _complex_values(words: tuple[int, ...], name: str) -> list[list[float]]:
    part, bits, half = (np.float32, np.uint32, 32) if name == "cfloat" else (np.float64, np.uint64, 64)
    mask = 2**half - 1
    real = np.asarray([w >> half for w in words], dtype=bits).view(part).astype(np.float64).tolist()
    imag = np.asarray([w & mask for w in words], dtype=bits).view(part).astype(np.float64).tolist()
    return [[r, i] for r, i in zip(real, imag, strict=True)]


def _fixed(value: Any, decimals: int, bounds: tuple[int, int], name: str = "") -> int:
    if value is None:  # a workflow's JSON null (NaN in the answer) under an integer dtype name: not finite either
        raise LayoutError(_NOT_FINITE)
    if isinstance(value, (bool, int)):
        fixed = int(value) * 10**decimals
        shown = str(int(value))
    else:
        decimal = shortest_decimal(value, name)
        # Python's float text of that decimal, as the OFFCHAIN answer writes a float: not numpy's float64 widening
        shown = repr(float(decimal))
        try:
            fixed = int(decimal.scaleb(decimals).to_integral_value())
        except (InvalidOperation, OverflowError, ValueError):  # NaN or infinity under an integer dtype name
            raise LayoutError(_NOT_FINITE) from None
    if not bounds[0] <= fixed <= bounds[1]:
        raise LayoutError(f"output: {shown} times 10**{decimals} does not fit int128")
    return fixed


def shortest_decimal(value: Any, name: str = "") -> Decimal:
    """The shortest decimal that reads back as ``value`` in its own floating dtype, the digits a JSON answer prints
    for float and double: a float32 0.1 is 0.1, where its float64 widening would be 0.10000000149011612. numpy
    floats carry their dtype (half, float, double); ``name`` ``bfloat16`` marks bfloat16 values held in float32
    (numpy has no bfloat16); Python floats are float64. Pure; raises nothing (NaN and infinities come back as the
    Decimal of the same name)."""
    if name == "bfloat16":
        return _shortest_bfloat16(float(value))
    if isinstance(value, np.floating):
        return Decimal(str(value))  # numpy's str is the shortest round trip in the value's own dtype
    return Decimal(repr(float(value)))


def _shortest_bfloat16(value: float) -> Decimal:
    if not math.isfinite(value):
        return Decimal(repr(value))
    target = _bfloat16_bits(value)
    for digits in range(1, 10):  # 9 significant digits read back every float32, so every bfloat16
        text = f"{value:.{digits - 1}e}"
        if _bfloat16_bits(float(text)) == target:
            return Decimal(text)
    return Decimal(repr(value))


def _bfloat16_bits(value: float) -> int:
    """The bfloat16 that ``value`` rounds to (round half to even on float32's top 16 bits), as its bits."""
    with np.errstate(over="ignore"):
        bits = int(np.float32(value).view(np.uint32))
    return (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16


def describe_answer(answer: Any) -> str:
    """What an answer holds, in words, for the 422 that says a layout cannot hold it: ``2 tensors (a list)``,
    ``2 tensors (an object with keys a, b)``, ``an object with keys label``, ``a string``."""
    if _is_tensor(answer):
        return f"one {answer['dtype']} tensor"
    count = _count_tensors(answer)
    tensors = f"{count} tensor{'' if count == 1 else 's'}"
    if isinstance(answer, (list, tuple)):
        if count:
            items = "" if count == len(answer) else f" of {len(answer)} items"
            return f"{tensors} (a list{items})"
        return "a list that is not a rectangular array of numbers"
    if isinstance(answer, dict):
        keys = ", ".join(map(str, list(answer)[:8])) + (", ..." if len(answer) > 8 else "")
        if count:
            return f"{tensors} (an object with keys {keys})"
        return f"an object with keys {keys}" if answer else "an empty object"
    if answer is None:
        return "null"
    if isinstance(answer, bool):
        return "a boolean"
    if isinstance(answer, str):
        return "a string"
    return f"a {type(answer).__name__}"


def _count_tensors(answer: Any) -> int:
    if _is_tensor(answer):
        return 1
    if isinstance(answer, dict):
        return sum(_count_tensors(v) for v in answer.values())
    if isinstance(answer, (list, tuple)):
        return sum(_count_tensors(v) for v in answer)
    return 0


def _signed(word: int, bits: int) -> int:
    return word - (1 << bits) if word >> (bits - 1) else word


def _check_shape(shape: Any, where: str, limit: int) -> None:
    if not isinstance(shape, list):
        raise LayoutError(f"{where}: expected a list of at most {MAX_RANK} dimensions")
    if len(shape) > MAX_RANK:
        raise LayoutError(f"{where}: {too_many_dimensions(len(shape))}")
    for i, dim in enumerate(shape):
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 <= dim <= limit:
            raise LayoutError(f"{where}[{i}]: {json_text(dim)} is not a dimension (an integer from 0 to {limit})")


def _is_code(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_list(answer: Any) -> bool:
    return isinstance(answer, (list, tuple))


def _is_tensor(answer: Any) -> bool:
    return isinstance(answer, dict) and {"dtype", "shape", "values"} <= answer.keys()


def _limit(max_elements: int | None) -> int:
    return MAX_ELEMENTS if max_elements is None else min(max_elements, MAX_ELEMENTS)


def _v2_code_list() -> str:
    return ", ".join(f"{code} {names[0]}" for code, names in V2_CODES.items())
