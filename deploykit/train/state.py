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
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..model.schema import JsonObject, ListOf, non_negative, positive, read_json_object, short_repr
from .config import STATE_DCP, STATE_JSON, STATE_TENSORS

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
    """Load the optimizer state split by :func:`optimizer_to_flat` (``meta`` checked by :func:`read_state`).

    The current optimizer is the schema: the saved groups must have its keys, value types and
    parameter ids, and each saved moment the shape of its parameter. A mismatch would otherwise load
    and then fail inside ``optimizer.step()``, minutes into the resumed run.
    """
    groups = meta["param_groups"]
    current = optimizer.state_dict()["param_groups"]
    if [g.get("names") for g in groups] != [g.get("names") for g in current]:
        raise CheckpointError(
            f"{source}: the saved optimizer's parameter groups do not match this model",
            hint="resume with the same preset/model config as the saved run, or start a new --out")
    for i, (saved, now) in enumerate(zip(groups, current)):
        _check_group(saved, now, f"{source / STATE_JSON}: optimizer.param_groups[{i}]")
    params = {idx: p for g_sd, g in zip(current, optimizer.param_groups) for idx, p in zip(g_sd["params"], g["params"])}
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            idx, key = _state_tensor(name, value, params, source)
            state.setdefault(idx, {})[key] = value
    for idx, per_param in meta.get("scalars", {}).items():
        if not idx.isdigit() or int(idx) not in params:
            raise CheckpointError(f"{source / STATE_JSON}: optimizer.scalars has an entry for parameter {idx!r}, "
                                  "which this optimizer does not have", hint=STATE_HINT)
        state.setdefault(int(idx), {}).update(per_param)
    # torch reads the first parameter's keys as every parameter's (AdamW: its "step"), so one state
    # missing a key fails deep inside load_state_dict or step(): all must have the same keys.
    keys = {frozenset(per_param) for per_param in state.values()}
    if len(keys) > 1:
        raise CheckpointError(f"{source / STATE_TENSORS}: the parameters' optimizer states differ in their keys "
                              f"({' vs '.join(sorted(', '.join(sorted(k)) for k in keys)[:2])})", hint=STATE_HINT)
    groups = [dict(g) for g in groups]
    for g in groups:  # JSON turned the betas tuple into a list; AdamW only unpacks it, but keep the type
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _check_group(saved: dict[str, Any], now: dict[str, Any], where: str) -> None:
    # Keys only one side has are fine: torch fills settings a newer version added (__setstate__).
    for key in ("params", *(k for k in now if k in saved)):
        value = now[key]
        if _kind(saved.get(key)) != _kind(value) or (key == "params" and saved[key] != value):
            raise CheckpointError(f"{where}.{key}: saved {short_repr(saved.get(key))}, this optimizer has "
                                  f"{short_repr(value)}", hint=STATE_HINT)


def _kind(value: Any) -> Any:
    """A JSON-level type for comparing saved and current optimizer settings (tuples were saved as lists)."""
    if isinstance(value, bool) or value is None:
        return type(value)
    if isinstance(value, (int, float)):
        return float
    if isinstance(value, (list, tuple)):
        return (list, tuple(_kind(v) for v in value))
    return type(value)


_STATE_TENSOR = re.compile(r"optim\.(\d+)\.(\w+)")


def _state_tensor(name: str, value: torch.Tensor, params: dict[int, torch.Tensor], source: Path) -> tuple[int, str]:
    """(parameter id, state key) of a saved optimizer tensor, refused unless it fits that parameter."""
    m = _STATE_TENSOR.fullmatch(name)
    where = f"{source / STATE_TENSORS}: {name!r}"
    if m is None or int(m[1]) not in params:
        raise CheckpointError(f"{where} does not belong to this model's optimizer", hint=STATE_HINT)
    idx, key = int(m[1]), m[2]
    param = params[idx]
    ok = value.numel() == 1 if key == "step" else (value.shape == param.shape and value.dtype == param.dtype)
    if not ok:
        raise CheckpointError(f"{where}: {tuple(value.shape)} {value.dtype} does not fit its parameter "
                              f"{tuple(param.shape)} {param.dtype}", hint=STATE_HINT)
    return idx, key


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


STATE_HINT = "resume from an intact copy, or start over with --force"


