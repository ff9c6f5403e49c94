"""Hugging Face–compatible checkpoint folders: ``config.json`` + ``model.safetensors`` (+ tokenizer).

deploykit's module tree already uses Llama/Mixtral tensor names, so this module is the single place
that translates between deploykit and the three transformers families it maps onto:

=========  ====================  ==================================================
variant    transformers class    tensors that differ from deploykit's own names
=========  ====================  ==================================================
dense      LlamaForCausalLM      none
moe        MixtralForCausalLM    stacked ``experts.w1`` (E,F,D) <-> ``experts.{e}.w1.weight``
legacy     GPT2LMHeadModel       all (``transformer.h.N.attn.c_attn`` fused qkv, Conv1D = W^T)
=========  ====================  ==================================================

Weights are read with safetensors only: pickle files can run arbitrary code when loaded.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, ConfigError
from ..fsutil import atomic_folder
from .config import ModelConfig
from .schema import JsonObject, ListOf, non_negative, one_of, positive, read_json_object, relative_file
from .tokenizer import SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

if TYPE_CHECKING:  # torch is imported where tensors are made: the file names and configs above need none
    import torch

    from .graph import CausalLM

FORMAT_VERSION = 1
# Every file a checkpoint folder may hold is named here, so that serving code can tell a checkpoint
# from an artifact without knowing who wrote it (deploykit.deploy.runtime) and training adds only
# names declared below.
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES: tuple[str, ...] = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)
# What `deploykit train` adds beside the Hugging Face files: a training run folder is a checkpoint too.
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LOG_NAME = "train_log.jsonl"
PLOT_NAME = "loss.png"
STATE_DCP = "trainer_state.dcp"  # a torchrun run's model and optimizer shards (torch.distributed.checkpoint)
RUN_FILES: tuple[str, ...] = (STATE_JSON, STATE_TENSORS, LOG_NAME, PLOT_NAME, STATE_DCP)
# What `deploykit sft --method full` adds: its before/after report (the folder stays a checkpoint).
SFT_REPORT = "sft_report.json"
DPO_REPORT = "dpo_report.json"  # and `deploykit dpo`'s
# `deploykit rlhf`'s report, per-iteration log and reward/KL curves beside the tuned policy.
RLHF_REPORT = "rlhf_report.json"
RLHF_FILES: tuple[str, ...] = (RLHF_REPORT, "rlhf_log.jsonl", "rlhf.png")
CHECKPOINT_FILES = frozenset({CONFIG_NAME, GENERATION_CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, *TOKENIZER_FILES,
                              *RUN_FILES, SFT_REPORT, DPO_REPORT, *RLHF_FILES})
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# transformers model_type -> deploykit variant, for folders written by transformers itself.
HF_FAMILIES: dict[str, str] = {"llama": "dense", "mistral": "dense", "qwen2": "dense", "mixtral": "moe", "gpt2": "legacy"}


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------
def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json transformers reads for this model, plus deploykit's own exact config."""
    common = {
        "vocab_size": cfg.vocab_size,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": "float32",
        "deploykit": {"format_version": FORMAT_VERSION, "model_config": cfg.to_dict()},
    }
    if cfg.variant == "legacy":
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ffn_dim,
            "n_positions": cfg.max_seq_len, "activation_function": "gelu", "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
            **common,
        }
    llama = {
        "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "rope_theta": cfg.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_dropout": 0.0, **common,
    }
    if cfg.variant == "moe":
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "num_local_experts": cfg.n_experts, "num_experts_per_tok": cfg.top_k,
                "router_aux_loss_coef": cfg.router_aux_coef, "router_jitter_noise": 0.0,
                "sliding_window": None, **llama}
    if cfg.attn_bias:  # Qwen2 is the family with q/k/v biases and a bias-free o_proj
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False,
                "sliding_window": None, **llama}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False,
            "mlp_bias": False, **llama}


