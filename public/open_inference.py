"""The Open Inference Protocol (KServe's v2 protocol, Triton's HTTP API) beside /service_output, on the same model.

Runs in each API worker's event loop: ``PublicApp.serve`` hands every path under ``/v2`` to ``serve``. An infer
request's one input tensor becomes the contract's OFFCHAIN data (``{"dtype", "shape", "values"}``) and takes the same
way as ``/service_output``'s data: call batching, the runner's batches, the same limits. The answer's tensors come back
as the protocol's outputs, flat in row-major order. Errors are the protocol's ``{"error": "..."}`` bodies.

Triton's binary tensor data extension works both ways, since tritonclient uses it by default: input bytes after a
JSON header of ``Inference-Header-Content-Length`` bytes, and output bytes when asked for with ``binary_data_output``
or an output's ``binary_data``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from core.asgi import Receive, Scope, Send, shown
from core.errors import RequestError
from core.model_call import AskedFor, Unasked
from core.terms import DTYPE_NAMES, MAX_RANK, json_text, json_type, too_many_dimensions
from public import SERVICE_NAME, __version__, resources
from public import app as public  # built on the public app; public/app.py imports this module only where it routes /v2

log = logging.getLogger("public.open_inference")

# The protocol's tensor datatypes -> the contract's dtype names. The protocol's UINT16/32/64 and BYTES have no
# counterpart among the contract's dtypes; the contract's complex dtypes have none among the protocol's.
DATATYPES: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT16": "short",
    "INT32": "int",
    "INT64": "long",
    "FP16": "half",
    "BF16": "bfloat16",
    "FP32": "float",
    "FP64": "double",
}
CONTRACT_DATATYPES: dict[str, str] = {dtype: datatype for datatype, dtype in DATATYPES.items()}
assert set(DATATYPES.values()) <= set(DTYPE_NAMES)
# Binary tensor data is little-endian, row-major, without padding. BF16 travels as the top 16 bits of a float32.
_WIRE: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# Answers whose values keep their own unsigned dtype (workflows/tensors.py encode: named int or long) are answered in
# the protocol's datatype of that dtype, which it has and the contract's vocabulary lacks.
_OWN_DATATYPES: dict[np.dtype, str] = {
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
}
_OUTPUT_WIRE: dict[str, np.dtype] = {
    **_WIRE,
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
}
# The service has one model and no versions of it; "1" is what Triton calls the only version of a model.
MODEL_VERSION = "1"
INPUT_NAME = "input_0"
PLATFORMS = {
    "torchscript": "pytorch_torchscript",
    "torch.export": "pytorch_torch_export",
    "pickle": "pytorch",
    "onnx": "onnxruntime_onnx",  # Triton's name for the platform
}
EXTENSIONS = ["binary_tensor_data"]
_HEADER_LENGTH = b"inference-header-content-length"
_JSON = (b"content-type", b"application/json")
_OCTETS = (b"content-type", b"application/octet-stream")


class ProtocolError(RequestError):
    """A v2 request refused; ``allow`` lists the methods of the route when the method was wrong."""

    def __init__(self, status: int, description: str, allow: str | None = None) -> None:
        super().__init__(status, description)
        self.allow = allow


@dataclass
class InferRequest:
    """One infer request, read: the contract's data for the runner and how the client wants the answer."""

    data: dict[str, Any]
    id: str | None = None
    outputs: list[str] | None = None  # names asked for, in order; None: every output
    binary_outputs: set[str] = field(default_factory=set)  # names whose data travels as bytes
    binary_by_default: bool = False  # binary_data_output: every output not named otherwise


async def serve(app: public.PublicApp, scope: Scope, receive: Receive, send: Send) -> int:
    """Answer one request under /v2 in the API worker's event loop; returns the status sent. Never raises for a bad
    request: every refusal is answered as ``{"error": ...}`` with its status."""
    path, method = scope["path"], scope["method"]
    headers: list[tuple[bytes, bytes]] = []
    binary = None
    try:
        status, body, binary = await _route(app, path, method, scope, receive)
    except RequestError as e:
        status, body = e.status, {"error": e.description}
        if getattr(e, "allow", None):
            headers.append((b"allow", e.allow.encode()))
    except Exception as e:
        log.exception("request to %s failed", shown(path))
        status, body = 500, {"error": f"internal error: {type(e).__name__}"}
    # Allow (405), Accept-Encoding (415), and Connection: close when answering before the body was read.
    named = {name for name, _ in headers}
    headers += [h for h in public.extra_headers(scope, status) if h[0] not in named]
    return await _respond(send, status, body, binary, headers)


