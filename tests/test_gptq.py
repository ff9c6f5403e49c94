"""GPTQ and the Q4_0 grid (deploykit.deploy.gptq): the grid matches llama.cpp's Q4_0 rounding, GPTQ beats
round-to-nearest on its own objective ||W X - Q X||², the Hessians read from a model are X Xᵀ, and the
rounded weights written as Q4_0 blocks are what llama.cpp reads (the gguf backend's rounding=gptq|rtn)."""
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
    with pytest.raises(ConfigError, match="writes Q4_0 blocks only"):
        deploykit.convert(nano_checkpoint, "gguf", "q8_0", tmp_path / "h", options={"rounding": "gptq"})
