"""deploykit-echo: a deploykit backend that stores fp32 safetensors and runs them with numpy.

Small on purpose: it shows everything a backend must do (declare schemes, convert, load a Runner)
and nothing else. deploykit does the rest: temporary folder, tokenizer copy, parity proof, manifest.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

import deploykit
from deploykit.backend import (EXACT, Backend, ConvertContext, Runner, RunnerInfo, Scheme, as_int64_batch,
                               load_tokenizer, model_files)

WEIGHTS = "echo.safetensors"


class EchoRunner(Runner):
    """Numpy forward pass of deploykit's dense/MoE graph; recomputes every step (no KV cache)."""

    def __init__(self, w: dict[str, np.ndarray], cfg: dict[str, Any], tokenizer: Any, files: dict[str, int]) -> None:
        self.w, self.cfg, self.tokenizer = w, cfg, tokenizer
        self.eos_token_id = tokenizer.eos_id if tokenizer is not None else cfg["eos_token_id"]
        self.max_length = cfg["max_seq_len"]
        self.info = RunnerInfo(backend="echo", quant="fp32", kv_cache=False, size_bytes=sum(files.values()), files=files,
                               vocab_size=cfg["vocab_size"], max_length=cfg["max_seq_len"],
                               details={"numpy": np.__version__})
        hd = cfg["head_dim"]
        self.inv_freq = 1.0 / cfg["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float32) / hd)

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return self.w[name] * (x / np.sqrt((x * x).mean(-1, keepdims=True) + self.cfg["norm_eps"]))

    def _rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        half = x.shape[-1] // 2
        return x * cos + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin

    def _mlp(self, h: np.ndarray, p: str) -> np.ndarray:
        silu = lambda z: z / (1 + np.exp(-z))  # noqa: E731
        if self.cfg["variant"] != "moe":
            w = self.w
            return (silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        m = p + "block_sparse_moe."
        logits = h @ self.w[m + "gate.weight"].T  # (N, E)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        top = np.argsort(-probs, -1, kind="stable")[:, : self.cfg["top_k"]]  # (N, k)
        out = np.zeros_like(h)
        for n in range(h.shape[0]):
            weights = probs[n, top[n]] / probs[n, top[n]].sum()
            for e, g in zip(top[n], weights):
                w1, w2, w3 = (self.w[f"{m}experts.{w}"][e] for w in ("w1", "w2", "w3"))
                out[n] += g * ((silu(h[n] @ w1.T) * (h[n] @ w3.T)) @ w2.T)
        return out

    def forward(self, input_ids: Any) -> np.ndarray:
        ids = as_int64_batch(input_ids)
        c, w = self.cfg, self.w
        B, T = ids.shape
        H, KV, hd = c["n_heads"], c["n_kv_heads"], c["head_dim"]
        freqs = np.arange(T, dtype=np.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))
        mask = np.triu(np.full((T, T), -np.inf, dtype=np.float32), 1)
        x = w["model.embed_tokens.weight"][ids]  # (B, T, D)
        for i in range(c["n_layers"]):
            p = f"model.layers.{i}."
            h = self._norm(x, p + "input_layernorm.weight")
            q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(B, T, H, hd).transpose(0, 2, 1, 3)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(B, T, KV, hd).transpose(0, 2, 1, 3)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)  # (B, H, T, hd)
            att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + mask
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, H * hd)
            x = x + y @ w[p + "self_attn.o_proj.weight"].T
            h = self._norm(x, p + "post_attention_layernorm.weight")
            x = x + self._mlp(h.reshape(B * T, -1), p).reshape(B, T, -1)
        return (self._norm(x, "model.norm.weight") @ w["lm_head.weight"].T).astype(np.float32)


class EchoBackend(Backend):
    name = "echo"
    description = "example plugin: fp32 safetensors run by numpy (examples/deploykit-echo)"
    schemes = (Scheme("fp32", "full precision, numpy forward pass", EXACT),)
    artifact_files = (WEIGHTS, "echo_config.json")
    platforms = "CPU (numpy)"

    def versions(self) -> dict[str, str]:
        return {"numpy": np.__version__}

    def unsupported(self, scheme: Scheme, config: deploykit.ModelConfig) -> str | None:
        # convert refuses with this reason (and the bench shows "not applicable") before anything is written
        if config.variant not in ("dense", "moe") or config.attn_bias:
            return f"echo runs dense and moe models without attention biases, not this {config.variant!r} one"
        return None

    def convert(self, model: deploykit.CausalLM, scheme: Scheme, out: Path, ctx: ConvertContext) -> dict[str, Any]:
        from safetensors.numpy import save_file

        cfg = model.config
        tensors = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
        save_file(tensors, str(out / WEIGHTS))
        (out / "echo_config.json").write_text(json.dumps(cfg.to_dict()))
        return {"tensors": len(tensors)}

    def load(self, artifact: Path, manifest: dict[str, Any], *, threads: int | None = None) -> Runner:
        from safetensors.numpy import load_file

        cfg = json.loads((artifact / "echo_config.json").read_text())
        return EchoRunner(load_file(str(artifact / WEIGHTS)), cfg, load_tokenizer(artifact), model_files(artifact))


@deploykit.hookimpl
def deploykit_backends() -> list[Backend]:
    return [EchoBackend()]