def from_hf_config(data: dict[str, Any], source: str = CONFIG_NAME) -> ModelConfig:
    """Read a config.json: deploykit's own block if present, else translate a transformers family.

    A malformed field is a ConfigError naming ``source`` and the key; a well-formed config of a
    model deploykit's graph cannot run (another family, a feature it lacks) is a CheckpointError.
    """
    doc = data if isinstance(data, JsonObject) else _config_object(data, source)
    own = doc.object("deploykit", default=None)
    if own is not None:
        own.field("format_version", int, default=FORMAT_VERSION, check=one_of(FORMAT_VERSION))
        block = own.object("model_config", default=None)
        if block is not None:
            return ModelConfig.from_dict(block)
    model_type = doc.field("model_type", str, default=None)
    if model_type not in HF_FAMILIES:
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported",
            hint=f"deploykit reads these transformers families: {', '.join(HF_FAMILIES)}",
        )
    if model_type == "gpt2":
        return _config_from_gpt2(doc)
    return _config_from_llama_like(doc, model_type)


CONFIG_HINT = ("restore config.json from the original checkpoint (deploykit train and transformers' "
               "save_pretrained write it)")


def _config_object(data: Any, source: str) -> JsonObject:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the model config must be a JSON object {{...}}, got {type(data).__name__}",
                          hint=CONFIG_HINT)
    return JsonObject(data, source=source, error=ConfigError, hint=CONFIG_HINT)


def _unsupported(source: str, what: str) -> CheckpointError:
    return CheckpointError(f"{source}: {what} is not supported by deploykit's graph",
                           hint="only the features of the stock Llama/Mistral/Qwen2/Mixtral/GPT-2 layouts are mapped")


def _size(doc: JsonObject, key: str, **default: Any) -> int:
    return doc.field(key, int, check=positive, **default)


def _token_ids(doc: JsonObject) -> dict[str, int]:
    def first(key: str) -> int | None:
        # transformers allows a list of ids (several eos tokens); deploykit stops on the first.
        v = doc.field(key, (int, ListOf(int)), default=None, check=_non_negative_ids)
        return (v[0] if v else None) if isinstance(v, list) else v

    bos, eos, pad = first("bos_token_id"), first("eos_token_id"), first("pad_token_id")
    eos = eos if eos is not None else 0
    return {"bos_token_id": bos if bos is not None else eos, "eos_token_id": eos,
            "pad_token_id": pad if pad is not None else eos}


def _non_negative_ids(value: int | list[int]) -> str | None:
    return None if all(v >= 0 for v in (value if isinstance(value, list) else [value])) else "must be >= 0"


def _rope(doc: JsonObject) -> tuple[str, float | None]:
    """(rope type, theta or None) from rope_parameters (transformers >= 4.56), else rope_scaling."""
    # Both are read, so a malformed one is reported even when the other one decides.
    found = [doc.object(key, default=None) for key in ("rope_parameters", "rope_scaling")]
    for rope in (r for r in found if r):
        kind = rope.field("rope_type", str, default=None) or rope.field("type", str, default="default")
        return kind, rope.field("rope_theta", float, default=None, check=positive)
    return "default", None


def _config_from_llama_like(doc: JsonObject, model_type: str) -> ModelConfig:
    source = doc.source
    act = doc.field("hidden_act", str, default="silu")
    if act != "silu":
        raise _unsupported(source, f"hidden_act={act!r}")
    rope_type, theta = _rope(doc)
    if rope_type != "default":
        raise _unsupported(source, f"rope_type={rope_type!r}")
    if theta is None:
        theta = doc.field("rope_theta", float, default=10000.0, check=positive)
    if model_type == "llama" and (doc.field("attention_bias", bool, default=False)
                                  or doc.field("mlp_bias", bool, default=False)):
        raise _unsupported(source, "Llama attention_bias/mlp_bias")
    max_len = _size(doc, "max_position_embeddings", default=2048)
    window = doc.field("sliding_window", int, default=None, check=positive)
    use_window = doc.field("use_sliding_window", bool, default=model_type != "qwen2")
    if window and use_window and window < max_len:
        # A window at least as long as the sequence has no effect, so cap the length at the window.
        max_len = window
    moe = model_type == "mixtral"
    heads = _size(doc, "num_attention_heads")
    return _model_config(
        doc, variant="moe" if moe else "dense",
        vocab_size=_size(doc, "vocab_size"), d_model=_size(doc, "hidden_size"), n_layers=_size(doc, "num_hidden_layers"),
        n_heads=heads, n_kv_heads=_size(doc, "num_key_value_heads", default=heads),
        head_dim=_size(doc, "head_dim", default=None), ffn_dim=_size(doc, "intermediate_size"), max_seq_len=max_len,
        rope_theta=theta, norm_eps=doc.field("rms_norm_eps", float, default=1e-6, check=positive),
        tie_embeddings=doc.field("tie_word_embeddings", bool, default=False), attn_bias=model_type == "qwen2",
        n_experts=doc.field("num_local_experts", int, default=0, check=non_negative) if moe else 0,
        top_k=doc.field("num_experts_per_tok", int, default=2, check=positive),
        router_aux_coef=doc.field("router_aux_loss_coef", float, default=0.01, check=non_negative), **_token_ids(doc),
    )


