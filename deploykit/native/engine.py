"""The native decode engine: the whole decoder step in one C++ call (``deploykit.native._native.Engine``).

An :class:`Engine` is built from plain numbers (the model's shape) and a flat dict of tensors named
in the engine's own small vocabulary (below); it keeps pointers into those tensors, so nothing is
copied or re-packed, and the tensors must outlive it (the Engine holds references). Each
:class:`EngineSession` is one sequence with its own KV cache, preallocated for ``max_seq_len``
positions; a step runs with the GIL released, and sessions on several threads may share one Engine.

Tensor names (``L`` = layer index; a "pack" is ``{name}.packed/.scales/.colsum`` of a
``PackedInt8Weight``, with an optional ``{name}.bias``):

- ``embed`` (V, D); ``pos_embed`` (max_seq_len, D) for legacy; ``norm.w`` (+ ``norm.b`` for legacy);
  ``rope.inv_freq`` (head_dim/2,) unless legacy; ``lm_head`` pack, or ``lm_head.w`` (V, D) fp32.
- ``layers.L.ln1.w``, ``layers.L.ln2.w`` (+ ``.b`` for legacy LayerNorm); packs ``layers.L.q/k/v/o``.
  With ``weight_bits`` 4 the decoder's packs are int4 ones (``{name}.packed`` uint8 nibbles and
  ``{name}.scales`` per group of a ``PackedInt4Weight``, no colsum); the lm_head pack stays int8.
- dense: SwiGLU pack ``layers.L.gate_up`` and pack ``layers.L.down``; legacy: packs ``layers.L.up``,
  ``layers.L.down`` (GELU between); moe: ``layers.L.router.w`` (E, D) fp32 and
  ``layers.L.experts.{w13,s13,c13,w2,s2,c2}`` (a ``PackedMoEExperts``).
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from deploykit.native import _require

if TYPE_CHECKING:
    from torch import Tensor

CONFIG_KEYS = ("variant", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
               "max_seq_len", "norm_eps", "n_experts", "top_k", "lm_head_int8")
# weight_bits: 8 (int8 packs) or 4 (the decoder linears are int4 packs, deploykit.native.int4).
# kv_cache: each session's K/V storage, "fp32", "fp16" or "int8" (symmetric, one scale per position and kv head).
OPTIONAL_KEYS = {"weight_bits": 8, "kv_cache": "fp32"}


class Engine:
    """A model loaded into the C++ engine. ``threads``: the kernels' thread count; ``isa``: force a variant.

    ``tensors``: numpy arrays or CPU torch tensors (viewed as numpy without a copy); torch is never imported here.
    """

    def __init__(self, config: dict[str, Any], tensors: dict[str, np.ndarray | Tensor], *, threads: int = 1,
                 isa: str | None = None) -> None:
        C = _require()
        missing = [k for k in CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(f"native engine: config lacks {', '.join(missing)}")
        self.config = {k: config[k] for k in CONFIG_KEYS}
        for k, default in OPTIONAL_KEYS.items():
            self.config[k] = config.get(k, default)
        arrays = {name: t if isinstance(t, np.ndarray) else t.detach().numpy() for name, t in tensors.items()}  # zero-copy
        self._tensors = tensors  # the engine points into these
        self._c = C.Engine(self.config, arrays, int(threads), isa or "")
        self._spare: list[Any] = []  # sessions kept for forward(), reused
        self._lock = threading.Lock()

    @property
    def isa(self) -> str:
        return self._c.isa

    @property
    def threads(self) -> int:
        return self._c.nthreads

    @property
    def vocab_size(self) -> int:
        return self._c.vocab_size

    @property
    def kv_cache(self) -> str:
        return self._c.kv_cache

    @property
    def max_seq_len(self) -> int:
        return self._c.max_seq_len

    def new_session(self) -> EngineSession:
        return EngineSession(self)

    def forward(self, ids: np.ndarray) -> np.ndarray:
        """Logits (B, T, V) of a fresh sequence per row of ids (B, T) int64."""
        B, T = ids.shape
        out = np.empty((B, T, self.vocab_size), dtype=np.float32)
        with self._lock:
            s = self._spare.pop() if self._spare else _new_c_session(self)
        try:
            for b in range(B):
                s.reset()
                s.step(np.ascontiguousarray(ids[b], dtype=np.int64), out[b], True)
        finally:
            with self._lock:
                self._spare.append(s)
        return out


def _new_c_session(engine: Engine) -> Any:
    return _require().EngineSession(engine._c)


class EngineSession:
    """One sequence: ``feed(token_ids)`` appends tokens and returns the last position's logits (V,)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._s = _new_c_session(engine)

    @property
    def length(self) -> int:
        return self._s.length

    @property
    def capacity(self) -> int:
        return self._s.capacity

    def feed(self, token_ids: Any) -> np.ndarray:
        ids = np.ascontiguousarray(np.asarray(token_ids, dtype=np.int64).reshape(-1))
        out = np.empty((1, self.engine.vocab_size), dtype=np.float32)
        self._s.step(ids, out, False)
        return out[0]

    def prefill(self, token_ids: Any) -> np.ndarray:
        """Like feed, but the logits of every fed position: (T, V)."""
        ids = np.ascontiguousarray(np.asarray(token_ids, dtype=np.int64).reshape(-1))
        out = np.empty((ids.shape[0], self.engine.vocab_size), dtype=np.float32)
        self._s.step(ids, out, True)
        return out

    def reset(self) -> None:
        self._s.reset()

    def set_profiling(self, on: bool = True) -> None:
        """Measure where each step's time goes from now on (wall seconds per phase, from zero); off by default,
        when a step reads no clock."""
        self._s.set_profiling(on)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per phase (embed, norm, quantize, qkv_gemm, rotary, kv_store, attention, o_gemm, mlp,
        lm_head), summed over the steps and layers since ``set_profiling(True)``."""
        return dict(self._s.timings)
