"""What deploykit proves about a GGUF file beyond its parity probes, all against the fp32 torch model.

- The tokenizer: llama.cpp's tokenization of :data:`TOKENIZER_PROOF_TEXTS` equals deploykit's, token
  for token (ParityError, exit 3, naming the first text that differs).
- Quality on :data:`HELDOUT_TEXT`, teacher-forced: KL(p_fp32 ‖ p_gguf), top-1 agreement, perplexities;
  against deploykit's fp32 model, not against llama.cpp's own F16 file (what ``llama-perplexity
  --kl-divergence`` compares with).
- For MoE models: the share of (token, layer) pairs where llama.cpp picks the fp32 router's top-k
  expert set, read from llama.cpp's ``ffn_moe_topk-N`` graph tensors through its eval callback.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploykit.errors import ArtifactError, BackendError, ParityError

from .runtime import GgufRunner, _quiet_llama_logs

if TYPE_CHECKING:
    from deploykit.model.config import ModelConfig
    from deploykit.model.graph import CausalLM

# ASCII, accents, CJK, emoji (with a skin-tone modifier), tabs, whitespace runs, digits, newlines, the
# special tokens inside text, and the empty string. Fixed here, so the proof never changes silently.
TOKENIZER_PROOF_TEXTS = (
    "Once upon a time, there was a little girl named Lily.",
    "naïve café, résumé, déjà vu, Ærøskøbing, Straße",
    "日本語のテキスト、中文文本和한국어",
    "emoji 🦙🚀👍🏽 and ❤️",
    "tabs\tand\t\tmore\ttabs",
    "spaces   runs     and  trailing   ",
    "lines\n\n\nand \n \n  indents",
    "digits 0 12 345 6789 3.14159 1e-9 2024-12-01 100000000",
    "Q: 12+30=? A: 42\nQ: reverse a b c A: c b a",
    "",
)
# Documents of deploykit's embedded corpus generator, frozen here (english_documents(1400, seed=7) and
# task_documents(300, seed=7, split="eval"); the plugin layer does not import deploykit.data): text in
# the style the models are trained on, from a seed no training run uses, none of it in the probes.
HELDOUT_TEXT = (
    "One day, there was a happy baker named Jack who lived in Fairport. Jack had a rabbit named Spot. Before "
    "dinner, Jack and Spot went to the shop. \"Look at my box!\" said Jack. \"It is heavy,\" said Anna. They ate "
    "soup because soup is what Jack likes best. The weather was cold, but nobody minded. The end.\n"
    "Long ago, there was a tall driver named Ella who lived in Maple Hill. Ella had a turtle named Pepper. "
    "There, she found a blue lamp. Ella held the lamp and felt excited. Pepper danced quickly. Nora and Ella "
    "slept together at the museum. Ella wore her blue scarf. At the end of the day, Ella went home to Maple "
    "Hill, sad.\n"
    "About Noah. Noah is a singer. He has a fish named Coco. His best friend is Emma. His favorite color is "
    "white. He lives in Riverton. His favorite food is eggs.\n"
    "Q: 85-68=? A: 17\nQ: reverse k d w A: w d k\nQ: j=4 s=6 c=7 w=7 ; s=? A: 6\nQ: 27+71=? A: 98\n"
    "Q: sort 92 71 79 12 62 A: 12 62 71 79 92\nQ: 24+95=? A: 119\nQ: 5*7=? A: 35\n"
)


def proof_texts(tokenizer: Any) -> list[str]:
    specials = [tokenizer.id_to_token(i) for i in (tokenizer.bos_id, tokenizer.eos_id)]
    return [*TOKENIZER_PROOF_TEXTS, f"{specials[0]}Hello{specials[1]}", f"a{specials[1]}{specials[0]} b"]


def prove_tokenizer(path: Path, tokenizer: Any) -> dict[str, Any]:
    """llama.cpp's tokenization of the proof texts against deploykit's; ParityError at the first difference."""
    texts = proof_texts(tokenizer)
    got_all = llama_tokenize(path, texts)
    for text, got in zip(texts, got_all):
        want = tokenizer.encode(text)
        if got != want:
            at = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            raise ParityError(
                f"tokenizer proof failed: llama.cpp tokenizes {text!r} differently from deploykit from token {at} "
                f"(llama.cpp {got[at:at + 4]}, deploykit {want[at:at + 4]}; {len(got)} vs {len(want)} tokens)",
                hint="nothing was written; the GGUF vocabulary or merges do not match tokenizer.json "
                "(or the tokenizer is one llama.cpp's gpt2 pre-tokenizer cannot express)")
    return {"texts": len(texts), "tokens": sum(len(t) for t in got_all), "identical": True}


def llama_tokenize(path: Path, texts: Sequence[str]) -> list[list[int]]:
    """llama.cpp's tokens for each text: special tokens parsed (as deploykit does), no bos added.

    The vocabulary alone is loaded through the C API (``llama_tokenize``, what ``Llama.tokenize``
    calls): no context, no weights.
    """
    import llama_cpp

    _quiet_llama_logs()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise ArtifactError(f"{path}: llama.cpp could not read this file's vocabulary",
                            hint="convert again; DEPLOYKIT_GGUF_VERBOSE=1 shows llama.cpp's reason")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        out = []
        for text in texts:
            data = text.encode("utf-8")
            room = len(data) + 8  # byte-level BPE: at most one token per byte
            buf = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, room, False, True)
            if n < 0:
                raise BackendError(f"{path}: llama_tokenize needed {-n} tokens for {text!r}, more than {room}",
                                   hint="report this")
            out.append(list(buf[:n]))
        return out
    finally:
        llama_cpp.llama_model_free(model)


def measure_quality(model: CausalLM, path: Path, tokenizer: Any, options: Any, *, threads: int | None) -> dict[str, Any]:
    """KL(p_fp32 ‖ p_gguf), top-1 agreement and perplexities on HELDOUT_TEXT, teacher-forced.

    Against deploykit's fp32 torch model, not against llama.cpp's own F16 file (what llama-perplexity
    --kl-divergence compares with). Also: what the served KV cache costs over the exact F32 one, and
    for MoE models the expert agreement with the fp32 router.
    """
    import torch

    cfg = model.config
    ids = tokenizer.encode(HELDOUT_TEXT, add_bos=True)[: cfg.max_seq_len]
    with torch.inference_mode():
        ref = model.eval()(torch.tensor([ids])).float().numpy()[0]  # (T, V)
    exact = GgufRunner(path, quant="?", threads=threads, kv_cache="f32")
    got = exact.forward(np.asarray([ids]))[0]  # (T, V)
    kl, top1 = _kl_top1(ref, got)
    ppl_ref, ppl = _perplexity(ref, ids), _perplexity(got, ids)
    facts: dict[str, Any] = {
        "tokens": len(ids), "kl_vs_fp32": kl, "top1_vs_fp32": top1, "ppl_fp32": ppl_ref, "ppl": ppl,
        "delta_ppl": ppl - ppl_ref, "delta_ppl_pct": 100 * (ppl / ppl_ref - 1),
        "max_abs_logit_vs_fp32": float(np.abs(ref - got).max())}
    if options.kv_cache != "f32":
        served = GgufRunner(path, threads=threads, kv_cache=options.kv_cache, flash_attn=options.flash_attn)
        facts["served_kv_cache"] = {"type": options.kv_cache,
                                    "max_abs_logit_vs_f32_cache": float(np.abs(served.forward(np.asarray([ids]))[0] - got).max())}
    if cfg.is_moe:
        facts["experts"] = expert_agreement(model, path, ids, threads=threads)
    return facts


def _kl_top1(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    lp, lq = _log_softmax(ref), _log_softmax(got)  # (T, V)
    kl = np.maximum(np.sum(np.exp(lp) * (lp - lq), axis=-1), 0.0)  # (T,)
    return float(kl.mean()), float(np.mean(ref.argmax(-1) == got.argmax(-1)))


def _perplexity(logits: np.ndarray, ids: Sequence[int]) -> float:
    lp = _log_softmax(logits[:-1])  # (T-1, V): position t predicts token t+1
    return float(np.exp(-lp[np.arange(len(ids) - 1), ids[1:]].mean()))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def parity_note(cfg: ModelConfig, facts: dict[str, Any]) -> str:
    q, tok = facts["quality"], facts["tokenizer_proof"]
    parts = [f"tokenizer proof: {tok['texts']} texts tokenized identically by llama.cpp",
             f"on {q['tokens']} held-out tokens vs fp32 torch: KL {q['kl_vs_fp32']:.3g}, top-1 {q['top1_vs_fp32']:.3f}, "
             f"ppl {q['ppl_fp32']:.3f} -> {q['ppl']:.3f} ({q['delta_ppl_pct']:+.2f} %)",
             f"{facts['bits_per_weight']:.2f} bits per weight (file)",
             "parity measured with an F32 KV cache"]
    if "served_kv_cache" in q:
        s = q["served_kv_cache"]
        parts.append(f"served {s['type']} KV cache moves logits by {s['max_abs_logit_vs_f32_cache']:.3g} more")
    if "experts" in q and q["experts"].get("agreement") is not None:
        parts.append(f"llama.cpp picks the fp32 router's top-{cfg.top_k} experts for "
                     f"{q['experts']['agreement']:.1%} of (token, layer) pairs")
    if cfg.variant == "legacy":
        parts.append("llama.cpp's gpt2 graph uses tanh-approximated GELU (ggml_gelu, fp16 table) where deploykit's "
                     "legacy MLP uses exact erf GELU")
    return "; ".join(parts)


# -- MoE: which experts llama.cpp chose ------------------------------------------------------------
def expert_agreement(model: CausalLM, path: Path, ids: Sequence[int], *, threads: int | None) -> dict[str, Any]:
    """Share of (token, layer) pairs where llama.cpp's top-k expert set equals the fp32 router's.

    llama.cpp names each layer's chosen experts ``ffn_moe_topk-{layer}`` (int32 (T, k)) in its graph;
    the eval callback (``cb_eval``) asks for those tensors and copies them out after they are
    computed. deploykit's MoE layers record theirs (``last_experts``) on the same tokens.
    """
    import torch

    with torch.inference_mode():
        model.eval()(torch.tensor([list(ids)]))
    ref = [m.last_experts.numpy() for m in model.moe_layers()]  # L x (T, k)
    got = _llama_expert_choices(path, ids, threads=threads)
    if len(got) != len(ref):
        return {"agreement": None, "note": f"llama.cpp exposed {len(got)} of {len(ref)} layers' ffn_moe_topk tensors"}
    same = sum(int((np.sort(g, -1) == np.sort(r, -1)).all(-1).sum()) for g, r in zip(got, ref))
    return {"agreement": same / (len(ids) * len(ref)), "pairs": len(ids) * len(ref),
            "how": "llama.cpp graph tensors ffn_moe_topk-N via cb_eval vs the fp32 router's top-k"}


def _llama_expert_choices(path: Path, ids: Sequence[int], *, threads: int | None) -> list[np.ndarray]:
    """Run ``ids`` through llama.cpp's C API with an eval callback; the top-k experts per layer, (T, k) each."""
    import ctypes

    import llama_cpp

    ggml = _ggml_base()
    seen: dict[int, np.ndarray] = {}

    @llama_cpp.ggml_backend_sched_eval_callback
    def observe(tensor: int, ask: bool, user_data: int) -> bool:
        name = ggml.ggml_get_name(tensor).decode()
        if ask:  # "do you want this one?": only the expert choices
            return name.startswith("ffn_moe_topk-")
        head = _TensorHead.from_address(tensor)
        nbytes = ggml.ggml_nbytes(tensor)
        buf = (ctypes.c_uint8 * nbytes)()
        ggml.ggml_backend_tensor_get(tensor, buf, 0, nbytes)
        # (T, k) int32, read through ggml's strides: the tensor may be a view of the full argsort
        view = np.lib.stride_tricks.as_strided(np.frombuffer(buf, np.int32), shape=(head.ne[1], head.ne[0]),
                                               strides=(head.nb[1], head.nb[0]))
        seen[int(name.rsplit("-", 1)[1])] = view.copy()
        return True

    _quiet_llama_logs()
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = len(ids)
    params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
    params.n_threads = params.n_threads_batch = threads or max(os.cpu_count() // 2, 1)
    params.cb_eval = observe
    ctx = llama_cpp.llama_init_from_model(model, params)
    batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
    try:
        for i, t in enumerate(ids):  # every position outputs logits, so the last layer routes every token
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, True
            batch.seq_id[i][0] = 0
        batch.n_tokens = len(ids)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise BackendError(f"{path}: llama_decode failed while reading expert choices", hint="report this")
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return [seen[i] for i in sorted(seen)]


class _TensorHead:
    """The first fields of ``struct ggml_tensor`` (type, buffer, ne[4], nb[4]), unchanged in ggml since 2023."""

    @staticmethod
    def from_address(address: int) -> Any:
        import ctypes

        class Head(ctypes.Structure):
            _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                        ("nb", ctypes.c_size_t * 4)]

        return Head.from_address(address)


_GGML: Any = None


def _ggml_base() -> Any:
    """ggml's C library as shipped inside llama-cpp-python (which binds llama.h, not ggml.h)."""
    import ctypes

    import llama_cpp

    global _GGML
    if _GGML is None:
        lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        lib.ggml_get_name.restype, lib.ggml_get_name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        lib.ggml_nbytes.restype, lib.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
        lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        _GGML = lib
    return _GGML
