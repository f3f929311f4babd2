"""Peer (d): mosec, a Rust HTTP front with Python workers and dynamic batching, written the way its docs show.

``python mosec_app.py --address 127.0.0.1 --port PORT``. POST /inference takes the same body as /service_output;
mosec's default JSON deserializer parses it in the worker, which builds the tensor. 2 workers of 1 torch thread,
batches of up to BENCH_MAX_BATCH_SIZE requests formed within BENCH_MAX_WAIT_MS. Model file: env BENCH_MODEL.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from mosec import Server, Worker

DTYPES = {"float": torch.float32, "double": torch.float64}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class Inference(Worker):
    def __init__(self) -> None:
        super().__init__()
        torch.set_num_threads(1)
        self.model = torch.jit.load(os.environ["BENCH_MODEL"]).eval()

    def forward(self, data: list[Any]) -> list[dict[str, Any]]:
        # A batch of request bodies; each holds one sample (a batch of one), so they concatenate on dim 0.
        tensors = [torch.tensor(d["data"]["values"], dtype=DTYPES[d["data"]["dtype"]]) for d in data]
        with torch.inference_mode():
            out = self.model(torch.cat(tensors))
        answers, start = [], 0
        for t in tensors:
            part = out[start : start + len(t)]
            start += len(t)
            answers.append({"dtype": NAMES[part.dtype], "shape": list(part.shape), "values": part.tolist()})
        return answers


if __name__ == "__main__":
    server = Server()
    server.append_worker(
        Inference,
        num=2,
        max_batch_size=int(os.environ["BENCH_MAX_BATCH_SIZE"]),
        max_wait_time=int(os.environ["BENCH_MAX_WAIT_MS"]),
    )
    server.run()
