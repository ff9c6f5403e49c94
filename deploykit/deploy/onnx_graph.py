"""The ONNX export every ONNX-based backend starts from (onnx, tensorrt): deploykit's CausalLM as one
merged KV-cache graph, with the model config stamped into the file's metadata.

    inputs   input_ids                    int64 (batch, seq)
             past_key_values.{i}.key      float32 (batch, kv_heads, past, head_dim)   i = 0..L-1
             past_key_values.{i}.value    float32 (batch, kv_heads, past, head_dim)
    outputs  logits                       float32 (batch, seq, vocab)
             present.{i}.key / .value     float32 (batch, kv_heads, past + seq, head_dim)

Core code: it imports onnx/torch inside functions and knows no backend; the onnx backend derives its
schemes from this graph, the tensorrt backend builds engines from it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ArtifactError, BackendError

if TYPE_CHECKING:
    from ..model.config import ModelConfig

EXTERNAL_DATA_BYTES = 1_800_000_000  # fp32 weight bytes above which weights go to an external .data file
META_CONFIG = "deploykit.config"  # metadata_props key: ModelConfig as JSON, so the .onnx file is self-describing
META_QUANT = "deploykit.quant"
# A folder where export_onnx keeps the graphs it exported, for the processes of one `deploykit bench` run:
# every onnx scheme (and tensorrt's) starts from the same fp32 export, which is most of a conversion.
# Unset (the default for `deploykit convert`), nothing is kept.
EXPORT_CACHE_ENV = "DEPLOYKIT_ONNX_EXPORT_CACHE"


# -- export ----------------------------------------------------------------------------------------
def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names, Optimum's vocabulary (past_key_values.{i}.key, present.{i}.key)."""
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", *past], ["logits", *present]


def export_onnx(model: Any, path: Path) -> dict[str, Any]:
    """Export a deploykit CausalLM as the merged KV-cache graph at ``path`` (fp32). Leaves ``model`` unchanged."""
    import torch
    from torch.export import Dim

    from ..model.graph import CausalLM, KVCache

    if not isinstance(model, CausalLM):
        raise BackendError(f"onnx export expects a deploykit CausalLM, got {type(model).__name__}",
                           hint="load the checkpoint with deploykit.model.checkpoint.load_model(folder)")
    cfg = model.config
    cached = _cache_entry(model)
    if cached is not None and (cached / "model.onnx").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached / "model.onnx", path)
        return json.loads((cached / "facts.json").read_text())
    # The sorted MoE dispatch has data-dependent shapes (.tolist()); the dense one computes the same
    # function with static shapes. Switch on a copy so the caller's model keeps its fast path.
    work = shallow_copy(model)
    work.set_moe_dispatch("dense")
    L = cfg.n_layers

    class WithPast(torch.nn.Module):
        def __init__(self, lm: CausalLM) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            cache = KVCache(L)
            cache.keys[:] = past[0::2]  # each (B, kv, P, hd)
            cache.values[:] = past[1::2]
            logits = self.lm(input_ids, kv_cache=cache)  # (B, T, V)
            present = [t for i in range(L) for t in (cache.keys[i], cache.values[i])]  # (B, kv, P+T, hd)
            return (logits, *present)

    # Sample sizes avoid 0 and 1, which torch.export would specialise; the graph still runs with
    # past = 0 and seq = 1 because nothing in it branches on them (tests cover both).
    B, T, P = 2, 3, 2
    input_ids = torch.randint(0, cfg.vocab_size, (B, T))
    past = tuple(torch.zeros(B, cfg.n_kv_heads, P, cfg.head_dim) for _ in range(2 * L))
    batch, seq, past_len = Dim("batch"), Dim("seq"), Dim("past")
    dynamic_shapes = ({0: batch, 1: seq}, tuple({0: batch, 2: past_len} for _ in range(2 * L)))
    inputs, outputs = io_names(L)
    with torch.no_grad():
        program = torch.onnx.export(WithPast(work).eval(), (input_ids, past), dynamo=True, dynamic_shapes=dynamic_shapes,
                                    input_names=inputs, output_names=outputs, optimize=True, verbose=False)
    weight_bytes = sum(p.numel() * 4 for p in work.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    opset = stamp_metadata(path, cfg.to_dict(), "fp32")
    facts = {"opset": opset, "graph": "merged (past >= 0)", "inputs": inputs, "outputs": outputs}
    if cfg.is_moe:
        facts["parity_note"] = ("MoE exported with dense dispatch: every expert runs on every token and the "
                                "router's top-k weights combine them (same function, E/k x the expert FLOPs)")
    if cached is not None and weight_bytes <= EXTERNAL_DATA_BYTES:  # one self-contained file to copy
        _store(cached, path, facts)
    return facts


def _cache_entry(model: Any) -> Path | None:
    """The folder for this model's export in ``$DEPLOYKIT_ONNX_EXPORT_CACHE``, or None when unset.

    Keyed by everything the exported file depends on: the weights and buffers, the config, this
    module's code and the torch and onnx versions."""
    root = os.environ.get(EXPORT_CACHE_ENV)
    if not root:
        return None
    import onnx
    import torch

    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    h.update(Path(__file__).read_bytes())
    h.update(f"{torch.__version__} {onnx.__version__}".encode())
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name in sorted(tensors):
        t = tensors[name].detach().float().contiguous()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.numpy().tobytes())
    return Path(root) / h.hexdigest()[:32]


