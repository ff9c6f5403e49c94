"""GPTQ and the Q4_0 grid (deploykit.deploy.gptq): the grid matches llama.cpp's Q4_0 rounding, GPTQ beats
round-to-nearest on its own objective ||W X - Q X||², the Hessians read from a model are X Xᵀ (per MoE
expert: of the tokens its router sends it), GPTQ on a grid fixed first (llama.cpp's Q4_K) beats RTN on
it, and the rounded weights written as Q4_0 / Q4_K blocks are what llama.cpp reads (the gguf backend's
rounding=gptq|rtn; its end-to-end tests are in tests/test_gguf_backend.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deploykit.deploy import gptq
from deploykit.errors import ConfigError


def correlated_inputs(n: int, K: int, seed: int = 0) -> torch.Tensor:
    """Inputs X (n, K) with correlated channels and one outlier channel, like a trained model's activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(K, K, generator=g) * 0.3 + torch.eye(K)
    x = torch.randn(n, K, generator=g) @ mix
    x[:, 5] *= 8.0
    return x


def test_grid_is_q4_0():
    """Largest magnitude m -> scale fp16(m / -8); q = floor(w / d + 8.5) clamped, minus 8 (ggml's reference)."""
    w = torch.tensor([[0.5, -1.0, 0.26, 0.0] + [0.1] * 28])  # one group, m = -1.0
    q, s = gptq.rtn(w)
    assert s.shape == (1, 1) and s.item() == pytest.approx(0.125)  # -1 / -8
    assert q[0, :4].tolist() == [4, -8, 2, 0] and q.dtype == torch.int8
    assert float(s[0, 0]) == float(s[0, 0].half())  # representable in fp16: Q4_0 blocks store it
    w2 = torch.randn(8, 70, generator=torch.Generator().manual_seed(0))  # K % 32 != 0: the last group is padded
    q2, s2 = gptq.rtn(w2)
    assert s2.shape == (8, 3) and int(q2.min()) >= -8 and int(q2.max()) <= 7
    # half a step everywhere but at +8 steps (the grid's asymmetric end, clamped to 7): up to one step there
    err = (gptq.dequantize(q2, s2) - w2).abs() / s2.abs().repeat_interleave(32, 1)[:, :70]
    assert float(err.max()) <= 1.0 + 1e-6 and float((err > 0.5 + 1e-6).float().mean()) < 0.05
    z = torch.zeros(2, 32)
    assert gptq.rtn(z)[0].abs().sum() == 0  # a zero group has scale 0 and q 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_beats_round_to_nearest_on_its_objective(seed):
    N, K = 24, 96
    X = correlated_inputs(512, K, seed)
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(seed + 10)) * 0.05
    H = 2.0 * X.double().T @ X.double() / X.shape[0]
    err = lambda q, s: float(((X @ W.T - X @ gptq.dequantize(q, s).T) ** 2).sum())
    e_gptq, e_rtn = err(*gptq.gptq(W, H)), err(*gptq.rtn(W))
    print(f"\nseed {seed}: ||WX - QX||² GPTQ {e_gptq:.2f} vs RTN {e_rtn:.2f} ({e_gptq / e_rtn:.2f}x)")
    assert e_gptq < 0.8 * e_rtn
    q, _ = gptq.gptq(W, H)
    assert int(q.min()) >= -8 and int(q.max()) <= 7


def test_gptq_with_identity_hessian_is_round_to_nearest():
    """With H = I no column's error can be compensated by another: GPTQ reduces to RTN."""
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    q, s = gptq.gptq(W, torch.eye(64, dtype=torch.float64), damp=1e-6)
    qr, sr = gptq.rtn(W)
    assert torch.equal(q, qr) and torch.equal(s, sr)


