"""Trains the embedded example model: the iris classifier of the original service's tests.

Deterministic: same data (scikit-learn's bundled iris), same seed, one thread, full-batch training, the same
arithmetic on any x86-64 CPU (below), and the same bytes in any checkout (the archive keeps no source file
paths). Writes models/iris/model.torch (TorchScript) and
models/iris/MODEL_CARD.md, or into the folder ``--out`` names.

    .venv/bin/python scripts/train_iris.py [--out FOLDER]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

# Each CPU's own kernels round differently, so 300 training steps end in different weights on different CPUs (a
# checkout on an AVX-512 machine retrained another file than the committed one): torch's kernels for the ISA-neutral
# baseline (ATen's CPU dispatch, read when torch loads) and MKL's Conditional Numerical Reproducibility mode (its
# matrix products, identical across x86-64 CPUs for one MKL version: Intel's "MKL_CBWR" documentation).
if __name__ == "__main__":
    # nn.Linear's __constants__ is a set: the order of the constants in the saved code, and so the file's sha256,
    # follows Python's string hash seed, random for each run unless fixed. The other two are read at start-up.
    reproducible = {"PYTHONHASHSEED": "0", "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"}
    if any(os.environ.get(name) != value for name, value in reproducible.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **reproducible})

import torch
from sklearn.datasets import load_iris
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the repository's packages

from workflows.sources.cache import sha256_of

OUT = Path(__file__).resolve().parent.parent / "models" / "iris"
TEST_VECTOR = [1.0380048, 0.5586108, 1.1037828, 1.712096]  # already standardised; the original's test expects class 2


class IrisClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(4, 50), torch.nn.ReLU(),
            torch.nn.Linear(50, 50), torch.nn.ReLU(),
            torch.nn.Linear(50, 3),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.layers(x), dim=1)


def save_without_source_paths(module: torch.jit.ScriptModule, path: Path) -> None:
    """``torch.jit.save`` without the ``*.debug_pkl`` records: they hold the absolute paths of this script and of
    torch's own modules, so the file's sha256 changed with the checkout's and the venv's folders. The model and its
    code are unchanged; TorchScript errors then point at the archive's code instead of the Python source."""
    saved = io.BytesIO()
    torch.jit.save(module, saved)
    saved.seek(0)
    # torch's own archive reader and writer (private, but the only ones that keep its record layout and alignment).
    reader = torch._C.PyTorchFileReader(saved)
    writer = torch._C.PyTorchFileWriter(str(path))  # names the archive's folder after the file: model/
    for name in reader.get_all_records():
        # The writer adds its own version, byteorder and serialization id.
        if name.endswith(".debug_pkl") or name in ("version", "byteorder", ".data/serialization_id"):
            continue
        data = reader.get_record(name)
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT, help="the folder to write model.torch and MODEL_CARD.md to")
    out = parser.parse_args().out
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    iris = load_iris()
    scaler = StandardScaler().fit(iris.data)
    x = torch.tensor(scaler.transform(iris.data), dtype=torch.float32)
    y = torch.tensor(iris.target)

    model = IrisClassifier()
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        optimiser.zero_grad()
        loss = torch.nn.functional.nll_loss(torch.log(model(x) + 1e-9), y)
        loss.backward()
        optimiser.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
        test_class = int(model(torch.tensor([TEST_VECTOR])).argmax(dim=1))
    assert test_class == 2, f"test vector came out as class {test_class}"

    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.torch"
    save_without_source_paths(torch.jit.script(model), path)
    sha256 = sha256_of(path)
    card = {
        "features": list(iris.feature_names),
        "scaler_mean": [round(float(v), 6) for v in scaler.mean_],
        "scaler_scale": [round(float(v), 6) for v in scaler.scale_],
        "classes": list(iris.target_names),
        "training_accuracy": round(accuracy, 4),
        "sha256": sha256,
    }
    (out / "MODEL_CARD.md").write_text(_card(card))
    print(json.dumps(card, indent=2))


def _card(card: dict) -> str:
    rows = "\n".join(
        f"| {i} | {name} | {mean} | {scale} |"
        for i, (name, mean, scale) in enumerate(zip(card["features"], card["scaler_mean"], card["scaler_scale"]))
    )
    classes = ", ".join(f"{i} = {name}" for i, name in enumerate(card["classes"]))
    return f"""# Iris classifier (embedded example model)

Served when no model is configured. Trained by `scripts/train_iris.py` on the iris data that scikit-learn
ships, deterministically (seed 0, one thread, 300 full-batch Adam steps, the same arithmetic on any x86-64 CPU).

- Architecture: 4 -> 50 -> 50 -> 3, ReLU, softmax output (float32), TorchScript.
- Input: `float`/`double` tensor of shape `[N, 4]`, features **standardised** with the scaler below:
  `x = (raw - mean) / scale`.
- Output: `[N, 3]` class probabilities. Classes: {classes}.
- Training accuracy: {card["training_accuracy"]}.
- sha256 of `model.torch`: `{card["sha256"]}`.

| index | feature | mean | scale |
|---|---|---|---|
{rows}

Test vector (already standardised) `{TEST_VECTOR}` -> class 2 ({card["classes"][2]}).
"""


if __name__ == "__main__":
    main()
