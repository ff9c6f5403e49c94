"""A native artifact read straight into the C++ engine's arrays: numpy and safetensors, no torch.

``engine_inputs(folder)`` gives the engine's config and its flat dict of arrays (the vocabulary of
``deploykit.native.engine``) from ``config.json``, ``native_layout.json`` and ``native.safetensors``.
It checks what the engine cannot: the layout's format and module kinds against the model the config
describes, every packed tensor's layout version, and that no tensor is left over. The engine then
checks every array's dtype and size against the config, naming the tensor.

``modules.engine_tensors`` builds the same dict from the torch reference graph; the engine tests hold
the two paths to the same logits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deploykit.deploy.artifact import load_arrays, read_layout
from deploykit.errors import ArtifactError
from deploykit.model.checkpoint import check_config_fits, load_config
from deploykit.model.config import ModelConfig
from deploykit.model.schema import JsonObject, one_of, short_repr

from . import LAYOUT_FILE, LAYOUT_FORMAT, WEIGHTS

KINDS = ("linear", "swiglu", "moe", "linear4", "swiglu4")
PACK_VERSION = 1  # PackedInt8Weight / PackedMoEExperts meta
INT4_VERSION, INT4_GROUP = 1, 32  # PackedInt4Weight meta (deploykit.native.int4.LAYOUT_VERSION, GROUP)
# The graph module each kind replaces, as messages name it.
_MODULE_OF = {"linear": "Linear", "linear4": "Linear", "swiglu": "SwiGLU", "swiglu4": "SwiGLU", "moe": "MoE"}
_EXPERT_BUFFERS = ("w13", "s13", "c13", "w2", "s2", "c2")


def expected_modules(cfg: ModelConfig, *, bits: int, lm_head: bool) -> dict[str, str]:
    """What a conversion of ``cfg`` packs: module name -> kind (``modules.plan`` on the torch graph)."""
    four = "4" if bits == 4 else ""
    out: dict[str, str] = {}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        out.update({f"{p}self_attn.{n}_proj": "linear" + four for n in "qkvo"})
        if cfg.variant == "dense":
            out[p + "mlp"] = "swiglu" + four
        elif cfg.variant == "legacy":
            out.update({p + "mlp.up_proj": "linear" + four, p + "mlp.down_proj": "linear" + four})
        else:
            out[p + "block_sparse_moe"] = "moe"
    if lm_head:
        out["lm_head"] = "linear"
    return out


class _Reader:
    """Takes arrays out of the artifact's dict by name, so whatever is left at the end is refused."""

    def __init__(self, folder: Path, arrays: dict[str, np.ndarray]) -> None:
        self.folder, self.arrays, self.used = folder, arrays, set()

    def take(self, name: str, *, optional: bool = False) -> np.ndarray | None:
        if name not in self.arrays:
            if optional:
                return None
            raise ArtifactError(f"{self.folder}: {WEIGHTS} lacks {name}", hint="convert again")
        self.used.add(name)
        return self.arrays[name]

    def meta(self, prefix: str, size: int, version: list[int]) -> list[int]:
        """``{prefix}.meta`` as ints, refused unless it has ``size`` entries ending in ``version``."""
        meta = [int(v) for v in np.asarray(self.take(f"{prefix}.meta")).reshape(-1)]
        if len(meta) != size or meta[size - len(version):] != version:
            raise ArtifactError(f"{self.folder}: {WEIGHTS}: {prefix}.meta: packed layout {meta} is not version "
                                f"{version} of this deploykit", hint="convert again with this version of deploykit")
        return meta

    def pack(self, prefix: str, kind: str, engine_name: str) -> dict[str, np.ndarray]:
        """A packed linear (int8: packed, scales, colsum; int4: packed, scales) under the engine's name."""
        from deploykit.native import _require

        int4 = kind.endswith("4")
        meta = self.meta(prefix, 5, [INT4_VERSION, INT4_GROUP]) if int4 else self.meta(prefix, 4, [PACK_VERSION])
        n, k, sw = meta[:3]
        parts = ("packed", "scales") if int4 else ("packed", "scales", "colsum")
        out = {f"{engine_name}.{part}": self.take(f"{prefix}.{part}") for part in parts}
        # The sizes the meta implies (the kernels' panel layout), checked here to name the artifact's tensor.
        rows = 2 * n if sw else n
        sizes = _require().int4_packed_sizes(rows, k, bool(sw)) if int4 else _require().packed_sizes(rows, k, bool(sw))
        want = dict(zip(parts, (sizes[0], sizes[1], sizes[1])))
        got = {part: int(out[f"{engine_name}.{part}"].size) for part in parts}
        if got != want:
            what = "int4 packed tensors" if int4 else "packed tensors"
            raise ArtifactError(f"{self.folder}: {WEIGHTS}: {prefix}: {what} do not match out={n}, in={k}, "
                                f"swiglu={bool(sw)} (sizes {got}, expected {want})",
                                hint="convert again with this version of deploykit")
        bias = self.take(f"{prefix}.bias", optional=True)
        if bias is not None:
            out[f"{engine_name}.bias"] = bias
        return out

    def leftover(self) -> list[str]:
        return sorted(set(self.arrays) - self.used)


