"""Training data: the generated default corpus, verifiable tasks, file loading, packing, batching."""
from __future__ import annotations

from deploykit.data.corpus import CHARACTERS, DEFAULT_N_CHARS, embedded_corpus, english_documents
from deploykit.data.loading import (
    BlockLoader,
    build_blocks,
    encode_and_pack,
    eval_batches,
    load_texts,
    pack_documents,
    split_documents,
    train_val_split,
)
from deploykit.data.tasks import (
    DEFAULT_EVAL_SEED,
    TASK_KINDS,
    TaskExample,
    extract_answer,
    score_exact_match,
    split_of,
    task_documents,
    task_examples,
)

__all__ = [
    "CHARACTERS",
    "DEFAULT_EVAL_SEED",
    "DEFAULT_N_CHARS",
    "TASK_KINDS",
    "BlockLoader",
    "TaskExample",
    "build_blocks",
    "embedded_corpus",
    "encode_and_pack",
    "english_documents",
    "eval_batches",
    "extract_answer",
    "load_texts",
    "pack_documents",
    "score_exact_match",
    "split_documents",
    "split_of",
    "task_documents",
    "task_examples",
    "train_val_split",
]
