"""Q4_0 and Q4_K blocks from deploykit's own 4-bit rounding (``deploykit.deploy.gptq``), so llama.cpp runs
them; and llama.cpp's importance-matrix quantization driven from deploykit's calibration set.

The file starts as llama.cpp's own quantization (written by ``llama_model_quantize``, its per-tensor type
mixture kept: the output matrix stays Q6_K/Q8_0, q4_k_m's Q6_K tensors stay llama.cpp's), and the data of
each decoder linear that llama.cpp stored in the scheme's 4-bit type is overwritten in place with
deploykit's blocks of the same type and size, so the header does not change and the comparison with plain
llama.cpp differs in the rounding of those weights only.

- Q4_0 (q4_0): deploykit's 4-bit grid *is* Q4_0's (scale ``d = fp16(max / -8)`` per 32 values, ``q + 8``
  in [0, 15]), written as ``struct block_q4_0 { ggml_half d; uint8_t qs[16]; }`` with
  ``qs[j] = (q[j] + 8) | (q[j + 16] + 8) << 4``. GPTQ sets each group's scale when it reaches the group.
- Q4_K (q4_k_m): the grid is llama.cpp's, fixed first (:mod:`.q4_k`), and GPTQ picks the codes on it.

MoE experts (``ffn_{gate,up,down}_exps``, stacked (E, rows, K)) are rounded expert by expert, each with
the Hessian of the calibration tokens the router sends to it (``gptq.collect_expert_hessians``); an
expert with fewer than ``gptq.MIN_EXPERT_TOKENS`` is rounded to nearest and listed in the manifest.

Q and K rows are permuted into llama.cpp's rotary layout after rounding (rows are rounded independently,
and both grids are per row, so permuting rounded rows equals rounding permuted rows); the legacy (gpt2)
``attn_qkv`` is q, k and v's rounded rows stacked.

``rounding=imatrix`` is llama.cpp's own answer: its quantizer with an importance matrix (mean x² of each
input column, per expert for MoE experts: what ``llama-imatrix`` collects), passed to
``llama_model_quantize`` through ``llama_model_quantize_params.imatrix`` (a NULL-terminated array of
``llama_model_imatrix_data`` in this llama.cpp), so every quantized tensor with a matmul input, the output
matrix included, goes through llama.cpp's importance-weighted quantizers. The importance comes from
deploykit's fp32 torch forward over the calibration set, where ``llama-imatrix`` (not shipped in the
llama-cpp-python wheel) would run llama.cpp's forward of the F32 file: the same activations up to float
rounding.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploykit.errors import BackendError, ConfigError

from .gguf_file import GPT2_QKV, layer_table, to_interleaved

if TYPE_CHECKING:  # torch comes with a conversion; serving a gguf artifact imports none
    import torch

    from deploykit.model.graph import CausalLM

ROUNDINGS = ("llama", "gptq", "gptq-imatrix", "rtn", "imatrix")
DEPLOYKIT_ROUNDINGS = ("gptq", "gptq-imatrix", "rtn")  # written by write_rounded
GRIDS = {"q4_0": "Q4_0", "q4_k_m": "Q4_K"}  # scheme -> the ggml type deploykit's gptq|rtn rounding writes


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
    """gguf tensor name -> (deploykit weights whose rounded rows it holds, rotary permutation kind).

    A weight is an nn.Linear's name, or a stacked expert parameter (``...block_sparse_moe.experts.w1``)."""
    out: dict[str, tuple[list[str], str]] = {}
    for i in range(cfg.n_layers):
        for g, d, kind in layer_table(cfg):
            if d.endswith("proj.weight"):
                out[f"blk.{i}.{g}"] = ([f"model.layers.{i}.{d[:-len('.weight')]}"], kind)
            elif ".experts.w" in d:
                out[f"blk.{i}.{g}"] = ([f"model.layers.{i}.{d}"], "")
        if cfg.variant == "legacy":
            out[f"blk.{i}.{GPT2_QKV[0]}"] = ([f"model.layers.{i}.self_attn.{n}_proj" for n in "qkv"], "")
    return out


def _is_expert(source: str) -> bool:
    return ".experts.w" in source


def _slices(model: CausalLM, source: str) -> list[torch.Tensor]:
    """The 2-D (rows, K) weights of a source: one per expert for stacked experts (E, rows, K)."""
    if _is_expert(source):
        return list(model.get_parameter(source).detach().float())
    return [model.get_submodule(source).weight.detach().float()]


def _round(w: torch.Tensor, grid: str, hessian: torch.Tensor | None, damp: float, weighted: bool) -> np.ndarray:
    """One (rows, K) weight as blocks of ``grid``: GPTQ given its Hessian, else round to nearest. ``weighted``:
    the grid (Q4_0's group scales, Q4_K's super-block scales and mins) is llama.cpp's importance-weighted
    choice with the importance diag(H) / 2 (mean x² per input column), else its plain one."""
    import torch

    from deploykit.deploy import gptq

    from . import q4_k

    importance = (torch.diagonal(hessian) / 2).float().numpy() if weighted and hessian is not None else None
    if grid == "Q4_0":
        if hessian is None:
            return q4_0_blocks(*gptq.rtn(w))
        scale_of = None
        if importance is not None:  # llama.cpp's weighted scale search on each group's corrected weights
            def scale_of(group: torch.Tensor, g: int) -> torch.Tensor:
                b = q4_k.llama_blocks(group.numpy(), "Q4_0", importance[g * 32:(g + 1) * 32])  # (N, 18)
                return torch.from_numpy(b[:, :2].copy().view(np.float16).astype(np.float32).reshape(-1))
        return q4_0_blocks(*gptq.gptq(w, hessian, damp=damp, scale_of=scale_of))
    base = q4_k.llama_q4_k(w.numpy(), importance)  # llama.cpp's blocks: their grid is kept, their codes replaced
    fixed = q4_k.grid_of(base)
    q = gptq.rtn_fixed(w, fixed) if hessian is None else gptq.gptq_fixed(w, hessian, fixed, damp=damp)
    return q4_k.with_codes(base, q)


