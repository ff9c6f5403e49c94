"""The GGUF file both ways: llama.cpp's tensor names and keys for a deploykit model, the tokenizer, and
reading a GGUF back into deploykit (``deploykit import-gguf``).

One vocabulary serves both directions: :data:`LLAMA_LAYER` and friends pair each llama.cpp tensor of a
block with deploykit's (Hugging Face) name and how it is stored, so :func:`gguf_tensors` and
:func:`deploykit_state` cannot drift apart. Names and key spellings are the ``gguf`` package's
(``gguf.GGUFWriter.add_*``, llama.cpp's own gguf-py); nothing here writes GGUF bytes by hand.

Reading accepts what deploykit can represent: the ``llama`` (dense, MoE) and ``gpt2`` architectures,
tensors in F32, F16, BF16 or Q8_0 (dequantized to fp32 with ``gguf.quants``), byte-level BPE
vocabularies. Anything else is refused with the reason before anything is written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from deploykit.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from deploykit.model.config import ModelConfig
    from deploykit.model.graph import CausalLM

CONFIG_KEY = "deploykit.model_config"  # deploykit's exact ModelConfig as JSON: the file describes itself
ARCHITECTURES = {"llama": ("dense", "moe"), "gpt2": ("legacy",)}
IMPORTABLE_TYPES = ("F32", "F16", "BF16", "Q8_0")
MAGIC = b"GGUF"

# -- the one vocabulary: deploykit tensor names <-> llama.cpp's ------------------------------------
# (gguf name, deploykit name under model.layers.N., how it is stored). "q"/"k": rotary rows permuted.
LLAMA_LAYER = (
    ("attn_norm.weight", "input_layernorm.weight", ""),
    ("ffn_norm.weight", "post_attention_layernorm.weight", ""),
    ("attn_q.weight", "self_attn.q_proj.weight", "q"),
    ("attn_k.weight", "self_attn.k_proj.weight", "k"),
    ("attn_v.weight", "self_attn.v_proj.weight", ""),
    ("attn_output.weight", "self_attn.o_proj.weight", ""),
)
LLAMA_BIAS = (("attn_q.bias", "self_attn.q_proj.bias", "q"), ("attn_k.bias", "self_attn.k_proj.bias", "k"),
              ("attn_v.bias", "self_attn.v_proj.bias", ""))
LLAMA_MLP = (("ffn_gate.weight", "mlp.gate_proj.weight", ""), ("ffn_up.weight", "mlp.up_proj.weight", ""),
             ("ffn_down.weight", "mlp.down_proj.weight", ""))
# Stacked experts: deploykit's (E, F, D) / (E, D, F) is exactly llama.cpp's ne (D, F, E) / (F, D, E).
LLAMA_MOE = (("ffn_gate_inp.weight", "block_sparse_moe.gate.weight", ""),
             ("ffn_gate_exps.weight", "block_sparse_moe.experts.w1", ""),
             ("ffn_up_exps.weight", "block_sparse_moe.experts.w3", ""),
             ("ffn_down_exps.weight", "block_sparse_moe.experts.w2", ""))
GPT2_LAYER = tuple(
    (f"{g}.{p}", f"{d}.{p}", "") for g, d in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm"),
                                              ("attn_output", "self_attn.o_proj"), ("ffn_up", "mlp.up_proj"),
                                              ("ffn_down", "mlp.down_proj")) for p in ("weight", "bias"))
GPT2_QKV = ("attn_qkv.weight", "attn_qkv.bias")  # q, k and v concatenated along the output rows


def layer_table(cfg: ModelConfig) -> tuple[tuple[str, str, str], ...]:
    if cfg.variant == "legacy":
        return GPT2_LAYER
    return LLAMA_LAYER + (LLAMA_BIAS if cfg.attn_bias else ()) + (LLAMA_MOE if cfg.is_moe else LLAMA_MLP)


def to_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
    """Rotary rows of one projection from deploykit's half-split layout to llama.cpp's adjacent pairs.

    w (heads*hd, ...) -> (heads, 2, hd/2, ...) -> swap -> (heads, hd/2, 2, ...): row j of a head and
    row j + hd/2 (one rotated pair in deploykit) become rows 2j and 2j+1.
    """
    rest = w.shape[1:]
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def from_interleaved(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`to_interleaved`: (heads, hd/2, 2, ...) -> (heads, 2, hd/2, ...)."""
    rest = w.shape[1:]
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model: CausalLM) -> dict[str, np.ndarray]:
    """deploykit's fp32 state as llama.cpp's tensors (numpy shapes; ggml's ne is the reverse)."""
    cfg = model.config
    sd = {k: v.detach().float().contiguous().numpy() for k, v in model.state_dict().items()}
    heads = {"q": cfg.n_heads, "k": cfg.n_kv_heads}
    out = {"token_embd.weight": sd["model.embed_tokens.weight"], "output_norm.weight": sd["model.norm.weight"]}
    if cfg.variant == "legacy":
        out["position_embd.weight"] = sd["model.embed_positions.weight"]
        out["output_norm.bias"] = sd["model.norm.bias"]
    if not cfg.tie_embeddings:  # tied: llama.cpp reuses token_embd as the output, as deploykit does
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        ours, theirs = f"model.layers.{i}.", f"blk.{i}."
        for g, d, kind in layer_table(cfg):
            w = sd[ours + d]
            out[theirs + g] = to_interleaved(w, heads[kind]) if kind else w
        if cfg.variant == "legacy":
            for g, part in zip(GPT2_QKV, ("weight", "bias")):
                out[theirs + g] = np.concatenate([sd[f"{ours}self_attn.{n}_proj.{part}"] for n in "qkv"])  # (3D, ...)
    return out