def test_gptq_survives_dead_inputs_and_checks_shapes():
    W = torch.randn(4, 64)
    H = torch.eye(64, dtype=torch.float64)
    H[3, 3] = 0.0  # an input never active in calibration: its column is zeroed, not a NaN
    q, _ = gptq.gptq(W, H)
    assert (q[:, 3] == 0).all()
    with pytest.raises(ConfigError, match="the Hessian is"):
        gptq.gptq(W, torch.eye(32))
    with pytest.raises(ConfigError, match="multiple of the group size"):
        gptq.gptq(W, H, block=48)


def test_collect_hessians_reads_each_linear_input():
    from deploykit.model.config import preset
    from deploykit.model.graph import CausalLM

    torch.manual_seed(0)
    model = CausalLM(preset("nano")).eval()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"]
    seqs = [[1, 5, 9, 12, 40], [1, 7, 7, 30]]
    H = gptq.collect_hessians(model, names, seqs)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1]).double())) for n in names]
    with torch.no_grad():
        for s in seqs:
            model(torch.tensor([s]))
    for h in handles:
        h.remove()
    for n in names:
        X = torch.cat(seen[n])  # (9, K)
        assert torch.allclose(H[n], 2.0 * X.T @ X / X.shape[0])
    assert torch.equal(H[names[0]], H[names[1]])  # q and k read the same normed input
    with pytest.raises(ConfigError, match="calibration"):
        gptq.collect_hessians(model, names, [])


# ---------------------------------------------------------------------------------------------
# the same rounding as llama.cpp Q4_0 blocks (the gguf backend's rounding=gptq|rtn)
# ---------------------------------------------------------------------------------------------
def test_q4_0_blocks_decode_to_deploykit_weights():
    """ggml's own dequantizer (the gguf package's port of it) reads deploykit's blocks back exactly."""
    quants = pytest.importorskip("gguf.quants")
    from deploykit_plugins.gguf_backend.rounding import q4_0_blocks

    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))
    q, s = gptq.rtn(w)
    blocks = q4_0_blocks(q, s)  # (8, 3 * 18)
    assert blocks.shape == (8, 54)
    assert np.array_equal(quants.dequantize(blocks, quants.GGMLQuantizationType.Q4_0), gptq.dequantize(q, s).numpy())
    # gguf's quantizer takes 1/d before rounding d to fp16, deploykit after: the same bytes but at rare ties
    theirs = quants.quantize(w.numpy(), quants.GGMLQuantizationType.Q4_0)
    assert (theirs == blocks).mean() > 0.98
    with pytest.raises(ConfigError, match="multiple of 32"):
        q4_0_blocks(q[:, :40], s[:, :2])


