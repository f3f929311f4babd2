"""Baseline (b): a plain BentoML 1.4 service, the way its docs suggest writing one.

A typed ``@bentoml.api`` route at /service_output, the model in the API process of each of the 2 workers
(1 torch thread each), no batching, default configuration. Model file: env BENCH_MODEL.
"""

from __future__ import annotations

import os
from typing import Any

import bentoml
import torch
from pydantic import BaseModel

DTYPES = {"float": torch.float32, "double": torch.float64}


class InfernetInput(BaseModel):
    source: int
    data: dict[str, Any]


@bentoml.service(workers=2)
class PlainService:
    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.model = torch.jit.load(os.environ["BENCH_MODEL"]).eval()

    @bentoml.api(route="/service_output")
    def service_output(self, inp: InfernetInput, /) -> dict[str, Any]:
        data = inp.data
        tensor = torch.tensor(data["values"], dtype=DTYPES[data["dtype"]])
        with torch.inference_mode():
            out = self.model(tensor)
        return {"dtype": data["dtype"], "shape": list(out.shape), "values": out.tolist()}