def hyperparameters(writer: Any, cfg: ModelConfig) -> None:
    """The ``{arch}.*`` keys llama.cpp reads to build the graph (everything it would otherwise guess)."""
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.ffn_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    if cfg.variant == "legacy":
        writer.add_layer_norm_eps(cfg.norm_eps)
        return
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.is_moe:
        writer.add_expert_count(cfg.n_experts)
        writer.add_expert_used_count(cfg.top_k)


# -- writing ---------------------------------------------------------------------------------------
def write_gguf(model: CausalLM, tokenizer: Any, path: Path, *, source: Path | None = None) -> dict[str, Any]:
    """Write ``model`` as an F32 GGUF at ``path`` with gguf.GGUFWriter; returns facts for the manifest."""
    import gguf

    cfg = model.config
    arch = "gpt2" if cfg.variant == "legacy" else "llama"
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"deploykit {cfg.variant} {cfg.num_params() / 1e6:.1f}M")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    hyperparameters(writer, cfg)
    vocab = tokenizer_fields(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split regex, which deploykit's ByteLevel(use_regex=True) uses
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(True)  # deploykit prompts start with bos, as Llama's tokenizer does
    writer.add_add_eos_token(False)
    chat_template = _chat_template(source)
    if chat_template:  # from the checkpoint's tokenizer_config.json, when it has one
        writer.add_chat_template(chat_template)
    writer.add_string(CONFIG_KEY, json.dumps(cfg.to_dict()))
    tensors = gguf_tensors(model)
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"architecture": arch, "tensors": len(tensors), "vocab_padding": vocab["padding"]}


def tokenizer_fields(tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    """tokenizer.ggml.* lists for a deploykit (Hugging Face byte-level BPE) tokenizer, padded to vocab_size.

    Special added tokens are CONTROL (llama.cpp parses them in text only with special=True, as
    deploykit always does), other added tokens USER_DEFINED, ids the tokenizer lacks UNUSED.
    """
    from gguf import TokenType

    data = json.loads(tokenizer.hf.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ConfigError(f"tokenizer model {model.get('type')!r} cannot go into a GGUF file here",
                          hint="the gguf backend writes byte-level BPE tokenizers (deploykit's own, GPT-2 style)")
    if tokenizer.vocab_size > vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocab_size={vocab_size}",
                          hint="convert the checkpoint with the tokenizer it was trained with")
    tokens: list[str | None] = [None] * vocab_size
    for token, i in tokenizer.hf.get_vocab(with_added_tokens=True).items():
        tokens[i] = token
    types = [TokenType.NORMAL] * vocab_size
    for added in data.get("added_tokens", []):
        types[added["id"]] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    padding = [i for i, t in enumerate(tokens) if t is None]
    for i in padding:  # the model's embedding may be larger than the tokenizer (rounded vocab_size)
        tokens[i], types[i] = f"<|unused_{i}|>", TokenType.UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges, "padding": len(padding)}


