"""Baseline (a): the service we replace, as its README describes it.

A Quart app under ``hypercorn --workers=2``; each worker loads the model (1 torch thread), validates the body
with pydantic and runs one forward per request on the event loop, with no batching. Model file: env BENCH_MODEL.
"""

from __future__ import annotations

import os
from enum import IntEnum
from typing import Annotated, Any

import torch
from pydantic import BaseModel, StringConstraints, ValidationError
from quart import Quart, request

torch.set_num_threads(1)
DTYPES = {"float": torch.float32, "double": torch.float64}
HexStr = Annotated[str, StringConstraints(strip_whitespace=True, pattern="^[a-fA-F0-9]+$")]


class InfernetInputSource(IntEnum):
    CHAIN = 0
    OFFCHAIN = 1


class InfernetInput(BaseModel):
    source: InfernetInputSource
    data: HexStr | dict[str, Any]


model = torch.jit.load(os.environ["BENCH_MODEL"]).eval()
app = Quart(__name__)


@app.route("/service_output", methods=["POST"])
async def service_output() -> Any:
    try:
        inp = InfernetInput(**(await request.get_json(force=True)))
    except ValidationError as e:
        return {"code": "400", "description": str(e)}, 400
    data = inp.data
    tensor = torch.tensor(data["values"], dtype=DTYPES[data["dtype"]])
    with torch.inference_mode():
        out = model(tensor)
    return {"dtype": data["dtype"], "shape": list(out.shape), "values": out.tolist()}


@app.route("/readyz")
async def readyz() -> Any:
    return "ok"
