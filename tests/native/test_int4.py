"""The int4 kernels and the engine's int4 scheme: packing round-trips, every ISA variant bit for bit against
the scalar one on the int32 group accumulators (and the scalar one against a torch einsum), the fp32 output
against the contract written in torch, bad packs refused, and the engine on int4 packs against the
torch-module path (dense and legacy), KV-cache decode vs full recompute."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from native_helpers import isa_params, requires_native

from deploykit import native
from deploykit.model.config import preset
from deploykit.model.graph import CausalLM

pytestmark = requires_native

SHAPES = [(40, 96, False), (64, 256, True), (17, 50, False), (32, 33, True)]  # (rows, K, swiglu)
ROWS = [1, 2, 3, 5, 9, 70]  # decode tiles (1-2), the AVX2 tile (3), ragged tails, prefill


def _int4():
    from deploykit.native import int4

    return int4


def random_pack(rows: int, K: int, swiglu: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (rows, K), dtype=torch.int8, generator=g)
    s = torch.rand(rows, -(-K // 32), generator=g) * 0.1
    return q, s, _int4().pack_int4_weight(q, s, swiglu=swiglu)


def exact_accumulators(qa: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """acc[m, n, g] = sum_{k in g} qa[m, k] q[n, k] in int64 via torch: the contract, independent of the kernels."""
    K = qa.shape[1]
    G = -(-K // 32)
    pad = lambda t: torch.nn.functional.pad(t.long(), (0, G * 32 - K)).view(t.shape[0], G, 32)
    return torch.einsum("mgk,ngk->mng", pad(qa), pad(q))


@pytest.mark.parametrize("rows,K,swiglu", SHAPES)
def test_packing_round_trips(rows, K, swiglu):
    q, s, p = random_pack(rows, K, swiglu)
    q2, s2 = _int4().unpack_int4_weight(p)
    assert torch.equal(q2, q) and torch.equal(s2, s)
    d = p.to_tensors("w")
    assert _int4().PackedInt4Weight.from_tensors(d, "w") == p


@pytest.mark.parametrize("isa", isa_params())
@pytest.mark.parametrize("rows,K,swiglu", SHAPES)
def test_every_variant_matches_scalar_bit_for_bit(isa, rows, K, swiglu):
    int4 = _int4()
    q, _, p = random_pack(rows, K, swiglu)
    idx = torch.from_numpy(int4._internal_rows(p))
    for M in ROWS:
        qa = torch.randint(-127, 128, (M, K), dtype=torch.int8, generator=torch.Generator().manual_seed(M))
        ref = int4.int4_gemm_s32(qa, p, isa="scalar")
        assert torch.equal(ref[:, idx, :].long(), exact_accumulators(qa, q)), "scalar variant vs torch"
        got = int4.int4_gemm_s32(qa, p, isa=isa, threads=2)
        assert torch.equal(got, ref), f"{isa} differs from scalar at M={M}"


@pytest.mark.parametrize("isa", isa_params())
def test_linear_output_follows_the_contract(isa):
    """y = sa * sum_g acc * s (+ bias), activations quantized as the int8 kernels do; SwiGLU in the epilogue."""
    int4 = _int4()
    for rows, K, swiglu in SHAPES:
        q, s, p = random_pack(rows, K, swiglu)
        x = torch.randn(7, K, generator=torch.Generator().manual_seed(1))
        bias = torch.randn(rows)
        qa, sa = native.quantize_rows(x)
        acc = exact_accumulators(qa, q).double()  # (M, rows, G)
        y = (acc * s.double()[None]).sum(-1) * sa.double()[:, None] + bias.double()
        if swiglu:
            F = rows // 2
            y = torch.nn.functional.silu(y[:, :F]) * y[:, F:]
        got = int4.int4_linear(x, p, bias, isa=isa, threads=2).double()
        assert torch.allclose(got, y, rtol=1e-5, atol=1e-5 * float(y.abs().max())), f"{isa} {rows}x{K}"


def test_bad_packs_are_refused():
    int4 = _int4()
    _, _, p = random_pack(40, 96, False)
    with pytest.raises(ValueError, match=r"qw must be in \[-8, 7\]; found 9"):
        int4.pack_int4_weight(torch.full((4, 32), 9, dtype=torch.int8), torch.ones(4, 1))
    with pytest.raises(ValueError, match="do not match out=40, in=96"):
        int4.PackedInt4Weight.from_tensors({**p.to_tensors("w"), "w.packed": p.packed[:-256]}, "w")
    with pytest.raises(ValueError, match="not version 1"):
        int4.PackedInt4Weight.from_tensors({**p.to_tensors("w"), "w.meta": torch.tensor([40, 96, 0, 2, 32])}, "w")
    with pytest.raises(ValueError, match="packed weight expects 96"):
        int4.int4_linear(torch.randn(2, 95), p)


# ---------------------------------------------------------------------------------------------
# the engine on int4 packs
# ---------------------------------------------------------------------------------------------
def int4_model(name: str) -> CausalLM:
    """A random-weight model with int4 modules installed (round to nearest), as the backend loads it."""
    from deploykit_plugins.native_backend import install, pack_tensors, plan, round_int4

    torch.manual_seed(0)
    model = CausalLM(preset(name)).eval()
    layout = plan(model, lm_head=True, bits=4)
    with torch.no_grad():
        tensors = pack_tensors(model, layout, round_int4(model, layout, "rtn", []))
    return install(model, layout, tensors).eval()


@pytest.fixture(scope="module", params=["nano", "nano-legacy"])
def model4(request) -> CausalLM:
    return int4_model(request.param)


def _engine(model: CausalLM, **kw):
    from deploykit_plugins.native_backend import engine_tensors

    from deploykit.native.engine import Engine

    config, tensors = engine_tensors(model)
    assert config["weight_bits"] == 4
    return Engine(config, tensors, threads=2, **kw)


def test_int4_engine_matches_torch_module_path(model4):
    from test_engine import assert_same_int8_math, probe, torch_logits

    int4 = _int4()
    layer = model4.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, int4.Int4Linear)
    assert isinstance(layer.mlp, int4.Int4SwiGLU) or isinstance(layer.mlp.up_proj, int4.Int4Linear)
    assert isinstance(model4.lm_head, native.Int8Linear)  # the lm_head stays int8
    ids = probe(model4.config.vocab_size)
    assert_same_int8_math(_engine(model4).forward(ids), torch_logits(model4, ids))


@pytest.mark.parametrize("isa", isa_params())
def test_int4_engine_runs_every_variant(model4, isa):
    from test_engine import probe, torch_logits

    ids = probe(model4.config.vocab_size)
    got, ref = _engine(model4, isa=isa).forward(ids), torch_logits(model4, ids)
    assert np.median(np.abs(got - ref).max(-1)) < 1e-2 and np.abs(got - ref).max() < 5e-2


def test_int4_kv_cache_decode_equals_full_recompute(model4):
    from test_engine import probe

    eng = _engine(model4)
    ids = probe(model4.config.vocab_size, B=1, T=24)[0]
    full = eng.forward(ids[None])[0]  # (T, V)
    s = eng.new_session()
    s.feed(ids[:8])
    steps = np.stack([s.feed(ids[t:t + 1]) for t in range(8, 24)])  # (16, V)
    per_pos = np.abs(steps - full[8:]).max(-1)
    assert np.median(per_pos) <= 1e-3 and per_pos.max() < 5e-2


def test_engine_refuses_int4_for_moe():
    from deploykit_plugins.native_backend import engine_tensors
    from test_engine import native_model

    from deploykit.native.engine import Engine

    config, tensors = engine_tensors(native_model("nano-moe"))
    with pytest.raises(ValueError, match="int4 weights are not supported for MoE"):
        Engine({**config, "weight_bits": 4}, tensors)
    with pytest.raises(ValueError, match="weight_bits must be 8 or 4, got 3"):
        Engine({**config, "weight_bits": 3}, tensors)
