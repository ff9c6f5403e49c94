"""deploykit: train a small decoder-only LLM and ship it to every runtime, proving each step.

Public API (stable names; everything else is reachable through the submodules)::

    import deploykit
    model = deploykit.load_model("runs/nano")                      # CausalLM from a checkpoint folder
    result = deploykit.convert("runs/nano", "torch", "int8-dynamic", "artifacts/nano-int8")
    runner = deploykit.load("artifacts/nano-int8")                 # the same Runner API for every backend
    runner.generate("Once upon a time", max_new_tokens=32)

Imports stay light: numpy and pluggy. torch comes with the first name that needs it (``load_model``,
``CausalLM``, ``generate``, a torch runner, a conversion), so serving code that loads a native, onnx or
gguf artifact never imports it. Backends (onnx, transformers...) import their libraries when used, and
are discovered through the ``deploykit.backends`` entry points on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .deploy.backend import Backend, ConvertContext, Runner, Scheme, Tolerance
from .deploy.convert import ConvertResult, convert
from .deploy.hookspecs import hookimpl
from .deploy.runtime import load
from .errors import (
    ArtifactError,
    BackendError,
    BackendUnavailable,
    CheckpointError,
    ConfigError,
    DataError,
    DeploykitError,
    FilesystemError,
    ParityError,
    TargetExistsError,
)
from .lazy import lazy_attributes
from .model.checkpoint import load_model, save_model
from .model.config import ModelConfig, preset
from .model.generation import generate

__getattr__ = lazy_attributes(__name__, {"CausalLM": ".model.graph"})  # torch-backed: imported on first use

__all__ = [
    "ArtifactError", "Backend", "BackendError", "BackendUnavailable", "CausalLM", "CheckpointError", "ConfigError",
    "ConvertContext", "ConvertResult", "DataError", "DeploykitError", "FilesystemError", "ModelConfig",
    "ParityError", "Runner", "Scheme", "TargetExistsError", "Tolerance", "__version__", "convert", "generate",
    "hookimpl", "load", "load_model", "preset", "save_model",
]