def _config_from_gpt2(doc: JsonObject) -> ModelConfig:
    act = doc.field("activation_function", str, default="gelu_new")
    if act != "gelu":
        # GPT-2's default gelu_new is the tanh approximation; deploykit's legacy MLP uses exact GELU.
        raise _unsupported(doc.source, f"activation_function={act!r} (only exact 'gelu')")
    if (doc.field("scale_attn_by_inverse_layer_idx", bool, default=False)
            or doc.field("reorder_and_upcast_attn", bool, default=False)):
        raise _unsupported(doc.source, "GPT-2 attention scaling variants")
    d = _size(doc, "n_embd")
    return _model_config(
        doc, variant="legacy", vocab_size=_size(doc, "vocab_size"), d_model=d, n_layers=_size(doc, "n_layer"),
        n_heads=_size(doc, "n_head"), ffn_dim=_size(doc, "n_inner", default=4 * d), max_seq_len=_size(doc, "n_positions"),
        norm_eps=doc.field("layer_norm_epsilon", float, default=1e-5, check=positive),
        tie_embeddings=doc.field("tie_word_embeddings", bool, default=True), **_token_ids(doc),
    )


def _model_config(doc: JsonObject, **fields: Any) -> ModelConfig:
    """ModelConfig from translated fields; a rule it enforces (n_heads divides hidden_size) names the file."""
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise ConfigError(f"{doc.source}: {e.args[0]} (translated from its {doc.field('model_type', str)} fields)",
                          hint=e.hint or CONFIG_HINT) from e


