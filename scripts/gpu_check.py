"""The GPU path checked and measured: the torch workflow in-process on CUDA and on the CPU, no server, no network.

    python scripts/gpu_check.py                  # on the GPU machine: ~2-4 minutes
    python scripts/gpu_check.py --quick          # one timed pass per cell (what tests/test_gpu_path.py runs)

For the bench models (scripts/bench/models.py: tiny, heavy) and the embedded iris model it checks that
- on CUDA the model answers what it answers on the CPU, in the model's own precision;
- run in float16 and bfloat16 (KW_ARG ``precision``), on each device, it answers within tolerance of that, in the
  model's own dtype;
and it measures samples/s of the model thread's work (``forward_all``: batch, copy to the device, forward, copy
back, split; not the JSON decoding and encoding, which run beside it on the event loop) at batch 1, 32 and 256, the
batch made of that many one-row requests as the service forms it. Prints two markdown tables; exits 1 when an
answer is off. On a machine without CUDA the CUDA rows are skipped with a message.
Needs only torch and this project's pure-Python code (models are built fresh into --models-dir or a temporary folder).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _stand_in_for_pydantic() -> None:
    """The GPU machines' image has torch and numpy but not pydantic, which api/contract.py imports for the HTTP
    request models; workflows/tensors.py imports only its dtype names from there. Nothing this script runs validates
    with pydantic, so when it is missing a stand-in lets those class definitions execute."""
    try:
        import pydantic  # noqa: F401
    except ImportError:
        stand_in = types.ModuleType("pydantic")

        class BaseModel:
            def __init_subclass__(cls, **kwargs: object) -> None:
                pass

        def decorator(*args: object, **kwargs: object):
            return lambda function: function

        stand_in.BaseModel = BaseModel
        stand_in.ConfigDict = dict
        stand_in.Field = lambda *args, **kwargs: None
        stand_in.StrictBool = bool
        stand_in.ValidationError = type("ValidationError", (ValueError,), {})
        stand_in.ValidationInfo = object
        stand_in.field_validator = stand_in.model_validator = decorator
        sys.modules["pydantic"] = stand_in


_stand_in_for_pydantic()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from core.settings import EMBEDDED_MODEL, TorchSettings  # noqa: E402
from scripts.bench import models as bench_models  # noqa: E402
from workflows.base import forward_all, preprocess_all, run_batch  # noqa: E402
from workflows.torch_workflow import TorchInferenceWorkflow  # noqa: E402

BATCHES = (1, 32, 256)
LOWERED = ("float16", "bfloat16")
# Largest |answer - reference| allowed, as a fraction of the reference's largest |value| (at least 1): float16 keeps
# 11 significant bits and bfloat16 8, and the heavy model sums 2048 products per output through four layers.
TOLERANCE = {"own": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
ANSWER_ROWS = 8


@dataclass(frozen=True)
class Model:
    name: str
    path: Path
    shape: tuple[int, ...]  # one sample's
    dtype: str  # the contract's name of the model's own dtype, which requests use


def bench_and_iris(folder: Path) -> list[Model]:
    built = [bench_models.build(name, folder) for name in bench_models.SPECS]
    return [Model(m.name, m.path, m.shape, m.dtype) for m in built] + [Model("iris", EMBEDDED_MODEL, (4,), "float")]


def workflow(model: Model, device: str, precision: str | None, cache: Path, threads: int | None):
    built = TorchInferenceWorkflow(
        model_path=str(model.path),
        device=device,
        precision=precision,
        settings=TorchSettings(model_cache_dir=cache, num_threads=threads),
    )
    built.setup()
    return built


def requests_for(model: Model, rows: int, seed: int) -> list[dict]:
    """``rows`` one-row requests, as a batch of that size forms in the service."""
    values = np.random.default_rng(seed).uniform(-1, 1, size=(rows, *model.shape)).round(6)
    return [{"dtype": model.dtype, "values": [row]} for row in values.tolist()]


def answers(flow, datas: list[dict]) -> tuple[np.ndarray, str]:
    outcomes = run_batch(flow, datas)
    bad = [o for o in outcomes if o.status != 200]
    if bad:
        raise RuntimeError(f"the workflow refused a request: {bad[0]}")
    dtypes = {o.body["dtype"] for o in outcomes}
    values = np.concatenate([np.asarray(o.body["values"], dtype=np.float64) for o in outcomes])
    return values, ",".join(sorted(dtypes))


def samples_per_second(flow, model: Model, batch: int, seconds: float) -> float:
    prepared = preprocess_all(flow, requests_for(model, batch, seed=batch))
    for _ in range(2):  # warm-up: CUDA context and kernels, TorchScript's profiling runs
        forward_all(flow, prepared)
    done, started = 0, time.perf_counter()
    while True:
        forward_all(flow, prepared)  # ends after the copy back to the CPU: the GPU's work is done and counted
        done += batch
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per cell (default 2)")
    parser.add_argument("--quick", action="store_true", help="one timed pass per cell, fewer timed rows")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--models-dir", type=Path, help="where the bench models are built (default: a temporary one)")
    args = parser.parse_args(argv)
    seconds = 0.0 if args.quick else args.seconds

    cuda = torch.cuda.is_available()
    devices = ["cpu", "cuda"] if cuda else ["cpu"]
    print(f"torch {torch.__version__}, CUDA runtime {torch.version.cuda}, CPU threads {torch.get_num_threads()}")
    if cuda:
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    else:
        print("CUDA not available: skipping every CUDA row (answers and samples/s); CPU rows only.")

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        folder = args.models_dir or Path(tmp) / "models"
        cache = Path(tmp) / "cache"
        answer_rows: list[list[str]] = []
        speed_rows: list[list[str]] = []
        failed = False
        for model in bench_and_iris(folder):
            datas = requests_for(model, ANSWER_ROWS, seed=0)
            reference, reference_dtype = answers(workflow(model, "cpu", None, cache, args.threads), datas)
            scale = max(1.0, float(np.abs(reference).max()))
            for device in devices:
                for precision in (None, *LOWERED):
                    if device == "cpu" and precision is None:
                        continue  # the reference itself
                    flow = workflow(model, device, precision, cache, args.threads)
                    got, dtype = answers(flow, datas)
                    error = float(np.abs(got - reference).max()) / scale
                    tolerance = TOLERANCE[precision or "own"]
                    ok = error <= tolerance and dtype == reference_dtype
                    failed |= not ok
                    answer_rows.append(
                        [
                            model.name,
                            device,
                            precision or f"own ({flow.describe()['precision']})",
                            dtype,
                            f"{error:.2e}",
                            f"{tolerance:.0e}",
                            "ok" if ok else "**OFF**",
                        ]
                    )
            for device in devices:
                timed = (None,) if device == "cpu" or args.quick else (None, *LOWERED)
                for precision in timed:
                    flow = workflow(model, device, precision, cache, args.threads)
                    described = flow.describe()
                    rates = [samples_per_second(flow, model, batch, seconds) for batch in BATCHES]
                    speed_rows.append(
                        [
                            model.name,
                            device if device == "cpu" else f"cuda ({described['device_name']})",
                            described["precision"],
                            *(f"{rate:,.0f}" for rate in rates),
                        ]
                    )
            if not cuda:
                speed_rows.append([model.name, "cuda", "-", *("skipped: no CUDA" for _ in BATCHES)])

    print("\n## Answers against the CPU in the model's own precision\n")
    print(table(["model", "device", "precision", "answer dtype", "max error / scale", "tolerance", ""], answer_rows))
    print("\n## Samples/s of the model thread's work (batch, to device, forward, back, split)\n")
    print(table(["model", "device", "precision", *(f"batch {b}" for b in BATCHES)], speed_rows))
    if failed:
        print("\nsome answers are off (marked **OFF**)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
