"""Baseline (c): the in-process limit, samples/s of the model's forward alone (no HTTP, no JSON).

Run as ``python -m scripts.bench.inproc MODEL_FILE --threads 2 --batch 1 32 --seconds 3``; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time


def samples_per_second(model_path: str, batch: int, seconds: float, threads: int, features: int, dtype: str) -> float:
    import torch

    torch.set_num_threads(threads)
    model = torch.jit.load(model_path).eval()
    x = torch.randn(batch, features, dtype={"float": torch.float32, "double": torch.float64}[dtype])
    with torch.inference_mode():
        for _ in range(3):  # warm-up: TorchScript profiles its first runs
            model(x)
        done, started = 0, time.perf_counter()
        deadline = started + seconds
        while time.perf_counter() < deadline:
            model(x)
            done += batch
        return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("--features", type=int, required=True)
    parser.add_argument("--dtype", default="float")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    result = {
        str(b): samples_per_second(args.model, b, args.seconds, args.threads, args.features, args.dtype)
        for b in args.batch
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
