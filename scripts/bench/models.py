"""The three benchmark models, built fresh and saved as TorchScript, plus one request body for each.

tiny is request-bound (a forward costs microseconds), heavy is compute-bound (~19 MFLOP per sample), image is a
small convolutional network whose requests are large (3×64×64 float32, 12,288 values, ~128 KB of JSON), so decoding
and encoding big tensors dominate.
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
    shape: tuple[int, ...]  # one sample's shape; a request holds a batch of one
    dtype: str  # the request's dtype name, the model's own


SPECS = {
    "tiny": {"layers": [69, 64, 2], "dtype": "double"},
    "heavy": {"layers": [512, 2048, 2048, 2048, 10], "dtype": "float"},
    "image": {"image": [3, 64, 64], "dtype": "float"},
}


def _mlp(layers: list[int]):
    import torch

    modules: list[torch.nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(layers)):
        if i:
            modules.append(torch.nn.ReLU())
        modules.append(torch.nn.Linear(n_in, n_out))
    return torch.nn.Sequential(*modules)


def _cnn(channels: int):
    import torch

    # Two strided convolutions (~1.6 M multiply-adds per image) and a 10-way head: cheap next to its JSON.
    return torch.nn.Sequential(
        torch.nn.Conv2d(channels, 16, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )


def _values(rng: random.Random, shape: tuple[int, ...]) -> list:
    if len(shape) == 1:
        return [round(rng.uniform(-1, 1), 6) for _ in range(shape[0])]
    return [_values(rng, shape[1:]) for _ in range(shape[0])]


def build(name: str, folder: Path) -> BenchModel:
    """Build (or reuse) the model file and its request body under ``folder``."""
    import torch  # only the builder and the in-process limit need torch

    spec = SPECS[name]
    dtype = spec["dtype"]
    shape = tuple(spec["image"]) if "image" in spec else (spec["layers"][0],)
    folder.mkdir(parents=True, exist_ok=True)
    path, body = folder / f"{name}.torch", folder / f"{name}.json"
    if not path.exists():
        torch.manual_seed(0)
        model = _cnn(shape[0]) if "image" in spec else _mlp(spec["layers"])
        model = model.to({"double": torch.float64, "float": torch.float32}[dtype]).eval()
        tmp = path.with_suffix(".tmp")
        torch.jit.save(torch.jit.script(model), str(tmp))
        tmp.rename(path)
    if not body.exists():
        values = [_values(random.Random(0), shape)]
        body.write_text(json.dumps({"source": 1, "data": {"dtype": dtype, "values": values}}))
    return BenchModel(name, path, body, shape, dtype)
