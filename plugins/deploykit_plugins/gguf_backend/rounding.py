"""Q4_0 blocks from deploykit's own 4-bit rounding (``deploykit.deploy.gptq``), so llama.cpp runs them.

deploykit's 4-bit grid *is* Q4_0's (scale ``d = fp16(max / -8)`` per 32 values, ``q + 8`` in [0, 15]), so a
rounded weight is written block for block: ``struct block_q4_0 { ggml_half d; uint8_t qs[16]; }`` with
``qs[j] = (q[j] + 8) | (q[j + 16] + 8) << 4``. The file starts as llama.cpp's own Q4_0 (written by
``llama_model_quantize``, its per-tensor type mixture kept: the output matrix stays Q6_K/Q8_0, the
embeddings whatever llama.cpp chose), and the data of each decoder linear that llama.cpp stored as Q4_0 is
overwritten in place with deploykit's blocks: the same type and size, so the header does not change, and
the comparison with plain Q4_0 differs in the rounding of those weights only.

Q and K rows are permuted into llama.cpp's rotary layout after rounding (rows are rounded independently,
so permuting rounded rows equals rounding permuted rows); the legacy (gpt2) ``attn_qkv`` is q, k and v's
rounded rows stacked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from deploykit.errors import BackendError, ConfigError
from deploykit.model.graph import CausalLM

from .gguf_file import GPT2_QKV, layer_table, to_interleaved

ROUNDINGS = ("llama", "gptq", "rtn")


def q4_0_blocks(q: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """q (N, K) int8 in [-8, 7], scales (N, K/32) -> (N, K/32 * 18) uint8 in ggml's block_q4_0 layout."""
    N, K = q.shape
    if K % 32:
        raise ConfigError(f"Q4_0 rows must be a multiple of 32 values, got {K}")
    u = (q.numpy().astype(np.int16) + 8).astype(np.uint8).reshape(N, K // 32, 32)  # (N, G, 32)
    qs = u[..., :16] | (u[..., 16:] << 4)  # (N, G, 16)
    d = scales.numpy().astype("<f2").reshape(N, K // 32, 1).view(np.uint8)  # (N, G, 2) little-endian fp16
    return np.concatenate([d, qs], axis=-1).reshape(N, -1)


def _targets(cfg: Any) -> dict[str, tuple[list[str], str]]:
    """gguf tensor name -> (deploykit linears whose rounded rows it holds, rotary permutation kind)."""
    out: dict[str, tuple[list[str], str]] = {}
    for i in range(cfg.n_layers):
        for g, d, kind in layer_table(cfg):
            if d.endswith("proj.weight") and "block_sparse_moe" not in d:
                out[f"blk.{i}.{g}"] = ([f"model.layers.{i}.{d[:-len('.weight')]}"], kind)
        if cfg.variant == "legacy":
            out[f"blk.{i}.{GPT2_QKV[0]}"] = ([f"model.layers.{i}.self_attn.{n}_proj" for n in "qkv"], "")
    return out


def write_rounded_q4_0(path: Path, model: CausalLM, rounding: str, calibration: list[list[int]],
                       damp: float = 0.01) -> dict[str, Any]:
    """Overwrite, in the Q4_0 GGUF at ``path``, every decoder linear llama.cpp stored as Q4_0 with deploykit's
    ``rounding`` ("gptq" from ``calibration``, or "rtn") of the same weights. Returns facts for the manifest."""
    import gguf

    from deploykit.deploy import gptq

    cfg = model.config
    if cfg.is_moe:
        raise ConfigError("gguf rounding=gptq|rtn covers dense and legacy models: MoE experts are stacked 3-D "
                          "tensors with one Hessian per expert, which deploykit's GPTQ does not collect",
                          hint="use rounding=llama (llama.cpp's own Q4_0) for MoE models")
    reader = gguf.GGUFReader(str(path), "r+")
    by_name = {t.name: t for t in reader.tensors}
    targets = {n: v for n, v in _targets(cfg).items()
               if n in by_name and by_name[n].tensor_type == gguf.GGMLQuantizationType.Q4_0}
    linears = sorted({m for mods, _ in targets.values() for m in mods})
    hessians = gptq.collect_hessians(model, linears, calibration) if rounding == "gptq" else {}
    heads = {"q": cfg.n_heads, "k": cfg.n_kv_heads}
    for name, (mods, kind) in targets.items():
        parts = []
        for m in mods:
            w = model.get_submodule(m).weight.detach().float()
            q, s = gptq.gptq(w, hessians[m], damp=damp) if rounding == "gptq" else gptq.rtn(w)
            parts.append(q4_0_blocks(q, s))
        blocks = np.concatenate(parts)  # (rows, bytes per row)
        if kind:
            blocks = to_interleaved(blocks, heads[kind])
        data = by_name[name].data
        if data.size != blocks.size:
            raise BackendError(f"gguf: {name} holds {data.size} Q4_0 bytes, deploykit's blocks are {blocks.size}",
                               hint="this is a bug in the gguf backend; report it")
        data.reshape(-1)[:] = blocks.reshape(-1)
    reader.data.flush()
    del reader
    facts: dict[str, Any] = {"rounding": rounding, "rounded_tensors": len(targets), "rounded_grid": "Q4_0"}
    if rounding == "gptq":
        facts["calibration_tokens"] = sum(len(s) for s in calibration)
    return facts