# ---------------------------------------------------------------------------------------------
# tensor names
# ---------------------------------------------------------------------------------------------
def to_hf_state_dict(model: CausalLM) -> dict[str, torch.Tensor]:
    """deploykit state dict -> the tensors transformers expects for this variant (contiguous, detached)."""
    cfg = model.config
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight")  # tied: transformers re-ties it from the embedding on load
    if cfg.variant == "moe":
        for key in [k for k in sd if k.endswith(("experts.w1", "experts.w2", "experts.w3"))]:
            stacked = sd.pop(key)  # (E, out, in)
            for e in range(stacked.shape[0]):
                sd[f"{key[:-3]}.{e}.{key[-2:]}.weight"] = stacked[e]
    elif cfg.variant == "legacy":
        sd = _to_gpt2(sd, cfg)
    return {k: v.contiguous() for k, v in sd.items()}


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig,
                       source: str | Path = "checkpoint") -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_hf_state_dict`: transformers tensor names -> deploykit's.

    ``source`` (the folder) is named in the CheckpointError for weights that do not fit ``cfg``."""
    if cfg.variant == "legacy":
        return _from_gpt2(sd, cfg, source)
    sd = dict(sd)
    if cfg.variant == "moe":
        pattern = re.compile(r"(.*\.block_sparse_moe\.experts)\.(\d+)\.(w[123])\.weight$")
        groups: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        for key in [k for k in sd if pattern.match(k)]:
            prefix, e, w = pattern.match(key).groups()
            groups.setdefault((prefix, w), {})[int(e)] = sd.pop(key)
        for (prefix, w), per_expert in groups.items():
            # len first: an edited n_experts of 10**9 must not build a list of that length
            if len(per_expert) != cfg.n_experts or sorted(per_expert) != list(range(cfg.n_experts)):
                raise CheckpointError(
                    f"{source}: {prefix}.{w}: found experts {sorted(per_expert)[:8]}, config says "
                    f"n_experts={cfg.n_experts}", hint="config.json does not match the weights")
            import torch

            sd[f"{prefix}.{w}"] = torch.stack([per_expert[e] for e in range(cfg.n_experts)])
    return sd


def _to_gpt2(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    import torch

    out = {"transformer.wte.weight": sd["model.embed_tokens.weight"],
           "transformer.wpe.weight": sd["model.embed_positions.weight"],
           "transformer.ln_f.weight": sd["model.norm.weight"], "transformer.ln_f.bias": sd["model.norm.bias"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(cfg.n_layers):
        p, h = f"model.layers.{i}.", f"transformer.h.{i}."
        for ours, theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
            out[h + theirs + ".weight"], out[h + theirs + ".bias"] = sd[p + ours + ".weight"], sd[p + ours + ".bias"]
        # GPT-2's Conv1D stores W^T (in, out); c_attn fuses q, k, v along the output dimension.
        qkv = [sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]
        out[h + "attn.c_attn.weight"] = torch.cat(qkv, 0).t()
        out[h + "attn.c_attn.bias"] = torch.cat([sd[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        for ours, theirs in (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                             ("mlp.down_proj", "mlp.c_proj")):
            out[h + theirs + ".weight"], out[h + theirs + ".bias"] = sd[p + ours + ".weight"].t(), sd[p + ours + ".bias"]
    return out


def _from_gpt2(sd: dict[str, torch.Tensor], cfg: ModelConfig, source: str | Path) -> dict[str, torch.Tensor]:
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}  # both GPT2Model and LMHead layouts
    try:
        out = {"model.embed_tokens.weight": sd["wte.weight"], "model.embed_positions.weight": sd["wpe.weight"],
               "model.norm.weight": sd["ln_f.weight"], "model.norm.bias": sd["ln_f.bias"]}
        if "lm_head.weight" in sd and not cfg.tie_embeddings:
            out["lm_head.weight"] = sd["lm_head.weight"]
        D = cfg.d_model
        for i in range(cfg.n_layers):
            p, h = f"model.layers.{i}.", f"h.{i}."
            for ours, theirs in (("input_layernorm", "ln_1"), ("post_attention_layernorm", "ln_2")):
                out[p + ours + ".weight"], out[p + ours + ".bias"] = sd[h + theirs + ".weight"], sd[h + theirs + ".bias"]
            w, b = sd[h + "attn.c_attn.weight"].t(), sd[h + "attn.c_attn.bias"]  # (3D, D), (3D,)
            for j, n in enumerate("qkv"):
                out[p + f"self_attn.{n}_proj.weight"] = w[j * D:(j + 1) * D]
                out[p + f"self_attn.{n}_proj.bias"] = b[j * D:(j + 1) * D]
            for ours, theirs in (("self_attn.o_proj", "attn.c_proj"), ("mlp.up_proj", "mlp.c_fc"),
                                 ("mlp.down_proj", "mlp.c_proj")):
                out[p + ours + ".weight"], out[p + ours + ".bias"] = sd[h + theirs + ".weight"].t(), sd[h + theirs + ".bias"]
    except KeyError as e:
        raise CheckpointError(f"{source}: GPT-2 checkpoint lacks tensor {e.args[0]!r}",
                              hint="config.json does not match the weights") from e
    return out


# ---------------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------------
def save_model(model: CausalLM, folder: str | Path, tokenizer: Any = None, *, overwrite: bool = False,
               extra_files: dict[str, str] | None = None) -> Path:
    """Write a checkpoint folder atomically (temp folder beside it, then rename).

    ``tokenizer`` is anything with ``save(folder)`` (deploykit.model.tokenizer.Tokenizer).
    ``extra_files`` maps file names to text written alongside (e.g. training state JSON).
    """
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    cfg = model.config
    with atomic_folder(folder, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(to_hf_config(cfg), indent=2) + "\n")
        (tmp / GENERATION_CONFIG_NAME).write_text(json.dumps({
            "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
            "max_length": cfg.max_seq_len}, indent=2) + "\n")
        tensors = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in to_hf_state_dict(model).items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return folder


def load_config(folder: str | Path) -> ModelConfig:
    folder = _checked_folder(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json", hint="a checkpoint folder holds config.json and model.safetensors")
    return from_hf_config(read_json_object(path, error=ConfigError, what="model config", hint=CONFIG_HINT), str(path))


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or sharded index), via safetensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = _checked_folder(folder)
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        files = _index_shards(folder, index)
    elif (folder / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{folder}: refusing to load pickle weights ({', '.join(pickles)}): unpickling can run arbitrary code",
                hint=("if you trust the source, convert it once to safetensors: python -c \"from transformers import "
                      f"AutoModelForCausalLM as M; M.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\""))
        raise CheckpointError(f"{folder}: no {WEIGHTS_NAME}", hint="a checkpoint folder holds config.json and model.safetensors")
    sd: dict[str, torch.Tensor] = {}
    for name in files:
        try:
            sd.update(load_file(str(folder / name)))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{folder / name}: corrupt or truncated safetensors file ({e})",
                                  hint="re-save the checkpoint; a copy that was cut short cannot be repaired") from e
    return sd


INDEX_HINT = ("restore model.safetensors.index.json and every model-*.safetensors shard it names from the "
              "original checkpoint")


def _index_shards(folder: Path, index: Path) -> list[str]:
    """The shard files a sharded checkpoint's index names: safetensors files inside ``folder``, all present."""
    doc = read_json_object(index, error=CheckpointError, what="safetensors index", hint=INDEX_HINT)
    weight_map = doc.mapping("weight_map", str, check=_shard_name)
    if not weight_map:
        doc.fail("weight_map", "is empty: it must map every tensor name to its shard file")
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise CheckpointError(f"{index}: weight_map names shard(s) that are not in {folder}: "
                              f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}", hint=INDEX_HINT)
    return shards


def _shard_name(name: str) -> str | None:
    # Only safetensors shards: an index pointing at .bin files must not smuggle a pickle past the refusal.
    return relative_file(name) or (None if name.endswith(".safetensors") else "must name a .safetensors file")


def load_model(folder: str | Path, *, dtype: torch.dtype | None = None) -> CausalLM:
    """Load a deploykit or transformers (Llama/Mistral/Qwen2/Mixtral/GPT-2) checkpoint folder (``dtype``:
    the floating-point tensors' type, default float32)."""
    import torch

    from .graph import CausalLM

    dtype = torch.float32 if dtype is None else dtype
    cfg = load_config(folder)
    sd = from_hf_state_dict(read_weights(folder), cfg, folder)
    check_config_fits(cfg, sd, Path(folder))
    with torch.device("meta"):
        model = CausalLM(cfg)
    _check_tensors(model, sd, Path(folder))
    model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()},
                          strict=False, assign=True)
    return model.finish_meta_load().eval()


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def check_config_fits(cfg: ModelConfig, tensors: dict[str, Any], folder: Path) -> None:
    """The weights could belong to ``cfg``, checked on names and element counts before any graph is
    built: a config.json edited to n_layers=10**9 or vocab_size=2**60 must be refused at once, not
    after building 10**9 modules or overflowing torch's size arithmetic. The exact per-tensor check
    comes after, on the meta-device graph (``_check_tensors``)."""
    hint = "was config.json edited or copied from another model? Restore the original pair"
    found = {int(m[1]) for k in tensors if (m := _LAYER.match(k))}
    if len(found) != cfg.n_layers or found != set(range(cfg.n_layers)):
        raise CheckpointError(f"{folder}: config.json does not match the weights: n_layers={cfg.n_layers}, "
                              f"the weights hold {len(found)} layer(s)", hint=hint)
    # Every size is a factor of some tensor, so bounding the parameter count bounds every size. Twice
    # the elements held, because packed formats and a stored tied head only ever hold more, not less.
    held = sum(math.prod(t.shape) for t in tensors.values())  # torch tensors or numpy arrays
    if cfg.num_params() > 2 * held + 4096:
        raise CheckpointError(f"{folder}: config.json does not match the weights: it describes "
                              f"{cfg.num_params():,} parameters, the weights hold {held:,} values", hint=hint)


def _check_tensors(model: CausalLM, sd: dict[str, torch.Tensor], folder: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight")
        sd.pop("lm_head.weight", None)  # some writers store the tied copy anyway
    problems = [f"missing {k}" for k in expected if k not in sd]
    problems += [f"unexpected {k}" for k in sd if k not in expected and not k.endswith("rotary_emb.inv_freq")]
    problems += [f"{k}: weights {tuple(sd[k].shape)} vs config {shape}" for k, shape in expected.items()
                 if k in sd and tuple(sd[k].shape) != shape]
    # Integer tensors would load and then fail in the first matmul: refuse them with the rest.
    problems += [f"{k}: dtype {sd[k].dtype}, expected floating point" for k in expected
                 if k in sd and not sd[k].is_floating_point()]
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{folder}: config.json does not match the weights: {'; '.join(problems[:5])}{more}",
                              hint="was config.json edited or copied from another model? Restore the original pair")


def _checked_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found",
                              hint="pass the folder written by `deploykit train` or transformers' save_pretrained")
    return folder
