"""Names a module resolves on first use (PEP 562), so importing it stays cheap.

``import deploykit`` must not import torch: serving a native, onnx or gguf artifact never needs it.
A package whose public names include torch-backed ones lists them here instead of importing them::

    __getattr__ = lazy_attributes(__name__, {"CausalLM": ".model.graph"})

The first ``package.CausalLM`` imports the module and caches the object in the package's namespace;
``from package import CausalLM`` works the same way. Unknown names raise AttributeError as usual.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: ``names`` maps each name to the module (absolute, or
    relative to ``package``) that defines it."""
    names = dict(names)

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