def read_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Both files of a run's training state, every field ``pretrain`` uses checked (see :func:`check_meta`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    js, st = folder / STATE_JSON, folder / STATE_TENSORS
    if not js.is_file() or not st.is_file():
        raise CheckpointError(
            f"{folder}: no training state ({STATE_JSON} + {STATE_TENSORS}) to resume from",
            hint="--resume needs a folder written by `deploykit train`; to fine-tune a plain model "
                 "folder instead, start a new run with --force or another --out")
    meta = read_json_object(js, error=CheckpointError, what="training state", hint=STATE_HINT)
    if type(meta.get("version")) is not int or meta["version"] != STATE_VERSION:
        raise CheckpointError(f"{js}: training state version {short_repr(meta.get('version'))}, expected {STATE_VERSION}",
                              hint="resume with the deploykit version that wrote it, or start over with --force")
    try:
        tensors = load_file(str(st))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{folder}: training state is corrupt ({e})", hint=STATE_HINT) from e
    check_meta(meta, folder)
    torch_rng = tensors.get("rng.torch")
    if torch_rng is not None and (torch_rng.dtype != torch.uint8 or torch_rng.shape != torch.get_rng_state().shape):
        raise CheckpointError(f"{st}: rng.torch is {tuple(torch_rng.shape)} {torch_rng.dtype}, not torch's RNG state",
                              hint=STATE_HINT)
    return tensors, meta


def check_meta(meta: JsonObject, folder: Path) -> None:
    """Every field of ``trainer_state.json`` that resuming reads, with its type; the saved training
    config and schedule are rebuilt, so their own rules run here too, naming this file."""
    from .config import TrainConfig
    from .optim import LrSchedule

    for key in ("step", "tokens"):
        meta.field(key, int, check=non_negative)
    meta.field("schedule_steps", int, check=positive)
    meta.field("data_hash", str)
    meta.field("peak_flops", float, default=None, check=positive)
    train_doc = meta.object("train_config")
    train = train_doc.build(TrainConfig, out=folder, resume=False, force=False)
    # Numbers as checked (0 -> 0.0 for betas, which AdamW insists are floats), for the resumed run
    fields = train_doc.dataclass_fields(TrainConfig)
    meta["train_config"] = {**train_doc, **{k: v for k, v in fields.items() if k != "model"}}
    if "schedule" in meta:  # states written before re-fits existed hold only schedule_steps
        meta.object("schedule").build(LrSchedule, lr=train.lr, min_lr=train.min_lr)
    loader = meta.object("loader")
    for key in ("epoch", "position", "seed", "shuffle", "num_blocks", "batch_size"):
        loader.field(key, int, check=non_negative)
    optimizer = meta.object("optimizer")
    if optimizer.get("format") == "dcp":  # a torchrun run: model and optimizer shards in trainer_state.dcp/
        optimizer.field("world_size", int, check=positive)
        optimizer.field("strategy", str)
        if not (folder / STATE_DCP / ".metadata").is_file():
            raise CheckpointError(f"{folder / STATE_DCP}: missing or incomplete (no .metadata), but "
                                  f"{STATE_JSON} says the optimizer state is there", hint=STATE_HINT)
        meta.object("rng").field("python", ListOf((int, float, list, None), length=3), check=_python_rng_state)
        return
    for i, group in enumerate(optimizer.field("param_groups", ListOf(dict))):
        group = optimizer.nested(f"param_groups[{i}]", group)
        group.field("params", ListOf(int))
        group.field("names", ListOf(str), default=None)
    if "scalars" in optimizer:  # present means an object: null is not "no scalars"
        optimizer.mapping("scalars", dict)
    meta.object("rng").field("python", ListOf((int, float, list, None), length=3), check=_python_rng_state)


def _python_rng_state(value: list[Any]) -> str | None:
    """``random.getstate()`` as JSON: [3, 625 words (the last one the index, <= 624), gauss or None]."""
    version, internal, gauss = value
    ok = (version == 3 and isinstance(internal, list) and len(internal) == 625
          and all(type(w) is int and 0 <= w < 2**32 for w in internal) and internal[-1] <= 624
          and (gauss is None or type(gauss) is float))
    return None if ok else "is not Python's random state ([3, 625 words, gauss])"
