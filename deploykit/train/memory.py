"""What one training step of a config holds in memory, measured: parameters, gradients, AdamW state,
activations, and the peak of the whole step.

Parameters, gradients and optimizer state are summed from the tensors themselves after a real step.
Activations (what the forward keeps for the backward, and the backward's temporaries) are measured by
torch's ``MemTracker`` (``torch.distributed._tools.mem_tracker``), which tags every tensor a step
allocates with its role through a ``TorchDispatchMode`` and records the peak — on the CPU as well as
on CUDA, where no allocator statistic exists for the CPU. The step measured is the second one, so the
optimizer's moments exist (the first step creates them).

The seed's rule of thumb is "training takes 3-4x the model's size": fp32 weights + gradients + two
AdamW moments are exactly 4x the weights, before any activation; the report states that ratio and the
measured one, activations included, so a user sees which term dominates for their batch and context.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..model.config import ModelConfig
from ..model.graph import CausalLM
from .distributed import checkpoint_blocks
from .optim import build_adamw


@dataclass(frozen=True)
class MemoryReport:
    params: int  # bytes of the weights
    grads: int  # bytes of the gradients after a backward
    optimizer: int  # bytes of AdamW's state (two moments + step counters)
    activations: int  # bytes of activations + backward temporaries at the step's peak (MemTracker)
    peak: int  # bytes of everything the step held at its peak (MemTracker's total)
    batch_size: int
    block_size: int
    grad_checkpointing: bool
    dtype: str  # autocast dtype of the matmuls ("float32": none)

    @property
    def static_ratio(self) -> float:
        """(weights + grads + optimizer) / weights: the rule of thumb's 3-4x."""
        return (self.params + self.grads + self.optimizer) / self.params

    @property
    def peak_ratio(self) -> float:
        return self.peak / self.params

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "static_ratio": round(self.static_ratio, 3), "peak_ratio": round(self.peak_ratio, 3)}

    def lines(self) -> list[str]:
        mib = 1 << 20
        head = (f"memory of one training step (batch {self.batch_size} x {self.block_size} tokens, "
                f"{'gradient checkpointing, ' if self.grad_checkpointing else ''}{self.dtype} matmuls):")
        tail = (f"  weights+grads+optimizer = {self.static_ratio:.2f}x the weights (the '3-4x model size' rule); "
                f"with activations the peak is {self.peak_ratio:.2f}x")
        return [head,
                f"  parameters       {self.params / mib:10.2f} MiB",
                f"  gradients        {self.grads / mib:10.2f} MiB",
                f"  optimizer state  {self.optimizer / mib:10.2f} MiB  (AdamW: two fp32 moments)",
                f"  activations      {self.activations / mib:10.2f} MiB  (at the step's peak)",
                f"  peak of the step {self.peak / mib:10.2f} MiB",
                tail]


def _bytes(tensors) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t is None or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total


def measure_memory(model_cfg: ModelConfig, *, batch_size: int, block_size: int, grad_checkpointing: bool = False,
                   bf16: bool = False, seed: int = 0) -> MemoryReport:
    """Run two training steps of a fresh ``model_cfg`` model on random tokens and measure the second."""
    from torch.distributed._tools.mem_tracker import MemTracker

    torch.manual_seed(seed)
    model = CausalLM(model_cfg)
    model.train()
    if grad_checkpointing:
        checkpoint_blocks(model)
    optimizer = build_adamw(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95))
    x = torch.randint(0, model_cfg.vocab_size, (batch_size, block_size))  # (B, T)
    y = torch.randint(0, model_cfg.vocab_size, (batch_size, block_size))  # (B, T)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)  # (B, T, V)
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        optimizer.step()

    step()  # creates the AdamW moments; its gradients stay until the measured step's backward replaces them
    grads = _bytes(p.grad for p in model.parameters())
    optimizer.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    snap = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    kinds = {k.value if hasattr(k, "value") else k: v for k, v in snap.items()}
    return MemoryReport(
        params=_bytes(model.parameters()), grads=grads,
        optimizer=_bytes(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)),
        activations=kinds.get("Activation", 0) + kinds.get("Temp", 0), peak=kinds["Total"],
        batch_size=batch_size, block_size=block_size, grad_checkpointing=grad_checkpointing,
        dtype="bfloat16" if bf16 else "float32")


__all__ = ["MemoryReport", "measure_memory"]
