"""Pipeline parallelism: a CausalLM's blocks split across ranks with ``torch.distributed.pipelining``.

The seed moves layers to devices by hand (``block.to("cuda:1")`` inside one process's forward),
which runs the stages one after another and leaves every device idle most of the time. Here each
rank builds only its stage (``stage_module``), torch's ``PipelineStage`` sends activations to the
next rank and gradients back, and a GPipe schedule splits the batch into micro-batches so stages
work on different micro-batches at once. The loss and gradients equal one process's for the same
batch (tests/test_distributed.py checks it on 2 gloo ranks).

Not wired into ``deploykit train`` yet: its checkpoints and evals assume every rank can run the
whole model (DDP) or gather it (FSDP). A tied embedding would live on the first and the last stage
at once and need its gradients summed across them, so tied configs are refused.
"""
from __future__ import annotations

from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..model.graph import CausalLM, rotary_cos_sin


class Stage(nn.Module):
    """Blocks ``[start, stop)`` of a CausalLM, with the embedding on the first stage and the final norm
    and LM head on the last. Holds the model's own modules (no copies): parameter names stay theirs."""

    def __init__(self, model: CausalLM, start: int, stop: int) -> None:
        super().__init__()
        cfg = model.config
        self.first, self.last, self.legacy = start == 0, stop == cfg.n_layers, cfg.variant == "legacy"
        if self.first:
            self.embed_tokens = model.model.embed_tokens
            if self.legacy:
                self.embed_positions = model.model.embed_positions
        self.layers = nn.ModuleList(model.model.layers[start:stop])
        if self.last:
            self.norm, self.lm_head = model.model.norm, model.lm_head
        if not self.legacy:
            self.register_buffer("inv_freq", model.inv_freq.clone(), persistent=False)  # (hd/2,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids on the first stage, (B, T, D) activations after it -> (B, T, D), or (B, T, V) on the last."""
        T = x.shape[1]
        positions = torch.arange(T, device=x.device)  # (T,)
        if self.first:
            x = self.embed_tokens(x)  # (B, T, D)
            if self.legacy:
                x = x + self.embed_positions(positions)
        rotary = None if self.legacy else rotary_cos_sin(positions, self.inv_freq)
        mask = positions[None, :] <= positions[:, None]  # (T, T) causal, as CausalLM.forward builds it
        for block in self.layers:
            x = block(x, rotary, mask, None)
        return self.lm_head(self.norm(x)) if self.last else x


def stage_bounds(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous, balanced block ranges: 4 layers on 2 stages -> [(0, 2), (2, 4)]."""
    if not 1 <= n_stages <= n_layers:
        raise ConfigError(f"{n_stages} pipeline stages for {n_layers} blocks",
                          hint="use at most one stage per block (and at least one)")
    edges = [round(i * n_layers / n_stages) for i in range(n_stages + 1)]
    return list(pairwise(edges))


def stage_module(model: CausalLM, stage: int, n_stages: int) -> Stage:
    if model.config.tie_embeddings and n_stages > 1:
        raise ConfigError("a tied embedding/LM head cannot be split across pipeline stages",
                          hint="use a config with tie_embeddings=False (the micro and small presets)")
    start, stop = stage_bounds(model.config.n_layers, n_stages)[stage]
    return Stage(model, start, stop)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of one micro-batch: (b, T, V), (b, T) -> ()."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def pipeline_step(model: CausalLM, x: torch.Tensor, y: torch.Tensor, *, n_microbatches: int,
                  device: torch.device | None = None) -> tuple[Stage, torch.Tensor | None]:
    """One forward/backward of the global batch (B, T) through a GPipe schedule over all ranks of the
    default process group (rank r runs stage r). Every rank passes the same ``model``, ``x`` and ``y``.
    Returns this rank's stage (its parameters hold the gradients) and, on the last stage, the batch's
    mean loss (the mean of the micro-batches' means; None elsewhere)."""
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    rank, world = dist.get_rank(), dist.get_world_size()
    device = device or torch.device("cpu")
    module = stage_module(model, rank, world).to(device)
    stage = PipelineStage(module, rank, world, device)
    # The schedule divides the gradients by the number of micro-batches (scale_grads), so they are the
    # gradients of the mean loss: what one process computes on the whole batch.
    schedule = ScheduleGPipe(stage, n_microbatches, loss_fn=lm_loss)
    losses: list[torch.Tensor] = []
    if module.first:
        schedule.step(x.to(device))
    elif module.last:
        schedule.step(target=y.to(device), losses=losses)
    else:
        schedule.step()
    return module, torch.stack(losses).mean() if module.last else None


__all__ = ["Stage", "lm_loss", "pipeline_step", "stage_bounds", "stage_module"]