def _chat_template(source: Path | None) -> str | None:
    config = Path(source) / "tokenizer_config.json" if source is not None else None
    if config is None or not config.is_file():
        return None
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    return template if isinstance(template, str) else None



# -- reading ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GgufContents:
    """What a GGUF file holds, in deploykit's terms."""

    config: ModelConfig
    state: dict[str, np.ndarray]  # deploykit (Hugging Face) names, fp32, numpy shapes
    tokenizer: Any  # deploykit.model.tokenizer.Tokenizer, or None when the vocabulary is not byte-level BPE
    facts: dict[str, Any]


def _bad(path: Path, what: str, hint: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}", hint=hint)


def open_reader(path: Path) -> Any:
    """A gguf.GGUFReader over ``path``, after the checks that give a truncated or foreign file a clear error."""
    import gguf

    if not path.is_file():
        raise _bad(path, "no such GGUF file", "pass the path of a .gguf file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise _bad(path, f"not a GGUF file (it starts with {magic!r}, a GGUF file with {MAGIC!r})",
                   "pass a .gguf file written by llama.cpp's converter, llama-quantize or deploykit convert --backend gguf")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, OSError) as e:  # gguf raises these on a short header or tensor data
        raise _bad(path, f"truncated or corrupt GGUF file of {path.stat().st_size} bytes ({e})",
                   "copy the file again; a file cut short cannot be read") from e
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise _bad(path, f"truncated GGUF file: {size} bytes, its tensors need {end}",
                   "copy the file again; a file cut short cannot be read")
    return reader


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf(path: str | Path) -> GgufContents:
    """Read a llama/gpt2 GGUF into deploykit's config, fp32 tensors and tokenizer (CheckpointError if it can't)."""
    path = Path(path)
    reader = open_reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise _bad(path, f"GGUF architecture {arch!r} is not one deploykit can represent",
                   f"deploykit imports these llama.cpp architectures: {', '.join(ARCHITECTURES)} (Llama/Mistral/Mixtral, GPT-2)")
    tensors = dequantized(reader, path)
    config = config_from_gguf(reader, arch, tensors, path)
    state = deploykit_state(tensors, config, path)
    tokenizer, note = tokenizer_from_gguf(reader, path)
    facts = {"architecture": arch, "variant": config.variant, "tensors": len(tensors), "parameters": config.num_params(),
             "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}), "tokenizer": note,
             "config_from": "deploykit key" if CONFIG_KEY in reader.fields else f"{arch}.* keys"}
    return GgufContents(config=config, state=state, tokenizer=tokenizer, facts=facts)


def dequantized(reader: Any, path: Path) -> dict[str, np.ndarray]:
    """Every tensor as fp32 in numpy shape (ggml's ne reversed); refuses types deploykit does not import."""
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        if t.tensor_type.name not in IMPORTABLE_TYPES:
            raise _bad(path, f"tensor {t.name} is {t.tensor_type.name}; deploykit imports {', '.join(IMPORTABLE_TYPES)}",
                       "requantize it first: llama-quantize --allow-requantize FILE OUT.gguf Q8_0 (or F16)")
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        out[t.name] = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    return out


# Keys that change what llama.cpp computes for llama/gpt2 and that deploykit's graph has no form for.
_UNREPRESENTABLE = ("rope.scaling.type", "attention.sliding_window", "expert_shared_count", "logit_scale",
                    "attn_logit_softcapping", "final_logit_softcapping", "rope.scaling.factor")


def config_from_gguf(reader: Any, arch: str, tensors: dict[str, np.ndarray], path: Path) -> ModelConfig:
    """deploykit's exact config when deploykit wrote the file, else one built from the ``{arch}.*`` keys."""
    from deploykit.model.config import ModelConfig

    own = _field(reader, CONFIG_KEY)
    try:
        if own is not None:
            return ModelConfig.from_dict(json.loads(own))
        for key in _UNREPRESENTABLE:
            value = _field(reader, f"{arch}.{key}")
            if value not in (None, "none", 0, 1.0):
                raise _bad(path, f"{arch}.{key}={value!r} is not representable in deploykit's graph",
                           "deploykit imports plain Llama/Mistral/Mixtral and GPT-2 models")
        return _llama_config(reader, tensors, path) if arch == "llama" else _gpt2_config(reader, tensors)
    except ConfigError as e:
        raise _bad(path, f"its hyper-parameters do not make a valid deploykit model ({e})",
                   "deploykit imports plain Llama/Mistral/Mixtral and GPT-2 models") from e


