"""Tensors in the contract's vocabulary: ``{"dtype": NAME, "shape": [..], "values": NESTED_LIST}``.

``decode`` turns a request's data into a tensor and refuses anything that does not fit the dtype (the values' checks
are numpy's, in core/tensor_values.py, which the API workers share); ``encode`` writes a tensor back in the same
vocabulary, so one container's output is the next one's input. Encoded values stay numpy arrays: the API worker
serialises them with orjson, which writes non-finite floats as ``null``.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch

from core.errors import InputError, ModelError
from core.settings import ServiceSettings, integer
from core.tensor_values import (
    COMPLEX,
    INTEGER_DTYPES,
    INTEGER_RANGE,
    NeedsValues,
    SentTensor,
    decode_array,
    number_text,
    overflow_text,
    requested_shape,
    sent_at,
)
from core.terms import DTYPE_NAMES, MAX_RANK, SentValues, too_many_dimensions

DTYPES: dict[str, torch.dtype] = {
    "float": torch.float32,
    "double": torch.float64,
    "cfloat": torch.complex64,
    "cdouble": torch.complex128,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "short": torch.int16,
    "int": torch.int32,
    "long": torch.int64,
    "bool": torch.bool,
}
assert tuple(DTYPES) == DTYPE_NAMES
NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
_LARGEST: dict[torch.dtype, float] = {
    dtype: 1 if dtype == torch.bool else (torch.finfo if dtype.is_floating_point else torch.iinfo)(dtype).max
    for dtype in DTYPES.values()
    if not dtype.is_complex
}

# Output dtypes ``encode`` answers as they are, under their own name: numpy has them, and none is widened or stacked.
_AS_IS: dict[torch.dtype, str] = {
    dtype: name for name, dtype in DTYPES.items() if name != "bfloat16" and not dtype.is_complex
}
_WIDER_FLOATS = ("half", "bfloat16", "float", "double")  # narrowest first
# Unsigned output dtypes beyond uint8: answered under the name of a wider signed dtype, values in their own dtype.
KEPT_UNSIGNED = frozenset({torch.uint16, torch.uint32, torch.uint64})
_LONG_MAX = 2**63 - 1
MAX_DENSE_OUTPUT = 16 * 1024 * 1024  # values: a sparse output is sent dense up to this many (128 MiB of float64)


def decode(data: Any, max_elements: int | None = None) -> torch.Tensor:
    """Request data -> CPU tensor of the named dtype, at most ``max_elements`` values and never more than
    MAX_REQUEST_ELEMENTS (what /info reports as the limit, whichever workflow decodes). Raises InputError saying what
    is wrong and where. ``data`` may also be a ``SentTensor``, the request as an API worker decoded it (a copy of its
    array, which it holds read-only); one of more values than the limit raises ``NeedsValues`` (its values as sent
    say which)."""
    limit = request_element_limit()
    if max_elements is not None:
        limit = min(max_elements, limit)
    if type(data) is SentTensor:
        if data.elements > limit:
            raise NeedsValues("values: more elements than this workflow's limit")
        array = data.array
        return torch.from_numpy(array if array.flags.writeable else array.copy())
    name, array, _ = decode_array(data, limit)
    if name == "bfloat16":
        tensor = torch.from_numpy(array).to(torch.bfloat16)  # numpy has no bfloat16
        bad = ~torch.isfinite(tensor)
        if bad.any():
            raise InputError(overflow_text(*sent_at(data["values"], int(bad.flatten().nonzero()[0])), name))
    else:
        tensor = torch.from_numpy(array)
    shape = requested_shape(tuple(tensor.shape), data, name)
    return tensor if shape is None else tensor.reshape(shape)


def cast_to_model(
    tensor: torch.Tensor, dtype: torch.dtype, values: Any, role: str = "the model's dtype"
) -> torch.Tensor:
    """A decoded input as the model's ``dtype``; ``values`` is what it was decoded from, to name a value as sent;
    ``role`` says in the refusal what ``dtype`` is to the model (its own, or the precision it runs in). ``values``
    None: the tensor came as a ``SentTensor`` (no values as written to name), and a value that does not fit raises
    ``NeedsValues`` instead.

    Runs where the workflow's preprocess runs (the runner's event loop). Raises InputError naming the first value
    the cast does not keep (a float that overflows a floating dtype, an integer that does not come back exactly from a
    floating one, any value that does not come back from an integer one), with its place and both dtypes; for
    ``core.terms.SentValues`` (CHAIN data), as the client sent it.
    """
    cast = tensor.to(dtype)
    if dtype.is_floating_point and not tensor.is_floating_point() and tensor.dtype != torch.bool:
        # Integers to a floating dtype: rounding would change a value nobody sent as a float (16777217 as float
        # is 16777216), so each must come back exactly; inf from an overflow does not come back either.
        bad = (cast.to(tensor.dtype) != tensor) | _beyond(cast, tensor.dtype)
    elif dtype.is_floating_point:
        if _largest(tensor.dtype) <= _largest(dtype):
            return cast
        # decode lets only finite values through, so a non-finite one here is an overflow of the cast;
        # numpy's check costs a few microseconds less than torch's (no bfloat16 in numpy, though).
        if dtype == torch.bfloat16:
            bad = ~torch.isfinite(cast)
        else:
            finite = np.isfinite(cast.numpy())
            if finite.all():
                return cast
            bad = torch.from_numpy(~finite)
    else:
        bad = cast.to(tensor.dtype) != tensor
        if tensor.is_floating_point() and dtype != torch.bool:
            bad |= _beyond(tensor, dtype)
    if not bad.any():
        return cast
    index = int(bad.flatten().nonzero()[0])
    target = NAMES.get(dtype, str(dtype).removeprefix("torch."))
    if isinstance(values, SentValues):  # decoded from CHAIN data or a wider 2.0 dtype: name it as the client sent it
        raise InputError(f"{values.describe(index)} does not fit {target} ({role})")
    if values is None:  # a SentTensor's: the API worker sends the values as written, for this message
        raise NeedsValues(f"a value does not fit {target} ({role})")
    place, sent = sent_at(values, index)
    raise InputError(f"{place}: {number_text(sent)} does not fit {target} ({role}), cast from {NAMES[tensor.dtype]}")


def _beyond(floats: torch.Tensor, integer: torch.dtype) -> torch.Tensor:
    """Where ``floats`` lie outside ``integer``'s range. A float cast to an integer dtype it does not fit is undefined
    in C: x86 gives the dtype's minimum, so the back-cast differs and the value is refused, but ARM saturates, and
    2**63 would come back from long's 2**63-1 as itself. So the range is checked, in float64 (exact for every float
    dtype), never left to the cast."""
    info = torch.iinfo(integer)
    wide = floats.to(torch.float64)
    return (wide < float(info.min)) | (wide >= float(info.max) + 1)  # float(2**63-1) + 1 is 2**63: the first beyond


def encode(tensor: torch.Tensor) -> dict[str, Any]:
    """A tensor in the contract's vocabulary (a sparse one as its dense values). Raises ModelError for an unsigned
    value beyond ``long``, for a tensor of more than ``MAX_RANK`` dimensions (the answer would not be a valid next
    input), and for a sparse tensor of more than ``MAX_DENSE_OUTPUT`` values."""
    if tensor.dim() > MAX_RANK:
        raise ModelError(f"output: {too_many_dimensions(tensor.dim())} (the most a request may send)")
    name = _AS_IS.get(tensor.dtype)
    if (
        name is not None
        and type(tensor) is torch.Tensor
        and tensor.is_cpu
        and tensor.layout is torch.strided
        and not tensor.requires_grad
        and not tensor.is_neg()
    ):
        # The usual output: every step below would hand back this tensor itself (detach, cpu and to its own dtype
        # are no-ops, a real tensor has no conjugate or negative bit to resolve), and those calls cost ~1.5 µs per
        # request.
        return {"dtype": name, "shape": list(tensor.shape), "values": np.ascontiguousarray(tensor.numpy())}
    tensor = tensor.detach().cpu()
    if tensor.layout != torch.strided:  # sparse: the contract's values are dense
        if tensor.numel() > MAX_DENSE_OUTPUT:
            raise ModelError(
                f"output: a sparse tensor of shape {list(tensor.shape)} is {tensor.numel()} values dense, more than "
                f"{MAX_DENSE_OUTPUT} to send"
            )
        tensor = tensor.to_dense()
    name = NAMES.get(tensor.dtype) or widened_name(tensor.dtype)
    if name == "long" and not tensor.is_signed() and tensor.numel():
        largest = tensor.numpy().max()  # uint64 would wrap to a negative long
        if largest > _LONG_MAX:
            raise ModelError(f"output: {largest} ({tensor.dtype}) does not fit long, the widest integer dtype")
    if tensor.dtype in KEPT_UNSIGNED:
        # The values keep their own dtype: the layouts with a code for it (2.0's uint16/32/64, the protocol's
        # UINT16/32/64) answer in it; the others read the name, the narrowest that holds every value.
        return {"dtype": name, "shape": list(tensor.shape), "values": np.ascontiguousarray(tensor.numpy())}
    tensor = tensor.to(DTYPES[name])
    if name == "bfloat16":
        array = tensor.float().numpy()  # numpy has no bfloat16; float32 holds every value exactly
    else:
        # A conjugate's imaginary part (``z.conj().imag``) is a view with torch's negative bit, which numpy() refuses.
        array = tensor.resolve_conj().resolve_neg().numpy()
    if name in COMPLEX:
        array = np.stack([array.real, array.imag], axis=-1)
    return {"dtype": name, "shape": list(tensor.shape), "values": np.ascontiguousarray(array)}


def encode_output(output: Any) -> Any:
    """A model's output as JSON-ready data: tensors encoded, containers walked, anything else as it is."""
    if isinstance(output, torch.Tensor):
        return encode(output)
    if isinstance(output, dict):  # JSON keys are strings: a TorchScript Dict[int, Tensor] answers {"1": ...}
        return {key if isinstance(key, str) else str(key): encode_output(value) for key, value in output.items()}
    if isinstance(output, (list, tuple)):
        return [encode_output(value) for value in output]
    return output


