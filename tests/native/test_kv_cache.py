"""The engine's fp16 and int8 KV caches against its fp32 cache, on random-weight nano models of every variant:
logits of a prefill and of cached decode steps within the stated bounds, decode equal to full recompute on
the same cache type, and bad settings refused."""
from __future__ import annotations

import numpy as np
import pytest
from native_helpers import requires_native
from test_engine import native_model, probe

pytestmark = requires_native

# Stated bounds on max |Δlogit| against the fp32 cache, relative to the fp32 logits' range at the position.
# fp16 rounds each K/V value by <= 2^-11 relative, int8 (one scale per position and kv head) by <= 1/254 of
# the head's max; but what reaches the logits is dominated by the int8 activations downstream: any change
# of the attention output flips a few activations across an int8 rounding boundary (one quantum each), so
# both caches measure alike on random-weight nano (dense, legacy, moe; worst position, prefill and decode):
# fp16 4.9e-3..1.0e-2 of the range, int8 5.5e-3..1.0e-2 (median 3e-3..7e-3). Bounds: 3x the worst. A cache
# that reads a wrong position or scale moves logits by the order of their range.
BOUNDS = {"fp16": 0.03, "int8": 0.03}


def _engine(model, kv: str):
    from deploykit_plugins.native_backend import engine_tensors

    from deploykit.native.engine import Engine

    config, tensors = engine_tensors(model)
    return Engine({**config, "kv_cache": kv}, tensors, threads=2)


@pytest.fixture(scope="module", params=["nano", "nano-legacy", "nano-moe"])
def model(request):
    return native_model(request.param)


def _rel(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per position: max |Δlogit| / the reference's logit range."""
    return np.abs(got - ref).max(-1) / (ref.max(-1) - ref.min(-1))


@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_quantized_cache_stays_within_its_bound_of_fp32(model, kv):
    ids = probe(model.config.vocab_size, B=1, T=40)
    ref_eng, eng = _engine(model, "fp32"), _engine(model, kv)
    assert eng.kv_cache == kv and ref_eng.kv_cache == "fp32"
    ref, got = ref_eng.forward(ids)[0], eng.forward(ids)[0]  # (T, V)
    rel = _rel(got, ref)
    # decode: cached steps on each cache type
    s_ref, s = ref_eng.new_session(), eng.new_session()
    s_ref.feed(ids[0, :8])
    s.feed(ids[0, :8])
    steps_ref = np.stack([s_ref.feed(ids[0, t:t + 1]) for t in range(8, 40)])
    steps = np.stack([s.feed(ids[0, t:t + 1]) for t in range(8, 40)])
    rel_dec = _rel(steps, steps_ref)
    print(f"\n{model.config.variant} kv={kv}: prefill max |Δ|/range {rel.max():.1e} (median {np.median(rel):.1e}), "
          f"decode {rel_dec.max():.1e}")
    assert rel.max() < BOUNDS[kv] and rel_dec.max() < BOUNDS[kv]
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
    assert rel.max() > 0  # the cache really is stored in another precision


def _decode_vs_prefill(model, kv: str, T: int, start: int) -> None:
    eng = _engine(model, kv)
    ids = probe(model.config.vocab_size, B=1, T=T)[0]
    full = eng.forward(ids[None])[0]  # (T, V)
    s = eng.new_session()
    s.feed(ids[:start])
    steps = np.stack([s.feed(ids[t:t + 1]) for t in range(start, T)])
    # each position's k/v are rounded once, the same way in both, and the blocked attention computes a row
    # alike whatever the step
    np.testing.assert_array_equal(steps, full[start:])


@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_quantized_cache_decode_equals_full_recompute(model, kv):
    _decode_vs_prefill(model, kv, 24, 8)


@pytest.fixture(scope="module", params=["nano", "nano-legacy", "nano-moe"])
def long_model(request):
    return native_model(request.param, max_seq_len=512)


@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_quantized_cache_decode_equals_full_recompute_at_long_prompts(long_model, kv):
    """Decode steps across the key tile at position 256 after a 250-token prefill."""
    _decode_vs_prefill(long_model, kv, 280, 250)


@pytest.mark.parametrize("kv", ["fp16", "int8"])
def test_quantized_cache_stays_within_its_bound_at_long_prompts(long_model, kv):
    ids = probe(long_model.config.vocab_size, B=1, T=300)
    ref, got = _engine(long_model, "fp32").forward(ids)[0], _engine(long_model, kv).forward(ids)[0]
    assert _rel(got, ref).max() < BOUNDS[kv] and (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95


def test_bad_cache_setting_is_refused(model):
    with pytest.raises(ValueError, match="kv_cache must be fp32, fp16 or int8, got 'bf16'"):
        _engine(model, "bf16")
