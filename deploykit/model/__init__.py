"""What a model is: its config, the decoder graph, checkpoint folders, the tokenizer and generation.

The bottom layer of deploykit: it imports torch, safetensors and tokenizers (each where first needed)
and, of deploykit, only the foundation modules ``deploykit.errors`` and ``deploykit.fsutil``. Training, deployment,
benchmarks and the CLI build on it; it knows none of them (tests/test_layering.py keeps it so).
``checkpoint`` owns every file name a checkpoint folder may hold.
"""
from __future__ import annotations

from ..lazy import lazy_attributes
from .config import PRESETS, ModelConfig, preset

# The rest is imported on first use (PEP 562): the graph needs torch, and serving a non-torch artifact
# (native, onnx, gguf) reads only config, checkpoint file names and the tokenizer from this package.
__getattr__ = lazy_attributes(__name__, {
    "load_config": ".checkpoint", "load_model": ".checkpoint", "save_model": ".checkpoint",
    "SamplingConfig": ".generation", "generate": ".generation", "CausalLM": ".graph", "KVCache": ".graph",
    "Tokenizer": ".tokenizer"})

__all__ = ["PRESETS", "CausalLM", "KVCache", "ModelConfig", "SamplingConfig", "Tokenizer", "generate", "load_config",
           "load_model", "preset", "save_model"]
