"""The fixed inputs every bench row is measured on, and the fp32 torch reference outputs.

The parent process prepares them once, before any worker starts, and writes them to the work folder:

- ``inputs.npz`` (no pickle): the timed prompt ``prompt`` (B, P), the ``decode_tokens`` (G,) fed one
  at a time after it, parity probes ``probe_i`` (1, T_i) with the reference logits ``ref_logits_i``
  (1, T_i, V) and, for MoE models, the reference routing ``ref_experts_i`` (L, T_i, k), and the
  held-out perplexity blocks ``ppl_blocks`` (N, S+1).
- ``tasks.json``: the exact-match task prompts as token ids, with their answers.

Every worker reads the same files, so all backends are timed on identical token ids (MoE routing
depends on the tokens, so decode cost does too) and compared against one reference.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError

# Held-out text for perplexity: generated with seeds the training corpus never uses, and task lines
# from the eval split only (deploykit.data.tasks keeps train and eval prompts disjoint by hash).
EVAL_TEXT_SEED = 90_210
EVAL_TEXT_CHARS = 60_000
TASK_SEED = 1  # deploykit.data.tasks.DEFAULT_EVAL_SEED


@dataclass(frozen=True)
class InputSpec:
    prompt_len: int
    gen_len: int
    batch: int
    eval_tokens: int  # tokens scored for perplexity (split into blocks of up to 256)
    n_tasks: int
    eval_data: str | None  # file/folder/glob for perplexity text; None = embedded held-out text


def held_out_texts(eval_data: str | None) -> list[str]:
    if eval_data is not None:
        from ..data import load_texts

        return load_texts(eval_data)
    from ..data import english_documents, task_documents

    prose = english_documents(int(EVAL_TEXT_CHARS * 0.8), seed=EVAL_TEXT_SEED)
    tasks = task_documents(int(EVAL_TEXT_CHARS * 0.2), seed=EVAL_TEXT_SEED, split="eval")
    return [doc for pair in zip(prose, tasks) for doc in pair] + prose[len(tasks):]


def _token_stream(texts: list[str], tokenizer: Any, need: int) -> np.ndarray:
    stream: list[int] = []
    for text in texts:
        stream.extend(tokenizer.encode(text, add_bos=True))
        stream.append(tokenizer.eos_id)
        if len(stream) >= need:
            break
    return np.asarray(stream, dtype=np.int64)


def prepare_inputs(source: Path, spec: InputSpec, work: Path) -> dict[str, Any]:
    """Write inputs.npz + tasks.json into ``work``; return the reference facts (params, fp32 ppl...).

    ``source`` is the checkpoint folder benchmarked; its tokenizer turns text into ids.
    """
    import torch

    from ..model.checkpoint import load_config, load_model
    from ..model.tokenizer import Tokenizer

    cfg = load_config(source)
    if spec.prompt_len + spec.gen_len > cfg.max_seq_len:
        raise ConfigError(
            f"--prompt-len {spec.prompt_len} + --gen-len {spec.gen_len} exceeds the model's "
            f"max_seq_len={cfg.max_seq_len} ({source})",
            hint=f"lower them so that their sum is at most {cfg.max_seq_len}")
    if (source / "tokenizer.json").is_file():
        tokenizer = Tokenizer.load(source)
    else:
        raise DataError(f"{source}: no tokenizer.json",
                        hint="bench needs the checkpoint's tokenizer for held-out text and tasks; "
                             "save the model with its tokenizer (deploykit train does)")

    block = min(256, cfg.max_seq_len)
    n_blocks = max(1, -(-spec.eval_tokens // block))
    timed = spec.batch * (spec.prompt_len + spec.gen_len)
    stream = _token_stream(held_out_texts(spec.eval_data), tokenizer, timed + n_blocks * block + 1)
    if len(stream) < timed + block + 1:
        raise DataError(f"held-out text {spec.eval_data or 'embedded'!r} has only {len(stream)} tokens; "
                        f"the bench needs at least {timed + block + 1}",
                        hint="pass a larger --eval-data file or lower --prompt-len/--gen-len/--batch")
    # The first part of the stream is timed; the rest (disjoint) is scored for perplexity.
    seqs = stream[:timed].reshape(spec.batch, spec.prompt_len + spec.gen_len)  # (B, P+G)
    rest = stream[timed:]
    n_blocks = min(n_blocks, (len(rest) - 1) // block)
    ppl_blocks = np.stack([rest[i * block: i * block + block + 1] for i in range(n_blocks)])  # (N, S+1)

    arrays: dict[str, np.ndarray] = {
        "prompt": np.ascontiguousarray(seqs[:, :spec.prompt_len]),  # (B, P)
        "decode_tokens": np.ascontiguousarray(seqs[0, spec.prompt_len:]),  # (G,)
        "ppl_blocks": ppl_blocks,
    }
    # Parity probes: a single token, a short and a medium sequence, and the longest the model takes.
    probe_lengths = sorted({1, min(7, cfg.max_seq_len), min(33, cfg.max_seq_len), cfg.max_seq_len})
    probes = [ppl_blocks.reshape(-1)[:n][None, :] if n <= ppl_blocks.size else
              np.resize(ppl_blocks.reshape(-1), n)[None, :] for n in probe_lengths]

    model = load_model(source)
    moe = model.moe_layers()
    with torch.no_grad():  # scoped: this runs inside the caller's process
        for i, ids in enumerate(probes):
            arrays[f"probe_{i}"] = ids
            arrays[f"ref_logits_{i}"] = model(torch.from_numpy(ids)).float().numpy()  # (1, T, V)
            if moe:
                arrays[f"ref_experts_{i}"] = torch.stack([m.last_experts for m in moe]).numpy()  # (L, T, k)
    np.savez(work / "inputs.npz", **arrays)

    from ..data import task_examples

    examples = task_examples(spec.n_tasks, seed=TASK_SEED) if spec.n_tasks else []
    tasks = [{"kind": e.kind, "prompt": e.prompt, "answer": e.answer,
              "ids": tokenizer.encode(e.prompt, add_bos=True),
              # The answer's own length plus room for the newline/eos that ends it; the same budget
              # for every backend keeps the task cost comparable.
              "max_new_tokens": len(tokenizer.encode(" " + e.answer)) + 2} for e in examples]
    (work / "tasks.json").write_text(json.dumps(tasks))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "variant": cfg.variant,
        "n_experts": cfg.n_experts,
        "top_k": cfg.top_k if cfg.variant == "moe" else None,
        "max_seq_len": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
        "probe_lengths": probe_lengths,
        "ppl_tokens": int(ppl_blocks.shape[0] * (ppl_blocks.shape[1] - 1)),
        "n_tasks": len(tasks),
    }


def score_tasks(tasks: list[dict[str, Any]], completions: list[list[int]], tokenizer: Any) -> dict[str, float]:
    """Exact-match accuracy of greedy completions (token ids from a worker)."""
    from ..data import TaskExample, score_exact_match

    examples = [TaskExample(t["kind"], t["prompt"], t["answer"]) for t in tasks]
    return score_exact_match(examples, [tokenizer.decode(c) for c in completions])
