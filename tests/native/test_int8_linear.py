"""Fused int8 linear: bit-exact int32 accumulators for every ISA variant, fp32 outputs within
1e-5 relative of the dequantized reference, odd shapes, and argument checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from native_helpers import isa_params, requires_native

from deploykit import native

pytestmark = requires_native
ISAS = isa_params()

# (M, K, N): tile multiples and not; K % 4 != 0; M = 1; M = 0; N < 16
SHAPES = [(1, 5, 3), (7, 33, 17), (4, 64, 32), (13, 130, 70), (1, 512, 512), (33, 257, 100),
          (0, 64, 48), (64, 512, 96), (9, 1, 1)]


def rand_q(shape, rng):
    return torch.from_numpy(rng.integers(-127, 128, shape, dtype=np.int8))


def ref_acc(qa: torch.Tensor, qw: torch.Tensor) -> np.ndarray:
    return qa.numpy().astype(np.int64) @ qw.numpy().astype(np.int64).T  # (M, N) exact


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_raw_accumulators_bit_exact(isa, M, K, N, threads):
    rng = np.random.default_rng(M * 1000 + K * 10 + N)
    qa, qw = rand_q((M, K), rng), rand_q((N, K), rng)
    p = native.pack_int8_weight(qweight=qw, scales=torch.rand(N))
    out = native.int8_gemm_s32(qa, p, isa=isa, threads=threads)
    assert out.dtype == torch.int32 and out.shape == (M, N)
    np.testing.assert_array_equal(out.numpy(), ref_acc(qa, qw))


# Shapes for the cache-blocked paths of the vector variants: row tails of the 6- and 8-row tiles
# (M = 9, 23, 61), panel counts that are not multiples of the 3- and 4-panel tiles, N % 16 != 0,
# K % 4 != 0, K past one K slice (> 4096) with more than one row tile, several row blocks (M * K
# over the L2 share), decode rows (M <= 8) against many panels, and enough panels (> 96 units)
# for the threaded driver's 12-unit chunk boundaries; K = 0.
BLOCKED_SHAPES = [(9, 64, 16), (23, 100, 50), (61, 257, 200), (20, 4101, 40), (12, 8200, 24),
                  (200, 2100, 80), (3, 1000, 1600), (8, 300, 1570), (5, 77, 45), (130, 64, 1600),
                  (12, 0, 20), (3, 0, 20)]  # K = 0: one empty K slice, all-zero accumulators


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,K,N", BLOCKED_SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_blocked_paths_bit_exact(isa, M, K, N, threads):
    rng = np.random.default_rng(M * 7 + K * 3 + N)
    qa, qw = rand_q((M, K), rng), rand_q((N, K), rng)
    p = native.pack_int8_weight(qweight=qw, scales=torch.rand(N))
    out = native.int8_gemm_s32(qa, p, isa=isa, threads=threads)
    np.testing.assert_array_equal(out.numpy(), ref_acc(qa, qw))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,K,F", [(20, 130, 70), (64, 100, 200), (7, 300, 33)])
def test_blocked_swiglu_raw_and_epilogue(isa, M, K, F):
    rng = np.random.default_rng(M + K + F)
    qa, qg, qu = rand_q((M, K), rng), rand_q((F, K), rng), rand_q((F, K), rng)
    packed, sw, cs = native._pack(torch.cat([qg, qu]), torch.ones(2 * F), True)
    p = native.PackedInt8Weight(packed, sw, cs, F, K, True)
    out = native.int8_gemm_s32(qa, p, isa=isa, threads=2)
    np.testing.assert_array_equal(out.numpy(), np.concatenate([ref_acc(qa, qg), ref_acc(qa, qu)], 1))
    torch.manual_seed(M)
    x, wg, wu = torch.randn(M, K), torch.randn(F, K), torch.randn(F, K)
    ps = native.pack_int8_swiglu(wg, wu)
    torch.testing.assert_close(native.int8_linear(x, ps, isa=isa, threads=2),
                               native.int8_linear(x, ps, isa="scalar", threads=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
def test_raw_extremes_no_saturation(isa):
    # all +-127: the worst case for vpmaddubsw pairs (2 * 127 * 127) and a large K
    # M = 13: the cache-blocked path too, whose K is sliced (4099 > one 4096 slice)
    K, N, M = 4099, 40, 13
    qa = torch.full((M, K), 127, dtype=torch.int8)
    qa[1] = -127
    qa[2, ::2] = -127
    qa[9] = -127
    qw = torch.full((N, K), -127, dtype=torch.int8)
    qw[3] = 127
    qw[4, 1::2] = 127
    p = native.pack_int8_weight(qweight=qw, scales=torch.ones(N))
    np.testing.assert_array_equal(native.int8_gemm_s32(qa, p, isa=isa).numpy(), ref_acc(qa, qw))


@pytest.mark.parametrize("isa", ISAS)
def test_swiglu_pack_raw_is_gate_then_up(isa):
    rng = np.random.default_rng(1)
    M, K, F = 6, 45, 37
    qa, qg, qu = rand_q((M, K), rng), rand_q((F, K), rng), rand_q((F, K), rng)
    packed, sw, cs = native._pack(torch.cat([qg, qu]), torch.ones(2 * F), True)
    p = native.PackedInt8Weight(packed, sw, cs, F, K, True)
    out = native.int8_gemm_s32(qa, p, isa=isa, threads=2)
    np.testing.assert_array_equal(out.numpy(), np.concatenate([ref_acc(qa, qg), ref_acc(qa, qu)], 1))


@pytest.mark.parametrize("isa", ISAS)
def test_quantize_rows_matches_reference(isa):
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((9, 75)).astype(np.float32))
    x[3] = 0.0  # all-zero row: scale 0, q 0
    x[4, :8] = torch.tensor([0.5, -0.5, 1.5, 2.5, -2.5, 127.0, -127.0, 3.5])  # exact halves
    qa, sa = native.quantize_rows(x, isa=isa)
    amax = x.abs().amax(1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    ref = torch.round(x * inv[:, None]).clamp(-127, 127).to(torch.int8)  # half to even
    # Exact on every machine: amax is a max (order-free), and 127/amax, x*inv and amax/127 are single
    # correctly rounded IEEE operations in the kernel and in torch alike; nothing is summed.
    assert torch.equal(qa, ref)
    assert torch.equal(sa, amax / 127.0)
    q_scalar, _ = native.quantize_rows(x, isa="scalar")
    assert torch.equal(qa, q_scalar)


def dequant_ref(x, p_qw, p_s, bias):
    qa, sa = native.quantize_rows(x, isa="scalar")
    acc = ref_acc(qa, p_qw).astype(np.float64)
    y = acc * sa.numpy().astype(np.float64)[:, None] * p_s.numpy().astype(np.float64)[None, :]
    return y if bias is None else y + bias.numpy().astype(np.float64)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_fp32_output_within_1e5_of_dequantized_reference(isa, M, K, N, with_bias):
    torch.manual_seed(M + K + N)
    x, w = torch.randn(M, K), torch.randn(N, K)
    bias = torch.randn(N) if with_bias else None
    qw, s = native.quantize_weight(w)
    p = native.pack_int8_weight(w)
    y = native.int8_linear(x, p, bias, isa=isa, threads=2)
    ref = dequant_ref(x, qw, s, bias)
    assert y.shape == (M, N)
    if M:
        err = np.abs(y.numpy() - ref) / (np.abs(ref) + 1e-6 * np.abs(ref).max() + 1e-30)
        assert err.max() < 1e-5, err.max()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("M,K,F", [(1, 64, 16), (5, 37, 21), (17, 130, 70), (0, 8, 8)])
def test_swiglu_epilogue(isa, M, K, F):
    torch.manual_seed(7)
    x, wg, wu = torch.randn(M, K), torch.randn(F, K), torch.randn(F, K)
    bias = torch.randn(2 * F)
    p = native.pack_int8_swiglu(wg, wu)
    qg, sg = native.quantize_weight(wg)
    qu, su = native.quantize_weight(wu)
    g = dequant_ref(x, qg, sg, bias[:F])
    u = dequant_ref(x, qu, su, bias[F:])
    ref = g / (1 + np.exp(-g)) * u
    y = native.int8_linear(x, p, bias, isa=isa, threads=2)
    assert y.shape == (M, F)
    if M:
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("isa", ISAS)
def test_variants_agree_in_fp32(isa):
    torch.manual_seed(3)
    x, w, b = torch.randn(37, 300), torch.randn(77, 300), torch.randn(77)
    p = native.pack_int8_weight(w)
    # The int32 accumulators are equal (test_raw_accumulators_bit_exact); only the epilogue
    # acc * sa * sw + bias may round differently (an FMA or not): a few ulps.
    torch.testing.assert_close(native.int8_linear(x, p, b, isa=isa), native.int8_linear(x, p, b, isa="scalar"),
                               rtol=1e-6, atol=1e-6)


def test_int8_linear_module_close_to_float():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96)
    m = native.Int8Linear.from_float(lin)
    x = torch.randn(2, 5, 256)  # leading dims are kept
    y, ref = m(x), lin(x)
    assert y.shape == ref.shape
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()


@pytest.mark.parametrize("isa", ISAS)  # alignment is what the SIMD variants could get wrong
def test_noncontiguous_and_misaligned_inputs(isa):
    torch.manual_seed(0)
    w = torch.randn(40, 64)
    p = native.pack_int8_weight(w)
    big = torch.randn(10, 128)
    x_nc = big[:, ::2]  # non-contiguous view: copied once, same result
    torch.testing.assert_close(native.int8_linear(x_nc, p, isa=isa), native.int8_linear(x_nc.contiguous(), p, isa=isa))
    flat = torch.randn(1 + 7 * 64)
    x_mis = flat[1:].view(7, 64)  # data pointer 4 bytes past the allocation's alignment
    assert x_mis.data_ptr() % 32 != 0
    torch.testing.assert_close(native.int8_linear(x_mis, p, isa=isa), native.int8_linear(x_mis.clone(), p, isa=isa))
    qflat = torch.randint(-127, 128, (3 + 5 * 64,), dtype=torch.int8)
    qa = qflat[3:].view(5, 64)  # odd byte offset
    qw, _ = native.quantize_weight(w)
    np.testing.assert_array_equal(native.int8_gemm_s32(qa, p, isa=isa).numpy(), ref_acc(qa.clone(), qw))


def test_bad_arguments_are_refused_with_names():
    p = native.pack_int8_weight(torch.randn(8, 16))
    with pytest.raises(TypeError, match="'x' must have dtype torch.float32"):
        native.int8_linear(torch.randn(2, 16, dtype=torch.float64), p)
    with pytest.raises(ValueError, match="'x' has 15 features"):
        native.int8_linear(torch.randn(2, 15), p)
    with pytest.raises(TypeError, match="'bias'"):
        native.int8_linear(torch.randn(2, 16), p, torch.zeros(8, dtype=torch.float16))
    with pytest.raises(ValueError, match="argument 'bias' must have shape \\(8,\\)"):
        native.int8_linear(torch.randn(2, 16), p, torch.zeros(9))
    with pytest.raises(ValueError, match="'qa' must be C-contiguous"):
        native.int8_gemm_s32(torch.zeros(4, 32, dtype=torch.int8)[:, ::2], p)
    with pytest.raises(ValueError, match="\\[-127, 127\\]"):
        native.pack_int8_weight(qweight=torch.full((2, 4), -128, dtype=torch.int8), scales=torch.ones(2))
    with pytest.raises(ValueError, match="valid values: scalar, avx2, avx512vnni"):
        native.int8_linear(torch.randn(2, 16), p, isa="sse")
    from deploykit.native import _native as C
    with pytest.raises(ValueError, match="int8_linear: argument 'out' must be C-contiguous"):
        out = np.zeros((8, 2), np.float32).T
        C.int8_linear(np.zeros((2, 16), np.float32), p.packed.numpy(), p.scales.numpy(),
                      p.colsum.numpy(), 8, False, None, out, 1, "")


def test_packed_roundtrip_through_tensors():
    p = native.pack_int8_swiglu(torch.randn(20, 12), torch.randn(20, 12))
    q = native.PackedInt8Weight.from_tensors(p.to_tensors("mlp"), "mlp")
    assert q.swiglu and q.out_features == 20 and q.in_features == 12
    assert torch.equal(q.packed, p.packed)


def test_torch_compile_and_export_use_the_custom_op():
    torch.manual_seed(0)
    m = native.Int8Linear.from_float(torch.nn.Linear(64, 48))
    x = torch.randn(3, 64)
    ref = m(x)
    ep = torch.export.export(m, (x,))
    assert "deploykit.int8_linear" in ep.graph_module.code
    torch.testing.assert_close(ep.module()(x), ref)
    torch.testing.assert_close(torch.compile(m, fullgraph=True)(x), ref)


def test_custom_op_opcheck():
    p = native.pack_int8_weight(torch.randn(24, 40))
    args = (torch.randn(5, 40), p.packed, p.scales, p.colsum, torch.randn(24), 24, 40, False)
    torch.library.opcheck(torch.ops.deploykit.int8_linear.default, args)


def test_modules_state_dict_roundtrip():
    torch.manual_seed(0)
    gate, up, down = (torch.nn.Linear(32, 48, bias=False), torch.nn.Linear(32, 48, bias=False),
                      torch.nn.Linear(48, 32, bias=False))
    m = native.Int8SwiGLU.from_float(gate, up, down)
    x = torch.randn(4, 32)
    ref = down(torch.nn.functional.silu(gate(x)) * up(x))
    assert (m(x) - ref).abs().max() < 0.05 * ref.abs().max()
    sd = m.state_dict()
    assert set(sd) == {f"{a}_{b}" for a in ("gate_up", "down") for b in ("packed", "scales", "colsum")}
    lin = native.Int8Linear.from_float(torch.nn.Linear(32, 20))
    assert {"packed", "scales", "colsum", "bias"} <= set(lin.state_dict())
    with pytest.raises(ValueError, match="bias"):
        native.Int8SwiGLU.from_float(torch.nn.Linear(32, 48), up, down)


def test_modules_fast_path_equals_the_checked_path_and_follows_replaced_weights():
    # Int8Linear / Int8SwiGLU call the kernel with cached numpy views of their buffers: the result
    # must be the checked path's, and a load_state_dict (in place), a reassigned buffer or .to()
    # must never leave the module computing with the old weights.
    torch.manual_seed(0)
    a, b = torch.nn.Linear(64, 48), torch.nn.Linear(64, 48)
    m, other = native.Int8Linear.from_float(a), native.Int8Linear.from_float(b)
    x = torch.randn(2, 3, 64)

    def checked(mod):
        return native.int8_linear(x, mod.weight_packed, mod.bias, threads=torch.get_num_threads())

    assert torch.equal(m(x), checked(m)) and m(x).shape == (2, 3, 48)
    want = other(x)
    m.load_state_dict(other.state_dict())  # in place: same tensors, new values
    assert torch.equal(m(x), want)
    m.packed = native.Int8Linear.from_float(a).packed  # a reassigned buffer
    m.scales, m.colsum, m.bias = (getattr(native.Int8Linear.from_float(a), n) for n in ("scales", "colsum", "bias"))
    assert torch.equal(m(x), native.Int8Linear.from_float(a)(x))
    m.to(torch.float32)  # _apply may rebuild buffers: still right
    assert torch.equal(m(x), checked(m))
    with torch.enable_grad():  # autograd inputs take the checked path
        xg = x.clone().requires_grad_(True)
        assert torch.equal(m(xg), checked(m))

    g, u, d = (torch.nn.Linear(*s, bias=False) for s in ((64, 96), (64, 96), (96, 64)))
    s = native.Int8SwiGLU.from_float(g, u, d)
    gu = native.PackedInt8Weight(s.gate_up_packed, s.gate_up_scales, s.gate_up_colsum, 96, 64, True)
    dn = native.PackedInt8Weight(s.down_packed, s.down_scales, s.down_colsum, 64, 96, False)
    assert torch.equal(s(x), native.int8_linear(native.int8_linear(x, gu), dn))
    s2 = native.Int8SwiGLU.from_float(*(torch.nn.Linear(*sh, bias=False) for sh in ((64, 96), (64, 96), (96, 64))))
    s.load_state_dict(s2.state_dict())
    assert torch.equal(s(x), s2(x))
