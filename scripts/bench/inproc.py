"""Baseline (c): the in-process limit, samples/s of the model's forward alone (no HTTP, no JSON), and the cost of
turning one request's JSON into a tensor (orjson.loads + the service's workflows.tensors.decode), no HTTP, no model.

Run as ``python -m scripts.bench.inproc MODEL_FILE --shape 69 --threads 2 --batch 1 32 --seconds 3 [--body FILE]``
from the repository root; prints one JSON line: samples/s per batch size, and requests/s under "decode".
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path


def samples_per_second(
    model_path: str, batch: int, seconds: float, threads: int, shape: int | Sequence[int], dtype: str
) -> float:
    import torch

    torch.set_num_threads(threads)
    model = torch.jit.load(model_path).eval()
    sample = (shape,) if isinstance(shape, int) else tuple(shape)
    x = torch.randn(batch, *sample, dtype={"float": torch.float32, "double": torch.float64}[dtype])
    with torch.inference_mode():
        for _ in range(3):  # warm-up: TorchScript profiles its first runs
            model(x)
        done, started = 0, time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            model(x)
            done += batch
        return done / (time.perf_counter() - started)


def decodes_per_second(body_path: str, seconds: float) -> float:
    """Requests/s of JSON → tensor for one request body: orjson.loads, then the service's own decode."""
    import orjson

    from workflows.tensors import decode

    raw = Path(body_path).read_bytes()
    for _ in range(3):
        decode(orjson.loads(raw)["data"])
    done, started = 0, time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        decode(orjson.loads(raw)["data"])
        done += 1
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--shape", type=int, nargs="+", required=True, help="one sample's shape")
    parser.add_argument("--dtype", default="float")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--body", help="a request body: also measure JSON → tensor per request")
    args = parser.parse_args()
    result: dict[str, float] = {
        str(b): samples_per_second(args.model, b, args.seconds, args.threads, args.shape, args.dtype)
        for b in args.batch
    }
    if args.body:
        result["decode"] = decodes_per_second(args.body, args.seconds)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