async def _route(
    app: public.PublicApp, path: str, method: str, scope: Scope, receive: Receive
) -> tuple[int, Any, bytes | None]:
    parts = path.rstrip("/").split("/")[2:]  # "", "v2", ...
    if not parts:
        _only(method, "GET")
        return 200, {"name": SERVICE_NAME, "version": __version__, "extensions": EXTENSIONS}, None
    if parts == ["health", "live"]:
        _only(method, "GET")
        stuck = await app.stuck_model()  # the same answer as /livez
        return (200, {"live": True}, None) if stuck is None else (503, {"live": False, "error": stuck}, None)
    if parts == ["health", "ready"]:
        _only(method, "GET")
        return await _readiness(app, {})
    if parts[0] != "models" or len(parts) < 2:
        models = f"/v2/models/{app.settings.model_name}"
        raise ProtocolError(404, f"no route {shown(path)}; the model's routes are under {models}")
    split = _model_route(parts[1:])
    if split is None:
        raise ProtocolError(404, f"no route {shown(path)}")
    name, version, action = split
    _only(method, "POST" if action == "infer" else "GET")
    await _check_model(app, name, version)
    if action == "ready":
        return await _readiness(app, {"name": name})
    if action == "infer":
        body, binary = await _limited_infer(app, scope, receive, name)
        return 200, body, binary
    return 200, await model_metadata(app, name), None


def _model_route(segments: list[str]) -> tuple[str, str | None, str] | None:
    """The path after ``/v2/models/`` -> (model name, version or None, "" | "ready" | "infer"), or None for no
    route. Read from the right, since a name the service advertises may hold slashes (``huggingface/Org/repo``:
    clients quote a name with ``quote``, which leaves ``/`` as it is)."""
    action = segments[-1] if len(segments) >= 2 and segments[-1] in ("ready", "infer") else ""
    if action:
        segments = segments[:-1]
    version = None
    if len(segments) >= 3 and segments[-2] == "versions":
        version, segments = segments[-1], segments[:-2]
    elif len(segments) >= 2 and segments[-1] == "versions":
        return None
    name = "/".join(segments)
    return (name, version, action) if name else None


def route_template(path: str) -> str | None:
    """The protocol's name for the route of ``path`` (``/v2/models/{model_name}/infer``...), or None for a path
    that is no route of it. For the metrics' labels; any model name and version, since a wrong one is still the
    route asked for."""
    parts = path.rstrip("/").split("/")[2:]
    if not parts or parts in (["health", "live"], ["health", "ready"]):
        return "/".join(["", "v2", *parts])
    if parts[0] != "models" or len(parts) < 2:
        return None
    split = _model_route(parts[1:])
    if split is None:
        return None
    _, version, action = split
    template = ["", "v2", "models", "{model_name}", *(["versions", "{model_version}"] if version is not None else [])]
    return "/".join(template + ([action] if action else []))


def _only(method: str, allowed: str) -> None:
    methods = "GET, HEAD" if allowed == "GET" else allowed
    if method not in methods.split(", "):
        raise ProtocolError(405, f"use {allowed} for this route", allow=methods)


async def _check_model(app: public.PublicApp, name: str, version: str | None) -> None:
    """404 unless ``name`` is one the service advertises for its model: MODEL_NAME, or any id /service-resources
    calls supported (public/resources.py ``supports``: its Ritual id, repository, file name, sha256), as the
    Infernet layouts accept; and unless ``version`` is None or the one version."""
    served = app.settings.model_name
    if name != served and not resources.supports(name, {"model": await app.served_model()}):
        raise ProtocolError(404, f"unknown model {shown(name)!r}; this service serves {served!r} (MODEL_NAME)")
    if version is not None and version != MODEL_VERSION:
        raise ProtocolError(
            404, f"model {served!r} has no version {shown(version)!r}; its only version is {MODEL_VERSION!r}"
        )


