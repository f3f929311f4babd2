"""Peer (e): LitServe, FastAPI/uvicorn API servers handing batches to inference worker processes.

``.venv-peers/bin/python litserve_app.py --port PORT`` (LitServe lives in its own venv, `make peers-venv`).
POST /predict takes the same body as /service_output. 2 inference workers of 1 torch thread (and LitServe's
default of as many API servers), batches of up to BENCH_MAX_BATCH_SIZE requests formed within BENCH_MAX_WAIT_MS.
Model file: env BENCH_MODEL.
"""

from __future__ import annotations

import argparse
import os

import litserve as ls
import torch

DTYPES = {"float": torch.float32, "double": torch.float64}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class BenchAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        torch.set_num_threads(1)
        self.model = torch.jit.load(os.environ["BENCH_MODEL"]).eval()

    # No annotation on `request` nor on encode_response's return: LitServe reads them as the route's request and
    # response models; without them it parses the body as JSON and answers JSON, its documented default.
    def decode_request(self, request):
        return torch.tensor(request["data"]["values"], dtype=DTYPES[request["data"]["dtype"]])

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        # Each request holds one sample (a batch of one): concatenate, where the default would stack.
        return torch.cat(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(x)

    def unbatch(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(output.split(1))

    def encode_response(self, output: torch.Tensor):
        return {"dtype": NAMES[output.dtype], "shape": list(output.shape), "values": output.tolist()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    api = BenchAPI(
        max_batch_size=int(os.environ["BENCH_MAX_BATCH_SIZE"]),
        batch_timeout=int(os.environ["BENCH_MAX_WAIT_MS"]) / 1000,
        api_path="/predict",
    )
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=2)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")
