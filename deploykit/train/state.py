"""Training state for ``--resume``, stored without pickle.

A checkpoint folder is a normal model folder plus two files:

- ``trainer_state.safetensors``: every tensor — AdamW's moments and step counters, torch's RNG
  state (a ByteTensor);
- ``trainer_state.json``: everything else — step, schedule length, the training config, the data
  loader position, Python's RNG state, optimizer hyper-parameters, a hash of the training data.

``torch.save`` would be one line, but a pickle can run arbitrary code when loaded, and the whole
project refuses pickles for weights; the optimizer state gets the same treatment.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .config import STATE_JSON, STATE_TENSORS
STATE_VERSION = 1


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``optim.{param}.{key}``) and JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                # clone: safetensors refuses tensors that share storage, and the optimizer keeps training.
                tensors[f"optim.{idx}.{key}"] = value.detach().clone().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        meta: dict[str, Any], source: Path) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, per_param in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(per_param)
    groups = meta["param_groups"]
    current = optimizer.state_dict()["param_groups"]
    if [g.get("names") for g in groups] != [g.get("names") for g in current]:
        raise CheckpointError(
            f"{source}: the saved optimizer's parameter groups do not match this model",
            hint="resume with the same preset/model config as the saved run, or start a new --out")
    for g in groups:  # JSON turned the betas tuple into a list; AdamW only unpacks it, but keep the type
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_to_flat() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    version, internal, gauss = random.getstate()
    return {"rng.torch": torch.get_rng_state()}, {"python": [version, list(internal), gauss]}


def rng_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if "python" in meta:
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))


def write_state(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write both files into ``folder`` (the caller's temporary folder of an atomic save)."""
    from safetensors.torch import save_file

    save_file(tensors, str(folder / STATE_TENSORS), metadata={"format": "pt", "producer": "deploykit.train"})
    (folder / STATE_JSON).write_text(json.dumps({"version": STATE_VERSION, **meta}, indent=1) + "\n")


def read_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    js, st = folder / STATE_JSON, folder / STATE_TENSORS
    if not js.is_file() or not st.is_file():
        raise CheckpointError(
            f"{folder}: no training state ({STATE_JSON} + {STATE_TENSORS}) to resume from",
            hint="--resume needs a folder written by `deploykit train`; to fine-tune a plain model "
                 "folder instead, start a new run with --force or another --out")
    try:
        meta = json.loads(js.read_text())
        tensors = load_file(str(st))
    except (json.JSONDecodeError, SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: training state is corrupt ({e})",
                              hint="resume from an intact copy, or start over with --force") from e
    if meta.get("version") != STATE_VERSION:
        raise CheckpointError(f"{js}: training state version {meta.get('version')!r}, expected {STATE_VERSION}",
                              hint="resume with the deploykit version that wrote it, or start over with --force")
    return tensors, meta
