"""deploykit: train a small decoder-only LLM and ship it to every runtime, proving each step."""
from __future__ import annotations

__version__ = "0.1.0"
