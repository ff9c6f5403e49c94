"""The columns of a bench row: one vocabulary shared by results.json, results.csv, the reports and tests.

Ratios and deltas are always against the first row, fp32 torch, measured in the same run.
A value is None (JSON null, empty CSV cell, "n/a" in tables) when it does not apply or failed;
``status``/``reason`` say why.
"""
from __future__ import annotations

SCHEMA_VERSION = 1

# (name, meaning) in table order.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("backend", "backend name (torch, onnx, ...)"),
    ("scheme", "quantization / optimisation scheme"),
    ("status", "ok | unavailable | error"),
    ("reason", "why a row is unavailable or failed (null when ok)"),
    ("platform", "where the artifact runs, as the backend declares it"),
    ("cached", "artifact reused from the cache (no conversion this run)"),
    ("convert_s", "conversion time in seconds (null when cached)"),
    ("convert_parity_ok", "the manifest's parity verdict against the declared tolerance"),
    ("parity_violations", "the limits the artifact broke at conversion ('; '-separated; empty when it passed)"),
    ("size_bytes", "bytes of the model files (manifest and tokenizer excluded)"),
    ("size_ratio", "size_bytes / fp32 torch size_bytes"),
    ("bits_per_weight", "8 * size_bytes / parameters of the source model"),
    ("load_s", "seconds for deploykit.load() in a fresh process (includes checking the manifest's file hashes)"),
    ("prefill_ms", "median latency of one forward over batch x prompt_len tokens"),
    ("prefill_ms_min", "fastest prefill run"),
    ("prefill_ms_max", "slowest prefill run"),
    ("prefill_tok_s", "batch * prompt_len / prefill_ms (median)"),
    ("prefill_speedup", "prefill_tok_s / fp32 torch prefill_tok_s"),
    ("decode_tok_s", "median tokens/s feeding gen_len tokens one at a time after the prompt"),
    ("decode_tok_s_min", "slowest decode run"),
    ("decode_tok_s_max", "fastest decode run"),
    ("decode_ms_per_token", "1000 / decode_tok_s"),
    ("decode_speedup", "decode_tok_s / fp32 torch decode_tok_s"),
    ("kv_cache", "the runner decodes with a KV cache"),
    ("decode_recomputed", "the runner recomputed the whole sequence at every step instead"),
    ("peak_rss_bytes", "peak resident memory of the worker after load + timing (VmHWM)"),
    ("base_rss_bytes", "resident memory of the worker before loading the artifact"),
    ("parity_max_abs_logit", "max |logit - fp32 torch logit| over the probe positions"),
    ("parity_top1", "share of probe positions with the same argmax token as fp32 torch"),
    ("parity_kl", "mean KL(p_fp32 || p_row) per probe position"),
    ("perplexity", "perplexity on the held-out text"),
    ("ppl_delta_pct", "100 * (perplexity / fp32 torch perplexity - 1)"),
    ("task_accuracy", "exact-match accuracy of greedy completions on the held-out task set"),
    ("task_accuracy_delta", "task_accuracy - fp32 torch task_accuracy, in percentage points"),
    ("moe_routing_agreement", "share of (layer, token) pairs routed to the same top-k experts as fp32"),
    ("moe_routing_note", "why moe_routing_agreement is n/a"),
    ("best_for", "what the measurements make this row best for"),
    ("artifact", "artifact folder measured"),
)
COLUMN_NAMES: tuple[str, ...] = tuple(name for name, _ in COLUMNS)


def empty_row(backend: str, scheme: str) -> dict[str, object]:
    row: dict[str, object] = {name: None for name in COLUMN_NAMES}
    row.update(backend=backend, scheme=scheme, status="ok", cached=False, kv_cache=None, best_for="")
    return row
