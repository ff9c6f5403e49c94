"""MoE routing, gather/scatter and the int8 MoE-FFN against naive references: ties (lowest
expert index wins), k=1, k=E, experts with no tokens, T=1, T=0."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch
from native_helpers import isa_params, requires_native

from deploykit import native

pytestmark = requires_native


def naive_route(logits: torch.Tensor, k: int, softmax: str):
    """Per-token loop: sort experts by (-logit, index) -> ties go to the lower index."""
    T, E = logits.shape
    ids = torch.zeros(T, k, dtype=torch.int32)
    w = torch.zeros(T, k)
    for t in range(T):
        order = sorted(range(E), key=lambda e: (-float(logits[t, e]), e))[:k]
        ids[t] = torch.tensor(order, dtype=torch.int32)
        probs = torch.softmax(logits[t].double(), 0)
        sel = probs[order]
        w[t] = (sel if softmax == "all" else sel / sel.sum()).float()
    counts = torch.bincount(ids.flatten().long(), minlength=E).int()
    perm = sorted(range(T * k), key=lambda i: (int(ids.flatten()[i]), i))  # stable by expert
    return ids, w, counts, torch.tensor(perm, dtype=torch.int32)


CASES = [  # (T, E, k); T % 16 != 0 and E = 8 vs other E: the 16-token blocks, their masked tail,
    # the transposed-load (E = 8) and gathered (other E) paths of the AVX-512 routing
    (1, 8, 2), (16, 8, 2), (33, 8, 1), (7, 4, 4), (5, 1, 1), (64, 16, 3), (0, 8, 2),
    (37, 8, 2), (300, 6, 2), (19, 2, 2), (50, 5, 1), (77, 16, 2), (1030, 8, 2),
]


@pytest.mark.parametrize("T,E,k", CASES)
@pytest.mark.parametrize("softmax", ["topk", "all"])
def test_route_matches_naive(T, E, k, softmax):
    torch.manual_seed(T * 31 + E + k)
    logits = torch.randn(T, E)
    r = native.moe_route(logits, k, softmax)
    ids, w, counts, perm = naive_route(logits, k, softmax)
    # Integers, exact: the choice compares logits (order-free, ties to the lower index); only the
    # weights come from a softmax, whose sum the kernel and torch order differently.
    assert torch.equal(r.ids, ids)
    torch.testing.assert_close(r.weights, w, rtol=2e-6, atol=2e-7)
    assert torch.equal(r.counts, counts)
    assert r.offsets.tolist() == [0, *torch.cumsum(counts, 0).tolist()]
    assert torch.equal(r.perm, perm)
    assert torch.equal(r.inv[r.perm.long()], torch.arange(T * k, dtype=torch.int32))


def test_route_same_on_every_variant():
    """The routing the scalar variant picks (DEPLOYKIT_NATIVE_ISA=scalar, in a fresh process: the
    choice is made once per process) equals this process's: ids/perm/inv exactly, weights to 2 ulp
    of the vector exp; ties, -inf and a 16-token tail included."""
    torch.manual_seed(11)
    logits = torch.randn(45, 8)
    logits[3] = 1.0  # all tied
    logits[4, 2] = logits[4, 6] = 7.0
    logits[5, :7] = float("-inf")
    logits[44, 1] = float("-inf")
    cases = [(2, "topk"), (1, "topk"), (2, "all"), (3, "topk")]
    code = ("import sys, torch; from deploykit import native; lg = torch.load(sys.argv[1]); "
            f"torch.save([tuple(native.moe_route(lg, k, sm)) for k, sm in {cases!r}], sys.argv[2])")
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "lg.pt"), os.path.join(d, "out.pt")
        torch.save(logits, src)
        env = {**os.environ, "DEPLOYKIT_NATIVE_ISA": "scalar"}
        subprocess.run([sys.executable, "-c", code, src, dst], env=env, check=True, timeout=120)
        scalar = torch.load(dst)
    for (k, sm), ref in zip(cases, scalar):
        r = native.moe_route(logits, k, sm)
        for name, a, b in zip(native.MoERouting._fields, r, ref):
            if name == "weights":
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-30)
            else:
                assert torch.equal(a, b), (k, sm, name)


def test_route_ties_lowest_index_wins():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0],
                           [0.0, 0.0, 5.0, 0.0, 5.0]])
    r = native.moe_route(logits, 2)
    assert r.ids.tolist() == [[1, 2], [0, 1], [2, 4]]
    torch.testing.assert_close(r.weights, torch.full((3, 2), 0.5))
    assert torch.equal(r.ids, naive_route(logits, 2, "topk")[0])
    r = native.moe_route(torch.zeros(4, 6), 6)  # k = E, all tied: identity order
    assert r.ids.tolist() == [list(range(6))] * 4


def test_route_empty_experts_and_errors():
    logits = torch.full((5, 6), -1.0)
    logits[:, 2] = 1.0
    logits[:, 4] = 0.5
    r = native.moe_route(logits, 2)
    assert r.counts.tolist() == [0, 0, 5, 0, 5, 0]
    assert r.offsets.tolist() == [0, 0, 0, 5, 5, 10, 10]
    with pytest.raises(ValueError, match="k must be in \\[1, E=6\\]"):
        native.moe_route(logits, 7)
    with pytest.raises(ValueError, match="softmax must be one of"):
        native.moe_route(logits, 2, softmax="sparse")
    bad = logits.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        native.moe_route(bad, 2)


@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (9, 4, 4), (20, 8, 1)])
def test_gather_scatter_roundtrip(T, E, k):
    torch.manual_seed(0)
    x, logits = torch.randn(T, 24), torch.randn(T, E)
    r = native.moe_route(logits, k)
    xs = native.moe_gather(x, r)
    assert torch.equal(xs, x[(r.perm // k).long()])  # exact: a gather only copies floats
    ys = xs * 2.0  # "expert" doubles its input
    out = native.moe_scatter(ys, r)
    torch.testing.assert_close(out, 2.0 * x * r.weights.sum(1, keepdim=True))


def naive_moe(x, logits, w1, w3, w2, k, softmax="topk", quant=True):
    """The seed-style per-expert loop; with quant=True each expert runs the same int8 math as the
    kernel (via int8_linear on the scalar variant), so the comparison isolates the routing."""
    T, D = x.shape
    E = w1.shape[0]
    ids, w, _, _ = naive_route(logits, k, softmax)
    out = torch.zeros(T, D)
    for e in range(E):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        if quant:
            gu = native.pack_int8_swiglu(w1[e], w3[e])
            h = native.int8_linear(xe, gu, isa="scalar")
            ye = native.int8_linear(h, native.pack_int8_weight(w2[e]), isa="scalar")
        else:
            ye = (torch.nn.functional.silu(xe @ w1[e].T) * (xe @ w3[e].T)) @ w2[e].T
        out.index_add_(0, tok, ye * w[tok, slot][:, None])
    return out


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (16, 8, 2), (40, 4, 1), (6, 3, 3), (0, 4, 2)])
def test_moe_ffn_matches_naive(isa, T, E, k):
    torch.manual_seed(T + E + k)
    D, F = 40, 52  # not panel multiples, D % 4 == 0, F % 4 == 0
    x, logits = torch.randn(T, D), torch.randn(T, E)
    logits[:, -1] = -30.0  # the last expert never gets tokens
    if E > k:
        logits[:, -1] = -30.0
    w1, w3 = torch.randn(E, F, D) * 0.2, torch.randn(E, F, D) * 0.2
    w2 = torch.randn(E, D, F) * 0.2
    ex = native.pack_moe_experts(w1, w3, w2)
    y = native.moe_ffn(x, logits, ex, k, isa=isa, threads=2)
    ref = naive_moe(x, logits, w1, w3, w2, k)
    assert y.shape == (T, D)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    if T:
        fp = naive_moe(x, logits, w1, w3, w2, k, quant=False)
        assert (y - fp).abs().max() < 0.05 * fp.abs().max()  # int8 error stays small


@pytest.mark.parametrize("isa", isa_params())  # the odd tails are each SIMD variant's own code
def test_moe_ffn_odd_dims_and_softmax_all(isa):
    torch.manual_seed(5)
    T, E, k, D, F = 11, 5, 2, 37, 23  # D, F not multiples of 4
    x, logits = torch.randn(T, D), torch.randn(T, E)
    w1, w3, w2 = torch.randn(E, F, D), torch.randn(E, F, D), torch.randn(E, D, F)
    ex = native.pack_moe_experts(w1, w3, w2)
    y = native.moe_ffn(x, logits, ex, k, softmax="all", isa=isa)
    torch.testing.assert_close(y, naive_moe(x, logits, w1, w3, w2, k, "all"), rtol=1e-5, atol=1e-4)


def test_moe_ffn_export():
    torch.manual_seed(0)
    E, D, F = 4, 32, 48
    ex = native.pack_moe_experts(torch.randn(E, F, D), torch.randn(E, F, D), torch.randn(E, D, F))
    router = torch.nn.Linear(D, E, bias=False)

    class Moe(torch.nn.Module):
        def forward(self, x):
            return native.moe_ffn(x, router(x), ex, 2)

    x = torch.randn(2, 3, D)
    ep = torch.export.export(Moe(), (x,))
    assert "deploykit.moe_ffn" in ep.graph_module.code
    torch.testing.assert_close(ep.module()(x), Moe()(x))
