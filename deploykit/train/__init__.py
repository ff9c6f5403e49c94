"""Pretraining: ``pretrain(TrainConfig(out=..., preset="micro")) -> TrainResult``.

``TrainConfig`` is importable without torch (the CLI builds its help from it); ``pretrain`` and
``TrainResult`` load torch on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import MATH_FIELDS, RUN_FILES, TrainConfig

if TYPE_CHECKING:
    from .pretrain import TrainResult, pretrain

__all__ = ["MATH_FIELDS", "RUN_FILES", "TrainConfig", "TrainResult", "pretrain"]


def __getattr__(name: str) -> Any:
    if name in ("pretrain", "TrainResult"):
        import importlib

        module = importlib.import_module(f"{__name__}.pretrain")
        # Importing the submodule bound `pretrain` here to the module; rebind the public names to
        # the function and class (`deploykit.train.pretrain` the module stays in sys.modules).
        globals().update(pretrain=module.pretrain, TrainResult=module.TrainResult)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
