"""Trains the embedded example model: the iris classifier of the original service's tests.

Deterministic: same data (scikit-learn's bundled iris), same seed, one thread, full-batch training.
Writes models/iris/model.torch (TorchScript) and models/iris/MODEL_CARD.md.

    .venv/bin/python scripts/train_iris.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

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


def main() -> None:
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

    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "model.torch"
    torch.jit.save(torch.jit.script(model), str(path))
    sha256 = sha256_of(path)
    card = {
        "features": list(iris.feature_names),
        "scaler_mean": [round(float(v), 6) for v in scaler.mean_],
        "scaler_scale": [round(float(v), 6) for v in scaler.scale_],
        "classes": list(iris.target_names),
        "training_accuracy": round(accuracy, 4),
        "sha256": sha256,
    }
    (OUT / "MODEL_CARD.md").write_text(_card(card))
    print(json.dumps(card, indent=2))


def _card(card: dict) -> str:
    rows = "\n".join(
        f"| {i} | {name} | {mean} | {scale} |"
        for i, (name, mean, scale) in enumerate(zip(card["features"], card["scaler_mean"], card["scaler_scale"]))
    )
    classes = ", ".join(f"{i} = {name}" for i, name in enumerate(card["classes"]))
    return f"""# Iris classifier (embedded example model)

Served when no model is configured. Trained by `scripts/train_iris.py` on the iris data that scikit-learn
ships, deterministically (seed 0, one thread, 300 full-batch Adam steps).

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