async def _readiness(app: public.PublicApp, body: dict[str, Any]) -> tuple[int, Any, None]:
    if await app.runner_ready(fresh=True):
        return 200, {**body, "ready": True}, None
    return 503, {**body, "ready": False, "error": "the model is still loading; retry shortly"}, None


async def model_metadata(app: public.PublicApp, name: str = "") -> dict[str, Any]:
    """The model's metadata from the runner's description (GET /info), under ``name`` (the name it was asked by;
    MODEL_NAME by default); 503 while the model loads. An ONNX model
    declares its inputs and outputs (names, datatypes, shapes with -1 for a symbolic or unknown dimension); for a
    torch model only the input's datatype is known (its parameters'), and none without floating parameters."""
    info = await app.info()
    model = info.get("model") or {}
    if model.get("format") == "onnx":
        inputs, outputs = _declared(model.get("inputs")), _declared(model.get("outputs"))
    else:
        datatype = CONTRACT_DATATYPES.get(model.get("dtype") or "")
        # The model's input rank is not known here: [-1] says that every dimension is the client's to choose. Inputs
        # are cast to the datatype of the model's parameters; outputs are known only from an answer.
        inputs = [{"name": INPUT_NAME, "datatype": datatype, "shape": [-1]}] if datatype else []
        outputs = []
    return {
        "name": name or app.settings.model_name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORMS.get(model.get("format"), "python"),
        "inputs": inputs,
        "outputs": outputs,
    }


def _declared(ports: Any) -> list[dict[str, Any]]:
    """The ONNX workflow's described inputs or outputs in the protocol's terms; a dtype with no datatype (an ONNX
    type the contract has no name for, e.g. strings) is BYTES."""
    return [
        {
            "name": port["name"],
            "datatype": CONTRACT_DATATYPES.get(port.get("dtype") or "", "BYTES"),
            "shape": [d if isinstance(d, int) and d >= 0 else -1 for d in port.get("shape") or [-1]],
        }
        for port in ports or []
    ]


async def _limited_infer(
    app: public.PublicApp, scope: Scope, receive: Receive, name: str
) -> tuple[dict[str, Any], bytes | None]:
    # The same per-worker budget and deadlines as /service_output, counted together with its requests.
    return await app.limited(scope, receive, functools.partial(_infer, app, name=name))


async def _infer(
    app: public.PublicApp, scope: Scope, receive: Receive, name: str
) -> tuple[dict[str, Any], bytes | None]:
    """One infer request for the model asked for as ``name`` (an answer's ``model_name`` is that name, as Triton's)."""
    headers = dict(scope["headers"])
    raw = await public.read_request_body(scope, receive, app.settings.max_request_bytes)
    header, binary = split_body(raw, headers.get(_HEADER_LENGTH))
    obj = public.load_json(header)  # the same words as /service_output for a body that is not JSON
    request = read_request(obj, binary, app.settings.max_elements)
    # The runner encodes (and checks) only the outputs asked for: one nobody asked for fails nothing (explore K11).
    item = request.data if request.outputs is None else AskedFor(tuple(request.outputs), request.data)
    outcome = await app.infer(item)
    if outcome.status != 200:
        raise ProtocolError(outcome.status, in_protocol_terms(outcome.description))
    lone = await _lone_output_name(app) if _is_lone(outcome.body) else LONE_OUTPUT
    return answer(outcome.body, request, name, lone)


async def _lone_output_name(app: public.PublicApp) -> str:
    """The name of an answer that is one bare tensor: the output the model declares when it declares just one (an
    ONNX model's, as the metadata lists it), else "output_0". Asked of the runner once: the default model, the only
    one /v2 serves, does not change while the service runs."""
    name = _LONE_NAMES.get(app)
    if name is None:
        model = (await app.info()).get("model") or {}
        outputs = model.get("outputs") if model.get("format") == "onnx" else None
        single = isinstance(outputs, list) and len(outputs) == 1 and isinstance(outputs[0], dict)
        name = _LONE_NAMES[app] = str(outputs[0]["name"]) if single else LONE_OUTPUT  # type: ignore[index]
    return name


