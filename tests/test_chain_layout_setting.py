"""CHAIN_LAYOUT set explicitly: each setting reads only its own layout and answers every other with a 400, in this
process (the real ``PublicApp`` and the real iris workflow, only the hop stood in for: tests/fixtures/public_app.py).
Bodies are built with eth-abi and the infernet-ml vector encoders; the default model answers (no model named)."""

from __future__ import annotations

import pytest
from eth_abi import decode, encode

from public.infernet_ml_layouts import decode_vector_v1, decode_vector_v2, encode_vector_v1, encode_vector_v2

IRIS = [1.0380048, 0.5586108, 1.1037828, 1.712096]  # the original service's test: class 2

BODIES = {
    "int256": encode(["int256[]"], [[round(v * 10**18) for v in IRIS]]).hex(),
    # Empty model fields: the default model, in each infernet-ml layout.
    "v1": encode(
        ["uint8", "string", "string", "string", "bytes"], [0, "", "", "", encode_vector_v1("double", [1, 4], IRIS)]
    ).hex(),
    "v2": encode(["bytes", "bytes"], [b"", encode_vector_v2("double", [1, 4], IRIS)]).hex(),
}


def answer_class(layout: str, raw_output: str) -> int:
    blob = bytes.fromhex(raw_output)
    if layout == "int256":
        (values,) = decode(["int256[]"], blob)
    else:
        decoded = (decode_vector_v1 if layout == "v1" else decode_vector_v2)(blob)
        values = decoded["values"]
        values = values[0] if isinstance(values[0], list) else values
    return max(range(3), key=list(values).__getitem__)


@pytest.mark.parametrize("layout", sorted(BODIES))
def test_explicit_layout_reads_its_own_layout(in_process, layout):
    public = in_process({"CHAIN_LAYOUT": layout})
    response = public.post({"source": 0, "destination": 0, "data": BODIES[layout]})
    assert response.status_code == 200, response.text
    assert answer_class(layout, response.json()["raw_output"]) == 2


@pytest.mark.parametrize(
    "layout, other", [(layout, other) for layout in sorted(BODIES) for other in sorted(BODIES) if other != layout]
)
def test_explicit_layout_refuses_the_others(in_process, layout, other):
    public = in_process({"CHAIN_LAYOUT": layout})
    response = public.post({"source": 0, "destination": 0, "data": BODIES[other]})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == "400" and body["description"]
    assert "Traceback" not in response.text
    assert public.runner.calls == []  # refused before the model
