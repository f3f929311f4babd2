"""Small real torch models the tests build and save in each supported format."""

from __future__ import annotations

from pathlib import Path

import torch


class Affine(torch.nn.Module):
    """y = x @ W.T + b with fixed weights, so expected outputs are easy to compute."""

    def __init__(self, features: int = 4, outputs: int = 3, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(features, outputs, dtype=dtype)
        with torch.no_grad():
            weight = torch.arange(features * outputs, dtype=dtype).reshape(outputs, features) / 10
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(torch.arange(outputs, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def save(model: torch.nn.Module, path: Path, kind: str, example: torch.Tensor) -> Path:
    model.eval()
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(model), str(path))
    elif kind == "pickle":
        torch.save(model, str(path))
    elif kind == "export":
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(path))
    else:
        raise ValueError(kind)
    return path


class Outputs(torch.nn.Module):
    """y = x * w, w = 1 (float32): one tensor, except for rows of 3 features (a tuple of two tensors), 5 (a dict of
    two), 6 (a dict with integer keys), 7 (a sparse tensor) and 9 (a dtype of ``WIDENED``), and SystemExit for rows of
    8 holding 13, so one server answers every kind of output. Saved as a pickle: TorchScript fixes one return type."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> object:
        y = x * self.w
        if x.shape[-1] == 3:
            return y, y.sum(-1)
        if x.shape[-1] == 5:
            return {"scaled": y, "total": y.sum(-1)}
        if x.shape[-1] == 6:  # integer keys, as a TorchScript Dict[int, Tensor] has
            return {1: y, 2: y.sum(-1)}
        if x.shape[-1] == 7:
            return y.to_sparse()
        if x.shape[-1] == 8 and bool((x == 13).any()):
            raise SystemExit(13)  # not an Exception: it failed every request of its batch
        if x.shape[-1] == 9:  # a dtype outside the contract's vocabulary, chosen by the first value
            return y.to(Outputs.WIDENED[int(x.flatten()[0])])
        return y

    # Rows of 9 features starting with i answer WIDENED[i] (bfloat16 is in the vocabulary, but 2.0 lacks it).
    WIDENED = (torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn, torch.complex32, torch.bfloat16)


class Sleepy(torch.nn.Module):
    """y = x, after sleeping ``seconds``; appends "start end" (time.time()) of each forward to ``log_path``, so a test
    can tell when each forward ran in the runner process. Saved as a pickle."""

    def __init__(self, seconds: float, log_path: str) -> None:
        super().__init__()
        self.seconds = seconds
        self.log_path = log_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        started = time.time()
        time.sleep(self.seconds)
        with open(self.log_path, "a") as log:
            log.write(f"{started} {time.time()}\n")
        return x + 0


class EmbeddingSum(torch.nn.Module):
    """Integer ids in (an embedding, as a text model's first layer), float parameters: the ids must stay integers."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids).sum(1)