def write_rounded(path: Path, model: CausalLM, rounding: str, scheme: str, calibration: list[list[int]],
                  damp: float = 0.01) -> dict[str, Any]:
    """Overwrite, in the GGUF at ``path`` (llama.cpp's ``scheme``), every decoder linear and expert tensor llama.cpp
    stored in the scheme's 4-bit type with deploykit's ``rounding`` ("gptq" from ``calibration``, or "rtn") of the
    same weights. Returns facts for the manifest."""
    import gguf

    from deploykit.deploy import gptq

    cfg, grid = model.config, GRIDS[scheme]
    reader = gguf.GGUFReader(str(path), "r+")
    by_name = {t.name: t for t in reader.tensors}
    targets = {n: v for n, v in _targets(cfg).items()
               if n in by_name and by_name[n].tensor_type == gguf.GGMLQuantizationType[grid]}
    sources = sorted({m for mods, _ in targets.values() for m in mods})
    linears = [s for s in sources if not _is_expert(s)]
    by_gptq = rounding.startswith("gptq")
    hessians = gptq.collect_hessians(model, linears, calibration) if by_gptq and linears else {}
    experts = gptq.collect_expert_hessians(model, calibration) if by_gptq and any(map(_is_expert, sources)) else {}
    heads = {"q": cfg.n_heads, "k": cfg.n_kv_heads}
    fallback: list[dict[str, Any]] = []
    n_gptq = 0  # expert matrices GPTQ rounded
    for name, (mods, kind) in targets.items():
        parts = []
        for m in mods:
            for e, w in enumerate(_slices(model, m)):
                h = hessians.get(m)
                if _is_expert(m) and by_gptq:
                    stats = experts[m.rsplit(".experts.", 1)[0]]
                    h = stats.hessian(m.rsplit(".", 1)[1], e)
                    if stats.tokens[e] < gptq.MIN_EXPERT_TOKENS:
                        h = None
                        fallback.append({"tensor": name, "expert": e, "tokens": stats.tokens[e],
                                         "reason": f"{stats.tokens[e]} routed calibration tokens < "
                                                   f"{gptq.MIN_EXPERT_TOKENS}: rounded to nearest"})
                    n_gptq += h is not None
                parts.append(_round(w, grid, h, damp, weighted=rounding == "gptq-imatrix"))
        blocks = np.concatenate(parts)  # (rows, bytes per row), experts stacked in order
        if kind:
            blocks = to_interleaved(blocks, heads[kind])
        data = by_name[name].data
        if data.size != blocks.size:
            raise BackendError(f"gguf: {name} holds {data.size} {grid} bytes, deploykit's blocks are {blocks.size}",
                               hint="this is a bug in the gguf backend; report it")
        data.reshape(-1)[:] = blocks.reshape(-1)
    reader.data.flush()
    del reader
    facts: dict[str, Any] = {"rounding": rounding, "rounded_tensors": len(targets), "rounded_grid": grid}
    if by_gptq:
        facts["calibration_tokens"] = sum(len(s) for s in calibration)
        if experts:
            facts["experts"] = {"gptq": n_gptq, "rtn_fallback": fallback,
                                "min_tokens": gptq.MIN_EXPERT_TOKENS,
                                "routed_tokens": {k: list(v.tokens) for k, v in experts.items()}}
    return facts


def importance(model: CausalLM, calibration: list[list[int]]) -> dict[str, np.ndarray]:
    """llama-imatrix's importance for each gguf tensor with a matmul input: mean x² of every input column over
    the calibration tokens (float32, (K,)); for stacked experts, expert after expert ((E * K,)), from the tokens
    the router sent to each. An expert that got no token gets ones (no preference), as llama-imatrix stores."""
    import torch

    from deploykit.deploy import gptq

    cfg = model.config
    targets = _targets(cfg)
    if not cfg.tie_embeddings:
        targets["output.weight"] = (["lm_head"], "")
    linears = sorted({m[0] for m, _ in targets.values() if not _is_expert(m[0])})
    hessians = gptq.collect_hessians(model, linears, calibration)
    experts = gptq.collect_expert_hessians(model, calibration) if cfg.is_moe else {}
    out = {}
    for name, (mods, _) in targets.items():
        m = mods[0]  # attn_qkv's q, k and v read one input
        if not _is_expert(m):
            out[name] = (torch.diagonal(hessians[m]) / 2).float().numpy()
            continue
        stats = experts[m.rsplit(".experts.", 1)[0]]
        param = m.rsplit(".", 1)[1]
        per = [(torch.diagonal(stats.hessian(param, e)) / 2).float() if stats.tokens[e]
               else torch.ones(stats.hessian(param, e).shape[0]) for e in range(len(stats.tokens))]
        out[name] = torch.cat(per).numpy()
    return out
