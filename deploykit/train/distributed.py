"""Training on ``torch.distributed``: one process per worker, launched by ``torchrun``.

``torchrun --nproc_per_node N -m deploykit train ...`` starts N copies of the command; each reads its
rank from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins the
process group here, with ``nccl`` when CUDA is there and ``gloo`` otherwise. Nothing below is a
home-made substitute for torch's own machinery:

- ``ddp``: ``DistributedDataParallel`` — every rank holds the whole model, gradients are averaged;
- ``fsdp``: FSDP2 ``fully_shard`` on every block and on the root, so parameters, gradients and AdamW
  moments are sharded across ranks (a model too large for one worker's memory still trains);
- data: every rank draws the same *global* batch from the same seeded ``BlockLoader`` and takes its
  own rows of it (``shard_rows``), so ranks see distinct data, the run's math does not depend on the
  world size, and the loader's state (epoch, position) is the same on every rank — which is what
  lets a run resume with another world size;
- checkpoints: ``torch.distributed.checkpoint`` (DCP) writes the model and optimizer shards of every
  rank into ``trainer_state.dcp/`` inside the atomically replaced run folder; loading reshards to the
  current world size (or to a single process, without a process group). Rank 0 also writes the full
  model in the usual Hugging Face layout, so the folder stays a loadable checkpoint. With several
  nodes, ``--out`` must be on a file system all of them share.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .config import STATE_DCP as DCP_FOLDER  # DCP shards + their .metadata, beside trainer_state.json
from .config import STRATEGIES


def launched_by_torchrun() -> bool:
    """True in a worker started by torchrun (or any launcher that sets the same environment)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


@dataclass(frozen=True)
class Parallel:
    """Where this process stands: rank, world size, strategy, device. ``strategy=None``: one plain
    process (no process group), the trainer's original path."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str | None = None
    backend: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this call created the process group (and destroys it at the end)

    @property
    def distributed(self) -> bool:
        return self.strategy is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- collectives (no-ops in one plain process) ------------------------------------------------
    def sum_(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a few floats (one all-reduce)."""
        if not self.distributed:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)  # (n,)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one: how a signal on one rank stops them all."""
        if not self.distributed:
            return flag
        import torch.distributed as dist

        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def shard_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (B, ...) -> (B / world, ...), moved to the device."""
        if self.distributed:
            t = t.tensor_split(self.world_size)[self.rank]
        return t.to(self.device, non_blocking=True)


def start(strategy: str, batch_size: int) -> Parallel:
    """Join torchrun's process group (if launched by it) and say where this process stands."""
    if not launched_by_torchrun():
        return Parallel()
    import torch.distributed as dist

    if strategy not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy!r} is not one of {', '.join(STRATEGIES)}",
                          hint="use --strategy ddp (replicated model) or --strategy fsdp (sharded model)")
    world = int(os.environ["WORLD_SIZE"])
    if batch_size % world:  # before joining: a refusal must not leave the other ranks waiting
        raise ConfigError(f"--batch-size {batch_size} is not divisible by the world size {world}",
                          hint=f"--batch-size is the global batch, split evenly across ranks: pass a multiple of {world}")
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, device_id=device if cuda else None)
    par = Parallel(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                   strategy=strategy, backend=backend, device=device, owns_group=owns)
    return par


def finish(par: Parallel) -> None:
    if par.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# the model: gradient checkpointing, DDP or FSDP2
# ---------------------------------------------------------------------------------------------
def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them.

    The block's ``forward`` is replaced on the instance (not wrapped in another module), so parameter
    names, state dicts and hooks (FSDP's) stay as they were. Non-reentrant checkpointing
    (``use_reentrant=False``) is the variant torch recommends: it supports keyword arguments,
    inputs without gradients and nested autograd, and its gradients equal the plain ones exactly.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.model.layers:
        if getattr(block, "_deploykit_checkpointed", False):
            continue
        plain = block.forward

        @functools.wraps(plain)
        def forward(x, rotary, mask, cache, _plain=plain):
            if cache is not None or not torch.is_grad_enabled():  # decoding and evals keep nothing anyway
                return _plain(x, rotary, mask, cache)
            return checkpoint(_plain, x, rotary, mask, cache, use_reentrant=False)

        block.forward = forward
        block._deploykit_checkpointed = True


def wrap(model: nn.Module, par: Parallel) -> nn.Module:
    """The module the training loop calls: the model itself, DDP around it, or the model fully sharded."""
    model.to(par.device)
    if par.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # forward_sync_buffers=False: the only buffer (rotary frequencies) is computed, identical on every rank,
        # and broadcasting it would add a collective to every forward, evals included.
        return DDP(model, device_ids=[par.local_rank] if par.device.type == "cuda" else None, forward_sync_buffers=False)
    if par.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per block (gathered just before it runs, freed after), then the root: the
        # embedding and the (possibly tied) LM head stay together in the root's unit.
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    return model


def core(model: nn.Module) -> nn.Module:
    """The CausalLM inside a wrapped model (FSDP2 keeps the module itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def sync_gradients(model: nn.Module, par: Parallel, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step (same result, less traffic)."""
    from contextlib import nullcontext

    if par.strategy == "ddp" and not last:
        return model.no_sync()
    if par.strategy == "fsdp":
        model.set_requires_gradient_sync(last)
    return nullcontext()


def grad_norm_value(norm: torch.Tensor) -> float:
    """``clip_grad_norm_``'s result as a float (a DTensor under FSDP2)."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


# ---------------------------------------------------------------------------------------------
# distributed checkpoints
# ---------------------------------------------------------------------------------------------
def save_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and optimizer into ``folder/trainer_state.dcp`` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder / DCP_FOLDER))


def load_sharded(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load ``folder/trainer_state.dcp`` into this world's model and optimizer, resharded as they are now:
    another world size, another strategy, or one process without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder / DCP_FOLDER))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name (not id), as ``load_full_optimizer_state`` reads it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put an unsharded optimizer state (from a single-process run) into a wrapped model's optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def full_model_state(model: nn.Module, par: Parallel) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0, on the CPU (empty on other ranks); collective under FSDP."""
    if par.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not par.is_main:
        return {}
    return {k: v.detach().cpu() for k, v in core(model).state_dict().items()}


__all__ = ["DCP_FOLDER", "STRATEGIES", "Parallel", "checkpoint_blocks", "core", "finish", "full_model_state",
           "full_optimizer_state", "grad_norm_value", "launched_by_torchrun", "load_full_optimizer_state", "load_sharded",
           "save_sharded", "start", "sync_gradients", "wrap"]
