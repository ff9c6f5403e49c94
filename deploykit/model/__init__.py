"""What a model is: its config, the decoder graph, checkpoint folders, the tokenizer and generation.

The bottom layer of deploykit: it imports torch (and safetensors, tokenizers) and, of deploykit,
only the foundation modules ``deploykit.errors`` and ``deploykit.fsutil``. Training, deployment,
benchmarks and the CLI build on it; it knows none of them (tests/test_layering.py keeps it so).
``checkpoint`` owns every file name a checkpoint folder may hold.
"""
from __future__ import annotations

from .checkpoint import load_config, load_model, save_model
from .config import PRESETS, ModelConfig, preset
from .generation import SamplingConfig, generate
from .graph import CausalLM, KVCache
from .tokenizer import Tokenizer

__all__ = ["PRESETS", "CausalLM", "KVCache", "ModelConfig", "SamplingConfig", "Tokenizer", "generate", "load_config",
           "load_model", "preset", "save_model"]
