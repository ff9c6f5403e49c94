"""The backend contract, where plugin authors have always imported it: ``from deploykit.backend import ...``.

The contract lives in ``deploykit.deploy`` (``backend``: Backend, Scheme, Runner, RunnerInfo;
``options``: scheme options; ``roles``: the module vocabulary); this module re-exports what a
third-party plugin needs, so it has one import path that does not follow deploykit's internal
layout. Torch-graph plumbing (module swapping, saving, rebuilding): ``deploykit.deploy.torchgraph``.
"""
from __future__ import annotations

from .deploy.artifact import model_files
from .deploy.backend import (
    EXACT,
    HALF,
    INT8,
    LOSSY,
    Backend,
    ConvertContext,
    RecomputeSession,
    Runner,
    RunnerInfo,
    Scheme,
    Tolerance,
    as_int64_batch,
)
from .deploy.hookspecs import hookimpl
from .deploy.options import Int8Options, NoOptions, SchemeOptions, option
from .deploy.roles import QUANTIZED, Role, linear_roles, select
from .deploy.runtime import ModelRunner, load_tokenizer

__all__ = ["EXACT", "HALF", "INT8", "LOSSY", "QUANTIZED", "Backend", "ConvertContext", "Int8Options", "ModelRunner",
           "NoOptions", "RecomputeSession", "Role", "Runner", "RunnerInfo", "Scheme", "SchemeOptions", "Tolerance",
           "as_int64_batch", "hookimpl", "linear_roles", "load_tokenizer", "model_files", "option", "select"]