def _check_layout(layout: JsonObject, cfg: ModelConfig, modules: dict[str, str]) -> tuple[int, bool]:
    """(weight bits, lm_head int8) of a layout whose modules are exactly what ``cfg``'s conversion packs."""
    bits = 4 if any(k.endswith("4") for k in modules.values()) else 8
    want = expected_modules(cfg, bits=bits, lm_head="lm_head" in modules)
    hint = "the layout does not belong to this config.json; convert again"
    for name, kind in modules.items():
        if name not in want:
            layout.fail("modules", f"names module {short_repr(name)}, which this model does not have", hint=hint)
        if kind != want[name]:
            layout.fail("modules", f"packs {name!r} as {kind!r}, but it is a {_MODULE_OF[want[name]]} "
                        f"(packed as {want[name]!r})", hint=hint)
    missing = [n for n in want if n not in modules]
    if missing:
        layout.fail("modules", f"does not pack {', '.join(missing[:3])}", hint=hint)
    return bits, "lm_head" in modules


def engine_inputs(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray], JsonObject]:
    """(engine config, engine arrays, layout) of a native artifact folder (zero-copy where safetensors allows)."""
    layout = read_layout(folder, LAYOUT_FILE, LAYOUT_FORMAT)
    modules: dict[str, str] = layout.mapping("modules", str, check=one_of(*KINDS))
    layout.field("scheme", str, default=None)
    layout.field("quantize_lm_head", bool, default=None)
    cfg = load_config(folder)
    arrays = load_arrays(folder, WEIGHTS)
    check_config_fits(cfg, arrays, Path(folder))
    bits, lm_int8 = _check_layout(layout, cfg, modules)
    r = _Reader(Path(folder), arrays)
    legacy = cfg.variant == "legacy"
    t: dict[str, np.ndarray] = {"embed": r.take("model.embed_tokens.weight"), "norm.w": r.take("model.norm.weight")}
    if legacy:
        t["pos_embed"], t["norm.b"] = r.take("model.embed_positions.weight"), r.take("model.norm.bias")
    else:  # deploykit.model.graph.rope_inv_freq, in float32 as torch computes it
        exponent = np.arange(0, cfg.head_dim, 2, dtype=np.float32) / np.float32(cfg.head_dim)
        t["rope.inv_freq"] = (np.float32(1.0) / np.power(np.float32(cfg.rope_theta), exponent)).astype(np.float32)
    if lm_int8:
        t.update(r.pack("lm_head", "linear", "lm_head"))
    else:  # a tied head is the embedding, stored once
        t["lm_head.w"] = r.take("model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight")
    for i in range(cfg.n_layers):
        p, e = f"model.layers.{i}.", f"layers.{i}."
        t[e + "ln1.w"], t[e + "ln2.w"] = r.take(p + "input_layernorm.weight"), r.take(p + "post_attention_layernorm.weight")
        if legacy:
            t[e + "ln1.b"], t[e + "ln2.b"] = r.take(p + "input_layernorm.bias"), r.take(p + "post_attention_layernorm.bias")
        for n in "qkvo":
            t.update(r.pack(f"{p}self_attn.{n}_proj", modules[f"{p}self_attn.{n}_proj"], e + n))
        if cfg.variant == "dense":
            kind = modules[p + "mlp"]
            t.update(r.pack(p + "mlp.gate_up", kind, e + "gate_up"))
            t.update(r.pack(p + "mlp.down", kind, e + "down"))
        elif legacy:
            t.update(r.pack(p + "mlp.up_proj", modules[p + "mlp.up_proj"], e + "up"))
            t.update(r.pack(p + "mlp.down_proj", modules[p + "mlp.down_proj"], e + "down"))
        else:
            q = p + "block_sparse_moe."
            t[e + "router.w"] = r.take(q + "gate.weight")
            r.meta(q + "experts", 3, [PACK_VERSION])
            t.update({f"{e}experts.{b}": r.take(f"{q}experts.{b}") for b in _EXPERT_BUFFERS})
    left = r.leftover()
    if left:
        raise ArtifactError(f"{folder}: the weights do not match the layout: unexpected {left[:3]}", hint="convert again")
    config = {"variant": cfg.variant, "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
              "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "ffn_dim": cfg.ffn_dim,
              "max_seq_len": cfg.max_seq_len, "norm_eps": cfg.norm_eps, "n_experts": cfg.n_experts,
              "top_k": cfg.top_k, "lm_head_int8": lm_int8, "weight_bits": bits}
    return config, {k: np.ascontiguousarray(v) for k, v in t.items()}, layout
