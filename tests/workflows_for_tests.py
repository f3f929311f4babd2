"""Workflow classes named in CLASSIC_INF_WORKFLOW_CLASS by the integration tests."""

from __future__ import annotations

import os
import time
from typing import Any

from core.errors import InputError, ModelError
from workflows.base import InferenceWorkflow, TensorWorkflow


class Toolbox(InferenceWorkflow):
    """Built from JSON positional and keyword args; its answers show what it was built with.

    data {"echo": X} -> {"prefix", "scale", "echo": X}; {"set": ...} -> a Python set, which is not JSON;
    {"fail": msg} -> the model raises; {"hang": seconds} -> pre-processing blocks the runner's event loop that long
    (a workflow stuck before the model); anything else -> InputError.
    """

    def __init__(self, prefix: str, *, scale: int = 1, setup_seconds: float = 0.0) -> None:
        self.prefix = prefix
        self.scale = scale
        self.setup_seconds = setup_seconds

    def setup(self) -> None:
        time.sleep(self.setup_seconds)  # lets a test see /readyz before the model is ready

    def preprocess(self, data: Any) -> Any:
        if not {"echo", "set", "fail", "hang"} & set(data):
            raise InputError("data: expected one of echo, set, fail, hang")
        if "hang" in data:
            time.sleep(float(data["hang"]))
            return {"echo": "hung"}
        return data

    def run_model(self, item: Any) -> Any:
        if "fail" in item:
            raise RuntimeError(item["fail"])
        if "set" in item:
            return {1, 2, 3}
        return {"prefix": self.prefix, "scale": self.scale, "echo": item["echo"]}

    def describe(self) -> dict[str, Any]:
        return {"prefix": self.prefix}


class Doubler(TensorWorkflow):
    """The README's Scaler's shape: no __init__ and no warmup; the contract's tensors in, each value doubled."""

    def run_model(self, batch: Any) -> Any:
        return batch * 2


class BadDescribe(Doubler):
    """describe() returns the model object, the mistake base.py's docstring warns of: /info cannot send it."""

    def setup(self) -> None:
        import torch  # here, not at the top: the module is imported where torch must not be (the arbiter)

        self.model = torch.nn.Linear(2, 2)

    def describe(self) -> dict[str, Any]:
        return {"name": "x", "model": self.model}


class Strict(Doubler):
    """Takes one positional-only argument and one optional: POSITIONAL_ARGS of three is one too many."""

    def __init__(self, scale: float, /, bias: float = 0.0) -> None:
        self.scale = scale
        self.bias = bias


class _QuotesTheToken(str):
    """A name that JSON takes but pickle refuses, with an error that quotes HF_TOKEN, as an HTTP library's error
    quotes the Authorization header it could not send."""

    def __reduce__(self) -> Any:
        raise RuntimeError(f"cannot send Authorization: Bearer {os.environ.get('HF_TOKEN', '')}")


class LeakyDescribe(Doubler):
    """describe() passes start-up's JSON check, but the runner's /describe cannot pickle it: BentoML's endpoint
    fails and BentoML's own logger writes the traceback, whose message quotes HF_TOKEN."""

    def describe(self) -> dict[str, Any]:
        return {"name": _QuotesTheToken("x")}


class OwnHooks(TensorWorkflow):
    """Hooks of its own on both sides, and checks of its own that raise: ``preprocess`` takes float tensors only
    (a TypeError: 400) and adds 1; ``run_model`` takes 3 features only (its own ModelError: 422) and doubles;
    ``postprocess`` answers ``{"scored": (x + 1) * 2 + 100 as a tensor, "labels": ["big"/"small" per value]}``."""

    def preprocess(self, data: Any) -> Any:
        import torch

        item = super().preprocess(data)
        if item.dtype != torch.float32:
            raise TypeError(f"OwnHooks takes float tensors, got {item.dtype}")
        return item + 1

    def run_model(self, batch: Any) -> Any:
        if batch.shape[-1] != 3:
            raise ModelError(f"OwnHooks takes 3 features, got {batch.shape[-1]}")
        return batch * 2

    def postprocess(self, output: Any) -> Any:
        from workflows import tensors

        labels = ["big" if value > 10 else "small" for value in output.flatten().tolist()]
        return {"scored": tensors.encode_output(output + 100), "labels": labels}