@pytest.mark.slow  # a whole gguf conversion with its proofs: ~40-90 s on 2 cores
def test_gguf_q4_0_from_gptq_rounding_runs_in_llama_cpp(nano_checkpoint, tmp_path):
    """llama.cpp runs deploykit's GPTQ-rounded weights: the file passes its proof, its decoder weights are
    deploykit's blocks (read back with the gguf reader), and the rest keeps llama.cpp's own types."""
    pytest.importorskip("llama_cpp")
    import gguf

    import deploykit

    res = deploykit.convert(nano_checkpoint, "gguf", "q4_0", tmp_path / "g", options={"rounding": "gptq"})
    info = res.manifest["backend_info"]
    q = info["quality"]
    print(f"\ngguf q4_0 gptq on nano: Δppl {q['delta_ppl_pct']:+.3f} % KL {q['kl_vs_fp32']:.2e} "
          f"({info['rounded_tensors']} tensors rounded by deploykit)")
    assert res.passed and info["rounding"] == "gptq"
    cfg = deploykit.load_model(nano_checkpoint).config
    assert info["rounded_tensors"] == 7 * cfg.n_layers  # q, k, v, o, gate, up, down per layer
    reader = gguf.GGUFReader(str(res.path / "model.gguf"))
    t = {x.name: x for x in reader.tensors}["blk.0.attn_v.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q4_0
    with pytest.raises(ConfigError, match="writes Q4_0 and Q4_K blocks only"):
        deploykit.convert(nano_checkpoint, "gguf", "q8_0", tmp_path / "h", options={"rounding": "gptq"})


# ---------------------------------------------------------------------------------------------
# MoE experts: one Hessian per expert from the tokens its router sends it
# ---------------------------------------------------------------------------------------------
def _tiny_moe():
    from deploykit.model.config import preset
    from deploykit.model.graph import CausalLM

    torch.manual_seed(0)
    return CausalLM(preset("nano-moe", n_layers=2)).eval()


def test_expert_hessians_are_each_experts_routed_inputs():
    """The Hessians of expert e are built from exactly the tokens the model's own top-k routing sent to e."""
    from deploykit.model.graph import MoE, route_top_k

    model = _tiny_moe()
    seqs = [[1] + list(range(5, 60)), [1] + list(range(100, 140))]
    stats = gptq.collect_expert_hessians(model, seqs)
    layer = "model.layers.1.block_sparse_moe"
    moe = model.get_submodule(layer)
    assert isinstance(moe, MoE) and set(stats) == {"model.layers.0.block_sparse_moe", layer}
    seen: list[torch.Tensor] = []
    h = moe.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for s in seqs:
            model(torch.tensor([s]))
    h.remove()
    x = torch.cat(seen)  # (95, D)
    chosen = route_top_k(moe.gate(x), moe.top_k).experts  # (95, k)
    s = stats[layer]
    assert sum(s.tokens) == x.shape[0] * moe.top_k
    for e in range(moe.n_experts):
        xe = x[(chosen == e).any(-1)].double()
        assert s.tokens[e] == len(xe)
        if len(xe):
            assert torch.allclose(s.inputs[e], 2.0 * xe.T @ xe / len(xe))
            ex = moe.experts
            he = (torch.nn.functional.silu(xe.float() @ ex.w1[e].T) * (xe.float() @ ex.w3[e].T)).double()
            assert torch.allclose(s.hidden[e], 2.0 * he.T @ he / len(xe), rtol=1e-4, atol=1e-7)
            assert s.hessian("w1", e) is s.inputs[e] and s.hessian("w2", e) is s.hidden[e]


def _objective(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """GPTQ's objective ||W X - Q X||² / n * 2 = tr((W - Q) H (W - Q)ᵀ) with H = 2 X Xᵀ / n."""
    D = W.double() - Q.double()
    return float(torch.trace(D @ H @ D.T))


def test_gptq_beats_rtn_for_every_expert_that_got_tokens():
    """On a tiny MoE layer: for each expert and each of its three weights, GPTQ's ||W X - Q X||² over the
    expert's own routed calibration inputs is below round-to-nearest's."""
    model = _tiny_moe()
    seqs = [[1] + torch.randint(3, 2000, (63,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(8)]
    stats = gptq.collect_expert_hessians(model, seqs)["model.layers.0.block_sparse_moe"]
    ex = model.model.layers[0].block_sparse_moe.experts
    got_tokens = [e for e, n in enumerate(stats.tokens) if n]
    assert got_tokens, "the router sent no calibration token anywhere"
    for e in got_tokens:
        for param in ("w1", "w3", "w2"):
            W = getattr(ex, param)[e].detach()
            H = stats.hessian(param, e)
            e_gptq = _objective(W, gptq.dequantize(*gptq.gptq(W, H)), H)
            e_rtn = _objective(W, gptq.dequantize(*gptq.rtn(W)), H)
            assert e_gptq < e_rtn, f"expert {e} {param}: GPTQ {e_gptq:.4g} vs RTN {e_rtn:.4g} ({stats.tokens[e]} tokens)"


# ---------------------------------------------------------------------------------------------
# a grid fixed first (llama.cpp's Q4_K), then GPTQ's codes on it
# ---------------------------------------------------------------------------------------------
def test_fixed_grid_rtn_gptq_and_checks():
    g = torch.Generator().manual_seed(4)
    W = torch.randn(6, 64, generator=g) * 0.1
    lo, hi = W.reshape(6, 2, 32).amin(-1), W.reshape(6, 2, 32).amax(-1)  # (6, 2)
    grid = gptq.FixedGrid(scale=(hi - lo) / 15, offset=-lo)
    q = gptq.rtn_fixed(W, grid)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    step = grid.columns(64)[0]
    assert float(((gptq.dequantize_fixed(q, grid) - W).abs() / step).max()) <= 0.5 + 1e-5
    assert torch.equal(gptq.gptq_fixed(W, torch.eye(64, dtype=torch.float64), grid, damp=1e-6), q)  # H = I: RTN
    X = correlated_inputs(512, 64, 1)
    H = 2.0 * X.double().T @ X.double() / 512
    err = lambda Q: float(((X @ W.T - X @ gptq.dequantize_fixed(Q, grid).T) ** 2).sum())
    assert err(gptq.gptq_fixed(W, H, grid)) < 0.8 * err(q)
    zero = gptq.FixedGrid(scale=torch.zeros(6, 2), offset=torch.full((6, 2), 0.25))
    assert (gptq.rtn_fixed(W, zero) == 0).all()  # a zero scale codes 0: the group decodes to -offset
    with pytest.raises(ConfigError, match="same"):
        gptq.FixedGrid(scale=torch.zeros(6, 2), offset=torch.zeros(6, 3))
    with pytest.raises(ConfigError, match="do not cover"):
        gptq.rtn_fixed(torch.zeros(6, 96), grid)


def test_q4_k_blocks_are_llama_cpps_and_decode_to_ours():
    """llama.cpp's grid kept byte for byte: RTN on it gives ggml's own quantize_row_q4_K_ref blocks back, and
    GPTQ's codes in those blocks decode, with the gguf package's reference dequantizer, to what we computed."""
    pytest.importorskip("llama_cpp")
    quants = pytest.importorskip("gguf.quants")
    from deploykit_plugins.gguf_backend import q4_k

    g = torch.Generator().manual_seed(5)
    W = torch.randn(12, 512, generator=g) * 0.05
    W[:, 3] += 0.4  # an outlier input column: asymmetric sub-blocks
    theirs = q4_k.llama_q4_k(W.numpy())  # (12, 2 * 144)
    assert theirs.shape == (12, 288)
    grid = q4_k.grid_of(theirs)
    assert grid.scale.shape == (12, 16)
    assert np.array_equal(q4_k.with_codes(theirs, gptq.rtn_fixed(W, grid)), theirs)
    X = correlated_inputs(1024, 512, 2)
    H = 2.0 * X.double().T @ X.double() / 1024
    q = gptq.gptq_fixed(W, H, grid)
    ours = q4_k.with_codes(theirs, q)
    decoded = quants.dequantize(ours, quants.GGMLQuantizationType.Q4_K)  # (12, 512)
    assert np.array_equal(decoded, gptq.dequantize_fixed(q, grid).numpy())
    assert np.array_equal(ours[:, :16], theirs[:, :16]) and np.array_equal(ours[:, 144:160], theirs[:, 144:160])
    err = lambda Wq: float(((X @ W.T - X @ torch.from_numpy(Wq).T) ** 2).sum())
    e_gptq, e_rtn = err(decoded), err(quants.dequantize(theirs, quants.GGMLQuantizationType.Q4_K))
    print(f"\nQ4_K ||WX - QX||²: GPTQ {e_gptq:.3f} vs llama.cpp's RTN {e_rtn:.3f}")
    assert e_gptq < 0.8 * e_rtn
    with pytest.raises(ConfigError, match="multiple of 256"):
        q4_k.llama_q4_k(W[:, :300].numpy())