LONE_OUTPUT = "output_0"
_LONE_NAMES: weakref.WeakKeyDictionary[public.PublicApp, str] = weakref.WeakKeyDictionary()


def split_body(raw: bytes, header_length: bytes | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of a request body; without the header length, the body is all JSON."""
    if header_length is None:
        return raw, b""
    text = header_length.decode("latin-1").strip()
    if not text.isdigit() or int(text) > len(raw):
        raise ProtocolError(
            400, f"Inference-Header-Content-Length: expected a byte count up to the body's {len(raw)}, got {text!r}"
        )
    return raw[: int(text)], raw[int(text) :]


def read_request(obj: Any, binary: bytes, max_elements: int) -> InferRequest:
    """An infer request's JSON (and its binary tensor data) -> the contract's data. Raises ProtocolError (400)."""
    if not isinstance(obj, dict):
        raise ProtocolError(400, f"body must be a JSON object, got {json_type(obj)}")
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise ProtocolError(400, "inputs: expected a list of one input tensor")
    if len(inputs) != 1:
        raise ProtocolError(400, f"inputs: this model takes one input tensor, got {len(inputs)}")
    request_id = obj.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise ProtocolError(400, "id: expected a string")
    parameters = _parameters(obj, "parameters")
    request = InferRequest(
        data=_contract_data(inputs[0], binary, max_elements),
        id=request_id,
        binary_by_default=_flag(parameters, "binary_data_output", "parameters"),
    )
    outputs = obj.get("outputs")
    if outputs is not None and outputs != []:  # none asked for: every output, as when "outputs" is absent
        if not isinstance(outputs, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
        ):
            raise ProtocolError(400, "outputs: expected a list of objects with a 'name'")
        request.outputs = []
        for index, output in enumerate(outputs):
            where = f"outputs[{index}].parameters"
            output_parameters = _parameters(output, "parameters", where)
            if "classification" in output_parameters:
                raise ProtocolError(400, f"{where}.classification: the classification extension is not supported")
            binary_data = output_parameters.get("binary_data", request.binary_by_default)
            if not isinstance(binary_data, bool):
                raise ProtocolError(400, f"{where}.binary_data: expected true or false")
            if output["name"] in request.outputs:  # Triton refuses it too: which of the two would say binary_data?
                raise ProtocolError(400, f"outputs[{index}]: output {json_text(output['name'])} is asked for twice")
            request.outputs.append(output["name"])
            if binary_data:
                request.binary_outputs.add(output["name"])
    return request


def _contract_data(tensor: Any, binary: bytes, max_elements: int) -> dict[str, Any]:
    if not isinstance(tensor, dict):
        raise ProtocolError(400, "inputs[0]: expected an object with 'name', 'shape', 'datatype' and 'data'")
    if not isinstance(tensor.get("name"), str):
        raise ProtocolError(400, "inputs[0].name: expected a string")
    shape = tensor.get("shape")
    if isinstance(shape, list) and len(shape) > MAX_RANK:
        raise ProtocolError(400, f"inputs[0].shape: {too_many_dimensions(len(shape))}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ProtocolError(400, "inputs[0].shape: expected a list of non-negative integers")
    datatype = tensor.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise ProtocolError(
            400, f"inputs[0].datatype: {json_text(datatype)} is not supported; expected one of {', '.join(DATATYPES)}"
        )
    count = math.prod(shape)
    if count > max_elements:
        raise ProtocolError(
            400,
            f"inputs[0].shape: {count} elements exceed the limit of {max_elements} per request (MAX_REQUEST_ELEMENTS)",
        )
    parameters = _parameters(tensor, "parameters", "inputs[0].parameters")
    if "shared_memory_region" in parameters:
        raise ProtocolError(400, "inputs[0].parameters.shared_memory_region: shared memory is not supported")
    size = parameters.get("binary_data_size")
    data = tensor.get("data")  # null is no data, as an absent key
    if size is not None:
        if data is not None:
            raise ProtocolError(400, "inputs[0]: give either 'data' or parameters.binary_data_size, not both")
        values = _from_bytes(binary, size, datatype, shape)
    else:
        if binary:
            raise ProtocolError(400, f"{len(binary)} bytes of binary data follow the JSON but no input claims them")
        if data is None:
            raise ProtocolError(400, "inputs[0].data: missing")
        if not isinstance(data, list):  # Triton refuses a bare number too, even for a tensor of one element
            raise ProtocolError(
                400, f"inputs[0].data: expected an array of the tensor's elements (row-major), got {json_type(data)}"
            )
        values = data
        if values and isinstance(values[0], list):
            # The protocol's data is the tensor's elements in row-major order, flat or nested; `shape` alone says
            # the tensor's shape (Triton reads nested data the same way).
            values = _row_major(values)
    return {"dtype": DATATYPES[datatype], "shape": shape, "values": values}


def _from_bytes(binary: bytes, size: Any, datatype: str, shape: list[int]) -> list[Any]:
    where = "inputs[0].parameters.binary_data_size"
    if type(size) is not int or size < 0:
        raise ProtocolError(400, f"{where}: expected a non-negative integer")
    if size and not binary:
        raise ProtocolError(
            400,
            f"{where}: {size} bytes claimed, but no binary data follows the JSON: send the tensor's bytes after the "
            "JSON, and the JSON's length in the Inference-Header-Content-Length header",
        )
    if size != len(binary):
        raise ProtocolError(400, f"{where}: {size} bytes claimed, {len(binary)} bytes follow the JSON header")
    wire = _WIRE[datatype]
    expected = math.prod(shape) * wire.itemsize
    if size != expected:
        raise ProtocolError(400, f"{where}: shape {shape} of {datatype} takes {expected} bytes, got {size}")
    array = np.frombuffer(binary, dtype=wire)
    if datatype == "BOOL":
        # The extension's BOOL element is one byte, 1 for true and 0 for false; any other byte is no BOOL, as 2 is
        # none in JSON data (numpy would read every nonzero byte as true).
        octets = np.frombuffer(binary, dtype=np.uint8)
        wrong = np.flatnonzero(octets > 1)
        if wrong.size:
            at = int(wrong[0])
            raise ProtocolError(400, f"inputs[0].data[{at}]: BOOL bytes are 0 (false) or 1 (true), got {octets[at]}")
    if datatype == "BF16":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    # The contract's data is JSON-like; the runner decodes and checks it as it does /service_output's.
    return array.tolist()


def answer(
    body: Any, request: InferRequest, model_name: str, lone: str = LONE_OUTPUT
) -> tuple[dict[str, Any], bytes | None]:
    """The runner's answer (a contract tensor, or tensors in dicts and lists; ``Unasked`` where the runner left an
    output nobody asked for) -> the protocol's response JSON and the binary data that follows it; ``lone`` names an
    answer that is one bare tensor. Only the outputs answered are checked. Raises ProtocolError: 400 for an unknown
    requested output, 422 for an answered output the protocol cannot carry (the model's answer, not a fault of the
    service; /service_output carries it)."""
    found = [(lone, body)] if _is_lone(body) else output_tensors(body)
    tensors: dict[str, Any] = {}
    twice: set[str] = set()
    for name, value in found:
        if name in tensors:
            twice.add(name)
        tensors.setdefault(name, value)
    names = request.outputs if request.outputs is not None else list(tensors)
    for name in names:
        if name not in tensors:
            raise ProtocolError(
                400, f"outputs: unknown output {json_text(name)}; this model's outputs are {', '.join(tensors)}"
            )
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name in names:
        tensor = tensors[name]
        if name in twice:  # e.g. {"a": {"b": t1}, "a.b": t2}: one name, two tensors, one would be lost
            raise ProtocolError(
                422, f"the model's answer has two tensors named {json_text(name)} in the protocol; use /service_output"
            )
        if isinstance(tensor, Unasked):  # the runner named the outputs otherwise than here: the service's fault
            raise ProtocolError(500, f"output {name}: left out of the runner's answer although asked for")
        if not _is_tensor(tensor):
            raise ProtocolError(422, f"the model's output {name} is {json_type(tensor)}, not a tensor; {_TENSORS_ONLY}")
        output, chunk = _output(
            name,
            tensor,
            binary=name in request.binary_outputs or (request.outputs is None and request.binary_by_default),
        )
        outputs.append(output)
        if chunk is not None:
            chunks.append(chunk)
    response: dict[str, Any] = {"model_name": model_name, "model_version": MODEL_VERSION}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = outputs
    return response, b"".join(chunks) if chunks else None


# /v2 runs the workflow's own hooks as /service_output does (its preprocess may scale the input: skipping it would
# change the numbers silently), so what a custom postprocess answers is what /v2 must carry.
_TENSORS_ONLY = (
    "use /service_output, or have the workflow's postprocess return tensors (workflows.tensors.encode_output)"
)


def _is_tensor(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("dtype"), str) and "values" in body and "shape" in body


def _is_lone(body: Any) -> bool:
    return _is_tensor(body) or isinstance(body, Unasked)


def output_tensors(body: Any, name: str = "") -> list[tuple[str, Any]]:
    """(name, output) for every output of an answer: "output_0" for a lone tensor or a list's items, the key for a
    dict's, joined with "." when nested. An output is a contract tensor, ``Unasked``, or whatever else the model
    answered in that place (``answer`` refuses it if asked for: no tensor)."""
    if _is_lone(body):
        return [(name or "output_0", body)]
    if isinstance(body, dict):
        items = [(f"{name}.{key}" if name else str(key), value) for key, value in body.items()]
    elif isinstance(body, list):
        items = [(f"{name}.{index}" if name else f"output_{index}", value) for index, value in enumerate(body)]
    else:
        return [(name or "output_0", body)]
    return [found for item_name, value in items for found in output_tensors(value, item_name)]


def _output(name: str, tensor: dict[str, Any], binary: bool) -> tuple[dict[str, Any], bytes | None]:
    datatype = CONTRACT_DATATYPES.get(tensor["dtype"])
    if datatype is None:
        raise ProtocolError(
            422, f"output {name}: the protocol has no datatype for {tensor['dtype']}; use /service_output"
        )
    shape = [int(n) for n in tensor["shape"]]
    values = np.asarray(tensor["values"]).reshape(-1)
    datatype = _OWN_DATATYPES.get(values.dtype, datatype)
    output: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if not binary:
        output["data"] = np.ascontiguousarray(values)
        return output, None
    if datatype == "BF16":  # the contract carries bfloat16 values as float32, which holds each one exactly
        chunk = (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    else:
        chunk = values.astype(_OUTPUT_WIRE[datatype]).tobytes()
    output["parameters"] = {"binary_data_size": len(chunk)}
    return output, chunk


def in_protocol_terms(description: str) -> str:
    """The runner's message about the contract's data, in the words of the protocol's request."""
    for contract, protocol in (
        ("values", "inputs[0].data"),
        ("shape", "inputs[0].shape"),
        ("dtype", "inputs[0].datatype"),
    ):
        if description.startswith(contract):
            description = protocol + description[len(contract) :]
            break
    return description.replace(" values ", " data ")


def _parameters(obj: dict[str, Any], key: str, where: str | None = None) -> dict[str, Any]:
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(400, f"{where or key}: expected an object")
    return value


def _flag(parameters: dict[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(400, f"{where}.{key}: expected true or false")
    return value


def _row_major(nested: list[Any]) -> list[Any]:
    """Nested data's elements in row-major order, one level at a time while every item is a list. Data nested
    unevenly stays as it is, for the runner's decoder to name the place."""
    while nested and isinstance(nested[0], list) and all(isinstance(item, list) for item in nested):
        nested = list(itertools.chain.from_iterable(nested))
    return nested


async def _respond(send: Send, status: int, body: Any, binary: bytes | None, headers: list[tuple[bytes, bytes]]) -> int:
    try:
        payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as e:
        status, binary = 500, None
        payload = orjson.dumps({"error": f"the model's output is not JSON-serialisable: {e}"})
    if binary is None:
        headers = [*headers, _JSON]
    else:
        headers = [*headers, _OCTETS, (_HEADER_LENGTH, str(len(payload)).encode())]
        payload += binary
    headers.append((b"content-length", str(len(payload)).encode()))
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
    return status
