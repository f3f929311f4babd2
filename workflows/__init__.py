"""Inference workflows, what a user extends: the base class, ``TensorWorkflow`` (batching defaults for tensors with a
batch axis), ``run_batch`` (a batch in-process, for unit tests) and the built-in torch workflow.

Importing this package does not import torch; ``workflows.torch_workflow`` does.
"""

from core.errors import InputError, ModelError, Outcome, ServiceError, StartupError
from workflows.base import InferenceWorkflow, TensorWorkflow, run_batch

__all__ = [
    "InferenceWorkflow", "InputError", "ModelError", "Outcome", "ServiceError", "StartupError", "TensorWorkflow",
    "run_batch",
]  # fmt: skip