def _store(entry: Path, path: Path, facts: dict[str, Any]) -> None:
    """Keep the export: written beside the entry and renamed, so a reader sees all of it or nothing."""
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path, tmp / "model.onnx")
    (tmp / "facts.json").write_text(json.dumps(facts))
    try:
        tmp.rename(entry)
    except OSError:  # another process stored it first: theirs is the same file
        shutil.rmtree(tmp, ignore_errors=True)


def shallow_copy(model: Any) -> Any:
    """A new CausalLM sharing ``model``'s weights, in fp32 eval mode.

    Not copy.deepcopy: a model fresh from a training step holds non-leaf tensors (the MoE layers'
    last_aux_loss) that deepcopy refuses; and sharing weights costs no memory.
    """
    import torch

    from ..model.graph import CausalLM

    with torch.device("meta"):
        work = CausalLM(model.config)
    work.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, assign=True)
    if model.config.tie_embeddings:
        work.lm_head.weight = work.model.embed_tokens.weight  # assign=True loaded two separate tensors
    for name, buf in model.named_buffers(recurse=False):  # non-persistent buffers (inv_freq) are not in state_dict
        work.register_buffer(name, buf.float().clone(), persistent=False)
    return work.eval()


def stamp_metadata(path: Path, config: dict[str, Any], quant: str) -> int:
    """Record the model config and scheme inside the .onnx file; returns the default-domain opset."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)  # external tensors keep pointing at .data
    props = {p.key: p.value for p in proto.metadata_props}
    props.update({META_CONFIG: json.dumps(config), META_QUANT: quant})
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def check_graph(path: Path) -> None:
    """onnx.checker on the path (not the proto), which works past 2 GB with external data."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise BackendError(f"{path}: onnx.checker rejected the graph ({e})",
                           hint="report this with the model config; try another opset or torch version") from e


def config_from_metadata(meta: dict[str, str], path: Path) -> ModelConfig:
    """The ModelConfig stamped into the graph's metadata (``stamp_metadata``), refused naming the key
    when it is absent or malformed (a graph not written by this backend, or edited)."""
    from ..model.config import ModelConfig
    from ..model.schema import parse_json_object

    hint = "re-run deploykit convert --backend onnx"
    if META_CONFIG not in meta:
        raise ArtifactError(f"{path}: no {META_CONFIG} metadata; not written by deploykit's onnx backend", hint=hint)
    doc = parse_json_object(meta[META_CONFIG], source=f"{path} (metadata {META_CONFIG})", error=ArtifactError,
                            what="model config", hint=hint)
    return ModelConfig.from_dict(doc)


def toposort(graph: Any) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (onnx.checker's
    rule); rewrites that append nodes (fp16's input casts, inserted Q/DQ pairs) need it."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise BackendError(f"graph has a cycle or a missing input at node {rest[0].name!r}",
                               hint="report this with the model config")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
