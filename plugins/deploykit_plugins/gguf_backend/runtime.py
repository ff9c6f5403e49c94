"""llama.cpp as a deploykit Runner: ``llama_cpp.Llama`` objects, one per concurrent caller.

``forward`` returns logits for every position (``logits_all=True``); a session keeps one Llama, so
llama.cpp's own KV cache serves ``generate``. The KV cache type is the caller's: F32 for the parity
proof (llama.cpp's default F16 cache alone moves logits by ~4e-3), the artifact's option when served.
"""
from __future__ import annotations

import json
import os
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deploykit.deploy.backend import Runner, RunnerInfo
from deploykit.deploy.runtime import check_threads
from deploykit.errors import ArtifactError, ConfigError

from .gguf_file import CONFIG_KEY

KV_TYPES = {"f16": "GGML_TYPE_F16", "f32": "GGML_TYPE_F32", "q8_0": "GGML_TYPE_Q8_0"}  # names in llama_cpp


def _quiet_llama_logs() -> None:
    """Silence llama.cpp's log (DEPLOYKIT_GGUF_VERBOSE=1 keeps it); failures reach us as return codes.

    llama-cpp-python prints each log line whose level passes its logger's; llama.cpp logs some
    warnings (quantizer fallbacks, context sizes) at level "none", which it maps to CRITICAL, and
    Llama(verbose=False) resets the logger to ERROR: so this sets it above CRITICAL, after every Llama().
    """
    import logging

    if not os.environ.get("DEPLOYKIT_GGUF_VERBOSE"):
        logging.getLogger("llama-cpp-python").setLevel(logging.CRITICAL + 1)


_OPEN_LOCK = threading.Lock()  # Llama(verbose=False) silences by swapping the process's fds 1 and 2


def _open_llama(path: Path, *, n_ctx: int, threads: int | None, kv_cache: str, flash_attn: bool) -> Any:
    """One ``llama_cpp.Llama`` over ``path``: batches of up to n_ctx tokens in one ubatch, logits of
    every position kept, the KV cache in ``kv_cache``."""
    import llama_cpp

    _quiet_llama_logs()
    kv = getattr(llama_cpp, KV_TYPES[kv_cache])
    with _OPEN_LOCK:
        try:
            llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                                  n_threads_batch=threads, logits_all=True, type_k=kv, type_v=kv,
                                  flash_attn=flash_attn or kv_cache == "q8_0",  # a quantized V cache needs it
                                  verbose=bool(os.environ.get("DEPLOYKIT_GGUF_VERBOSE")))
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
            raise ArtifactError(f"{path}: llama.cpp could not load this GGUF file ({e})",
                                hint="convert again; DEPLOYKIT_GGUF_VERBOSE=1 shows llama.cpp's reason") from e
        _quiet_llama_logs()
    return llm


class GgufRunner(Runner):
    """A GGUF file run by ``llama_cpp.Llama``.

    One Llama object holds one context (one KV cache), so each call takes one from a pool and gives it
    back: concurrent forwards and sessions never share a context, and nothing is loaded twice for
    calls that come one after another. A session keeps its Llama (its KV cache) until it is collected.
    """

    def __init__(self, path: Path, *, quant: str = "?", threads: int | None = None, kv_cache: str = "f16",
                 flash_attn: bool = False) -> None:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"{path.parent}: no {path.name}", hint="re-run deploykit convert --backend gguf")
        if kv_cache not in KV_TYPES:
            raise ConfigError(f"kv_cache={kv_cache!r} must be one of {', '.join(KV_TYPES)}")
        check_threads(threads)
        self.path, self.kv_cache, self.flash_attn, self.threads = path, kv_cache, flash_attn, threads
        meta = _read_meta(path)
        from deploykit.model.config import ModelConfig

        self.config = ModelConfig.from_dict(json.loads(meta[CONFIG_KEY]))
        self.eos_token_id, self.max_length = self.config.eos_token_id, self.config.max_seq_len
        self._free: list[Any] = []
        self._lock = threading.Lock()
        self._release(self._acquire())  # load once now: a broken file fails here, not on first use
        self.tokenizer = None
        if (path.parent / "tokenizer.json").is_file():
            from deploykit.model.tokenizer import Tokenizer

            self.tokenizer = Tokenizer.load(path.parent)
        import llama_cpp

        from deploykit.deploy.artifact import model_files

        files = model_files(path.parent)
        self.info = RunnerInfo(
            backend="gguf", quant=quant, kv_cache=True,
            size_bytes=sum(files.values()), files=files, threads=threads, parameters=self.config.num_params(),
            vocab_size=self.config.vocab_size, max_length=self.config.max_seq_len,
            details={"llama_cpp_python": llama_cpp.__version__, "architecture": meta.get("general.architecture"),
                     "kv_cache": kv_cache, "flash_attn": flash_attn or kv_cache == "q8_0",
                     "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()})

    def _acquire(self) -> Any:
        with self._lock:
            if self._free:
                return self._free.pop()
        return _open_llama(self.path, n_ctx=self.config.max_seq_len, threads=self.threads, kv_cache=self.kv_cache,
                           flash_attn=self.flash_attn)

    def _release(self, llm: Any) -> None:
        with self._lock:
            self._free.append(llm)

    def forward(self, input_ids: Any) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        ids = ids[None, :] if ids.ndim == 1 else ids  # (B, T)
        B, T = ids.shape
        out = np.empty((B, T, self.config.vocab_size), dtype=np.float32)
        llm = self._acquire()
        try:
            for b in range(B):  # one sequence at a time through one context
                llm.reset()
                llm.eval(ids[b].tolist())
                out[b] = llm.scores[:T]  # (T, V): logits_all keeps every position's row
        finally:
            self._release(llm)
        return out

    def new_session(self) -> GgufSession:
        return GgufSession(self)


class GgufSession:
    """One sequence in llama.cpp's KV cache: ``feed`` evaluates only the new tokens."""

    def __init__(self, runner: GgufRunner) -> None:
        self._llm = runner._acquire()
        self._llm.reset()
        # The context goes back to the pool when the session is collected, not when it is closed by hand.
        weakref.finalize(self, runner._release, self._llm)

    def feed(self, token_ids: Sequence[int]) -> np.ndarray:
        self._llm.eval([int(t) for t in token_ids])
        return np.array(self._llm.scores[self._llm.n_tokens - 1], dtype=np.float32)  # (V,)


def _read_meta(path: Path) -> dict[str, str]:
    """The keys the runner reads (deploykit's config, general.*), as strings."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{path}: not a readable GGUF file ({e})", hint="convert again") from e
    meta = {}
    for key in (CONFIG_KEY, "general.architecture", "general.file_type"):
        if key in reader.fields:
            meta[key] = str(reader.fields[key].contents())
    if CONFIG_KEY not in meta:
        raise ArtifactError(f"{path}: no {CONFIG_KEY} key; not written by deploykit's gguf backend",
                            hint=f"bring your own GGUF into deploykit with `deploykit import-gguf {path} --out CKPT`")
    return meta