def widened_name(dtype: torch.dtype) -> str:
    """The vocabulary's name for an output dtype outside it: the narrowest dtype of its kind that holds every value of
    ``dtype`` exactly (float8 -> half, float8_e8m0fnu -> bfloat16, complex32 -> cfloat, uint16 -> int, uint32 and
    uint64 -> long); the widest of its kind for a dtype torch cannot describe. Pure; raises nothing."""
    widest = "cdouble" if dtype.is_complex else "double" if dtype.is_floating_point else "long"
    try:  # packed and sub-byte dtypes (float4_e2m1fn_x2, uint3) have no usable finfo/iinfo
        if dtype.is_complex or dtype.is_floating_point:
            own = _limits(torch.finfo(dtype))  # a complex dtype's finfo is its parts'
        else:
            info = torch.iinfo(dtype)
    except (TypeError, NotImplementedError, RuntimeError):
        return widest
    if dtype.is_complex:
        return "cfloat" if _holds(_limits(torch.finfo(torch.float32)), own) else widest
    if dtype.is_floating_point:
        return next((name for name in _WIDER_FLOATS if _holds(_limits(torch.finfo(DTYPES[name])), own)), widest)
    return next(
        (name for name in INTEGER_DTYPES if INTEGER_RANGE[name][0] <= info.min and info.max <= INTEGER_RANGE[name][1]),
        "long",
    )


def _limits(info: torch.finfo) -> tuple[float, float, float]:
    """(eps, largest, smallest positive) of a floating dtype; the smallest positive is a subnormal, tiny times eps."""
    return info.eps, info.max, info.tiny * info.eps


def _holds(wide: tuple[float, float, float], narrow: tuple[float, float, float]) -> bool:
    """Whether a floating dtype holds every finite value of another: as many fraction bits (eps), as large a maximum,
    as small a smallest positive value."""
    return wide[0] <= narrow[0] and wide[1] >= narrow[1] and wide[2] <= narrow[2]


@functools.cache
def request_element_limit() -> int:
    """MAX_REQUEST_ELEMENTS, read from this process's environment once: the bound of every ``decode``, so a custom
    workflow (a ``TensorWorkflow`` that never sets ``max_elements``) keeps the limit /info advertises too."""
    return integer(os.environ, "MAX_REQUEST_ELEMENTS", ServiceSettings.max_elements, minimum=1)


def _largest(dtype: torch.dtype) -> float:
    largest = _LARGEST.get(dtype)
    if largest is None:
        largest = (torch.finfo if dtype.is_floating_point else torch.iinfo)(dtype).max
    return largest
