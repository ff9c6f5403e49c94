"""Run by tests/test_distributed.py under torchrun (not collected by pytest): one pipeline-parallel
forward/backward of a seeded micro-shaped model, each rank saving its stage's gradients and the loss."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(out: Path) -> None:
    from safetensors.torch import save_file

    from deploykit.model.config import preset
    from deploykit.model.graph import CausalLM
    from deploykit.train.pipeline import pipeline_step

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = CausalLM(preset("nano", tie_embeddings=False, vocab_size=256))  # the same weights on every rank
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (4, 16), generator=g)  # (B, T)
    y = torch.randint(0, 256, (4, 16), generator=g)  # (B, T)
    _, loss = pipeline_step(model, x, y, n_microbatches=2)
    grads = {name: p.grad.contiguous() for name, p in model.named_parameters() if p.grad is not None}
    if loss is not None:
        grads["__loss__"] = loss.detach().reshape(1)
    save_file(grads, str(out / f"rank{dist.get_rank()}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
