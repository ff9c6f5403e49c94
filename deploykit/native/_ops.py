"""torch.library custom ops (namespace ``deploykit``) so the kernels compose with
torch.compile / torch.export. Fake kernels give output shapes without running anything."""
from __future__ import annotations

import torch
from torch import Tensor

from deploykit.native import kernels as _n


@torch.library.custom_op("deploykit::int8_linear", mutates_args=())
def int8_linear_op(x: Tensor, packed: Tensor, scales: Tensor, colsum: Tensor,
                   bias: Tensor | None, out_features: int, in_features: int,
                   swiglu: bool) -> Tensor:
    p = _n.PackedInt8Weight(packed, scales, colsum, out_features, in_features, swiglu)
    return _n._linear_impl(x, p, bias, None, None)


@int8_linear_op.register_fake
def _(x, packed, scales, colsum, bias, out_features, in_features, swiglu):
    torch._check(x.shape[-1] == in_features)
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.custom_op("deploykit::moe_ffn", mutates_args=())
def moe_ffn_op(x: Tensor, router_logits: Tensor, w13: Tensor, s13: Tensor, c13: Tensor,
               w2: Tensor, s2: Tensor, c2: Tensor, d_model: int, d_ff: int, k: int,
               softmax: str) -> Tensor:
    e = _n.PackedMoEExperts(w13, s13, c13, w2, s2, c2, d_model, d_ff)
    return _n._moe_ffn_impl(x, router_logits, e, k, softmax, None, None)


@moe_ffn_op.register_fake
def _(x, router_logits, w13, s13, c13, w2, s2, c2, d_model, d_ff, k, softmax):
    torch._check(x.shape[-1] == d_model)
    return x.new_empty(x.shape)


@torch.library.custom_op("deploykit::moe_route", mutates_args=())
def moe_route_op(logits: Tensor, k: int, softmax: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(_n.moe_route(logits, k, softmax))  # type: ignore[return-value]


@moe_route_op.register_fake
def _(logits, k, softmax):
    T, E = logits.shape
    i32 = torch.int32
    return (logits.new_empty((T, k), dtype=i32), logits.new_empty((T, k)),
            logits.new_empty((E,), dtype=i32), logits.new_empty((E + 1,), dtype=i32),
            logits.new_empty((T * k,), dtype=i32), logits.new_empty((T * k,), dtype=i32))