def _f32(value: Any) -> float:
    """A float32 key as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))  # str: the shortest decimal that reads back as the same float32


def _token_ids(reader: Any) -> dict[str, int]:
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id", 0))
    bos = int(_field(reader, "tokenizer.ggml.bos_token_id", eos))
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", eos))}


def _llama_config(reader: Any, tensors: dict[str, np.ndarray], path: Path) -> ModelConfig:
    from deploykit.model.config import ModelConfig

    k = lambda name, default=None: _field(reader, f"llama.{name}", default)  # noqa: E731
    d, heads = int(k("embedding_length")), int(k("attention.head_count"))
    head_dim = int(k("attention.key_length", d // heads))
    if int(k("rope.dimension_count", head_dim)) != head_dim or int(k("attention.value_length", head_dim)) != head_dim:
        raise _bad(path, "partial rotary or value heads of another size are not representable in deploykit's graph",
                   "deploykit imports plain Llama/Mistral/Mixtral models")
    experts = int(k("expert_count", 0))
    up = tensors["blk.0.ffn_up_exps.weight" if experts else "blk.0.ffn_up.weight"]  # (E, F, D) or (F, D)
    return ModelConfig(
        variant="moe" if experts else "dense", vocab_size=tensors["token_embd.weight"].shape[0], d_model=d,
        n_layers=int(k("block_count")), n_heads=heads, n_kv_heads=int(k("attention.head_count_kv", heads)),
        head_dim=head_dim, ffn_dim=int(up.shape[-2]), max_seq_len=int(k("context_length", 2048)),
        rope_theta=_f32(k("rope.freq_base", 10000.0)), norm_eps=_f32(k("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors, attn_bias="blk.0.attn_q.bias" in tensors,
        n_experts=experts, top_k=int(k("expert_used_count", 2)), **_token_ids(reader))


def _gpt2_config(reader: Any, tensors: dict[str, np.ndarray]) -> ModelConfig:
    from deploykit.model.config import ModelConfig

    k = lambda name, default=None: _field(reader, f"gpt2.{name}", default)  # noqa: E731
    d = int(k("embedding_length"))
    return ModelConfig(
        variant="legacy", vocab_size=tensors["token_embd.weight"].shape[0], d_model=d, n_layers=int(k("block_count")),
        n_heads=int(k("attention.head_count")), ffn_dim=int(k("feed_forward_length", 4 * d)),
        max_seq_len=tensors["position_embd.weight"].shape[0], norm_eps=_f32(k("attention.layer_norm_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in tensors, **_token_ids(reader))


def deploykit_state(tensors: dict[str, np.ndarray], cfg: ModelConfig, path: Path) -> dict[str, np.ndarray]:
    """The inverse of :func:`gguf_tensors`: llama.cpp's tensors -> deploykit's names, checked against ``cfg``."""
    left = dict(tensors)
    take = lambda name: left.pop(name) if name in left else _missing(path, name)  # noqa: E731
    out = {"model.embed_tokens.weight": take("token_embd.weight"), "model.norm.weight": take("output_norm.weight")}
    if cfg.variant == "legacy":
        out["model.embed_positions.weight"] = take("position_embd.weight")
        out["model.norm.bias"] = take("output_norm.bias")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = take("output.weight")
    heads = {"q": cfg.n_heads, "k": cfg.n_kv_heads}
    for i in range(cfg.n_layers):
        ours, theirs = f"model.layers.{i}.", f"blk.{i}."
        for g, d, kind in layer_table(cfg):
            w = take(theirs + g)
            out[ours + d] = from_interleaved(w, heads[kind]) if kind else w
        if cfg.variant == "legacy":
            for g, part in zip(GPT2_QKV, ("weight", "bias")):
                for n, w in zip("qkv", np.split(take(theirs + g), 3)):  # (3D, ...) -> 3 x (D, ...)
                    out[f"{ours}self_attn.{n}_proj.{part}"] = w
    if left:
        names = sorted(left)
        raise _bad(path, f"tensors deploykit's {cfg.variant} graph has no place for: {', '.join(names[:5])}"
                   f"{f' (+{len(names) - 5} more)' if len(names) > 5 else ''}",
                   "this GGUF uses a feature deploykit cannot represent (rope_freqs: Llama 3 rope scaling, ...)")
    return out


def _missing(path: Path, name: str) -> Any:
    raise _bad(path, f"tensor {name} is missing", "the file is incomplete or not a llama/gpt2 model")


def tokenizer_from_gguf(reader: Any, path: Path) -> tuple[Any, str]:
    """A deploykit Tokenizer rebuilt from ``tokenizer.ggml.*`` (byte-level BPE only), and what was done."""
    import tokenizers
    from gguf import TokenType
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

    from deploykit.model.tokenizer import Tokenizer

    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in ("gpt-2", "default"):
        return None, f"not imported: tokenizer.ggml.model={kind!r}, pre={pre!r} (deploykit reads GPT-2 byte-level BPE)"
    tokens, types = _field(reader, "tokenizer.ggml.tokens"), _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges", [])]
    keep = [i for i, t in enumerate(types) if t != TokenType.UNUSED]  # padding rows of a rounded vocab_size
    hf = tokenizers.Tokenizer(models.BPE(vocab={tokens[i]: i for i in keep}, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True, normalized=False) for i in keep if types[i] == TokenType.CONTROL]
    hf.add_special_tokens(special)
    hf.add_tokens([AddedToken(tokens[i], normalized=False) for i in keep if types[i] == TokenType.USER_DEFINED])
    ids = _token_ids(reader)
    bos = tokens[ids["bos_token_id"]]
    hf.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                                      special_tokens=[(bos, ids["bos_token_id"])])
    tok = Tokenizer(hf, bos_id=ids["bos_token_id"], eos_id=ids["eos_token_id"], pad_id=ids["pad_token_id"])
    return tok, f"byte-level BPE, {len(keep)} tokens, {len(merges)} merges"


def build_model(contents: GgufContents, path: Path) -> CausalLM:
    """A deploykit CausalLM holding ``contents`` (shapes checked against its config)."""
    import torch

    from deploykit.model.graph import CausalLM

    with torch.device("meta"):
        model = CausalLM(contents.config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if contents.config.tie_embeddings:
        expected.pop("lm_head.weight")
    wrong = [f"{k}: {contents.state[k].shape} vs {shape}" for k, shape in expected.items()
             if k in contents.state and contents.state[k].shape != shape]
    if wrong or set(expected) != set(contents.state):
        raise _bad(path, f"tensor shapes do not match its hyper-parameters: {'; '.join(wrong[:3]) or 'names differ'}",
                   "the file's {arch}.* keys and its tensors disagree; re-create it with llama.cpp's converter")
    model.load_state_dict({k: torch.tensor(v) for k, v in contents.state.items()},  # copies: the reader's arrays are read-only maps
                          strict=False, assign=True)
    return model.finish_meta_load().eval()


def import_gguf(path: str | Path, out: str | Path, *, force: bool = False) -> dict[str, Any]:
    """GGUF file -> Hugging Face checkpoint folder ``out`` (deploykit's checkpoint writer, atomically).

    Everything is read and checked before the folder is written, so a bad file leaves nothing behind.
    """
    from deploykit.fsutil import Destination
    from deploykit.model.checkpoint import CHECKPOINT_FILES, save_model

    path, out = Path(path), Path(out)
    # --force replaces only a checkpoint folder (nothing in it but checkpoint files), never the GGUF's own
    # folder or one around it; checked before the slow part.
    dest = Destination(out, what="checkpoint", force=force, sources=(path,),
                       is_own=lambda f: {p.name for p in f.iterdir()} <= CHECKPOINT_FILES,
                       need_bytes=2 * path.stat().st_size if path.is_file() else 0)
    dest.check()
    contents = read_gguf(path)
    model = build_model(contents, path)
    with dest.write() as tmp:
        save_model(model, tmp, contents.tokenizer, overwrite=True)  # tmp exists (empty): written into
    return {"source": str(path), "out": str(out), **contents.facts}


