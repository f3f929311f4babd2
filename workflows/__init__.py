"""Inference workflows: the base class, the batch runner and the built-in torch workflow.

Importing this package does not import torch; ``workflows.torch_workflow`` does.
"""

from core.errors import InputError, ModelError, ServiceError, StartupError
from workflows.base import InferenceWorkflow

__all__ = ["InferenceWorkflow", "InputError", "ModelError", "ServiceError", "StartupError"]
