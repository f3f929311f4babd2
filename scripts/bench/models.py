"""The two benchmark models, built fresh and saved as TorchScript, plus one request body for each.

tiny is request-bound (a forward costs microseconds), heavy is compute-bound (~19 MFLOP per sample).
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchModel:
    name: str
    path: Path
    body: Path
    features: int
    dtype: str  # the request's dtype name, the model's own


SPECS = {
    "tiny": {"layers": [69, 64, 2], "dtype": "double"},
    "heavy": {"layers": [512, 2048, 2048, 2048, 10], "dtype": "float"},
}


def build(name: str, folder: Path) -> BenchModel:
    """Build (or reuse) the model file and its request body under ``folder``."""
    import torch  # only the builder and the in-process limit need torch

    spec = SPECS[name]
    layers, dtype = spec["layers"], spec["dtype"]
    folder.mkdir(parents=True, exist_ok=True)
    path, body = folder / f"{name}.torch", folder / f"{name}.json"
    if not path.exists():
        torch.manual_seed(0)
        modules: list[torch.nn.Module] = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(layers)):
            if i:
                modules.append(torch.nn.ReLU())
            modules.append(torch.nn.Linear(n_in, n_out))
        model = torch.nn.Sequential(*modules).to({"double": torch.float64, "float": torch.float32}[dtype]).eval()
        tmp = path.with_suffix(".tmp")
        torch.jit.save(torch.jit.script(model), str(tmp))
        tmp.rename(path)
    if not body.exists():
        rng = random.Random(0)
        values = [[round(rng.uniform(-1, 1), 6) for _ in range(layers[0])]]
        body.write_text(json.dumps({"source": 1, "data": {"dtype": dtype, "values": values}}))
    return BenchModel(name, path, body, layers[0], dtype)
