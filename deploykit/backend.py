"""The backend contract, where plugin authors have always imported it: ``from deploykit.backend import ...``.

The contract lives in ``deploykit.deploy.backend`` (with the rest of how a model leaves: registry,
convert, parity, runtime); this module re-exports it so a third-party plugin needs one import path
that does not follow deploykit's internal layout.
"""
from __future__ import annotations

from .deploy.backend import (
    EXACT,
    HALF,
    INT8,
    LOSSY,
    Backend,
    ConvertContext,
    RecomputeSession,
    Runner,
    Scheme,
    Tolerance,
    as_int64_batch,
)
from .deploy.hookspecs import hookimpl
from .deploy.runtime import ModelRunner, load_tokenizer

__all__ = ["EXACT", "HALF", "INT8", "LOSSY", "Backend", "ConvertContext", "ModelRunner", "RecomputeSession", "Runner",
           "Scheme", "Tolerance", "as_int64_batch", "hookimpl", "load_tokenizer"]
