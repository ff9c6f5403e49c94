"""llama.cpp beside deploykit's fastest CPU runners, on the same model, in one run (issue 10).

The anchor the native engine must beat. For each model (default ``micro``; ``runs/<model>`` is reused,
otherwise trained for ``--train-seconds`` with ``deploykit train --preset <model> --data embedded``):

- convert with gguf/q8_0, gguf/q4_0 (llama.cpp's own quantizer), onnx/int8-dynamic and native/int8
  (int8-moe for MoE models), each through ``deploykit.convert`` so its parity proof runs (recorded);
- load each with ``deploykit.load(..., threads=T)``, T = the cores this process may use, and time
  decode (a fresh session fed a 16-token prompt, untimed, then 32 fixed tokens one at a time through
  the KV cache) and prefill (a fresh session fed 128 tokens at once; every runner computes the
  logits of every position). Contenders are timed round-robin after warm-up, so load changes on a
  shared machine hit all alike; median, min and max of ``--repeat`` rounds;
- llama.cpp is timed twice: through deploykit's runner (the same API as the others) and bare
  (``llama_cpp.Llama.eval`` with ``logits_all=False``, no logits copied out, llama.cpp's served F16
  KV cache), so the runner's own overhead is visible and the anchor is llama.cpp's, not ours.

All contenders run in this one process with the same threads and allocator settings (re-exec with
MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_, see FACTS.md on page faults).

    python benchmarks/llamacpp_vs_deploykit.py [--models micro,micro-moe] [--repeat 25] [--threads N] [--allow-busy]

Into benchmarks/results/ only from a quiet machine (deploykit.bench.quiet): refused before training or
measuring when the 1-minute load average is over 0.75 per CPU; a run that turned busy writes to a
temporary folder instead. --allow-busy writes anyway, stamped "measured on a busy machine".
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import decode_once, prefill_once, rates_interleaved, use_bench_allocator  # noqa: E402

_MALLOC_ENV = use_bench_allocator()

import numpy as np  # noqa: E402
import torch  # noqa: E402

import deploykit  # noqa: E402
from deploykit import native  # noqa: E402
from deploykit.bench.machine import available_cpus, cpu_model, describe_native, library_versions, native_isa  # noqa: E402
from deploykit.bench.quiet import BusyMachineError, QuietGuard, add_allow_busy_flag, load_lines  # noqa: E402
from deploykit.deploy.registry import get_backend  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT, DECODE, PREFILL = 16, 32, 128


def checkpoint(model: str, runs: Path, seconds: int) -> Path:
    folder = runs / model
    if not (folder / "model.safetensors").is_file():
        print(f"training {model} for {seconds} s into {folder}", flush=True)
        subprocess.run([sys.executable, "-m", "deploykit", "train", "--preset", model, "--data", "embedded",
                        "--time-budget", str(seconds), "--out", str(folder)], check=True)
    return folder


def plan(model: str) -> list[tuple[str, str, str]]:
    """(label, backend, scheme) of every contender, llama.cpp first."""
    native_scheme = "int8-moe" if "moe" in model else "int8"
    rows = [("llama.cpp Q8_0", "gguf", "q8_0"), ("llama.cpp Q4_0", "gguf", "q4_0"),
            ("onnx int8-dynamic", "onnx", "int8-dynamic")]
    if native.available():
        rows.append((f"native {native_scheme}", "native", native_scheme))
    return rows


def contenders(model: str, ckpt: Path, work: Path, threads: int) -> dict:
    out = {}
    for label, backend, scheme in plan(model):
        t0 = time.perf_counter()
        # allow_mismatch: a contender past its parity tolerance still has a speed worth knowing; the
        # verdict is recorded and shown next to it.
        r = deploykit.convert(ckpt, backend, scheme, work / f"{model}-{backend}-{scheme}", threads=threads,
                              allow_mismatch=True)
        s = r.report.to_dict()["summary"]
        info = r.manifest.get("backend_info", {})
        out[label] = {"runner": deploykit.load(r.path, threads=threads), "convert_s": time.perf_counter() - t0,
                      "parity": {k: s[k] for k in ("max_abs_logit", "mean_kl", "top1", "greedy_match")},
                      "parity_passed": r.report.passed(), "bytes": r.manifest["total_bytes"], "path": r.path,
                      "bits_per_weight": info.get("bits_per_weight"),
                      "delta_ppl_pct": info.get("quality", {}).get("delta_ppl_pct")}
        print(f"  {label}: converted in {out[label]['convert_s']:.1f}s, parity {out[label]['parity']}", flush=True)
    return out






class BareLlama:
    """llama.cpp with as little Python around it as llama-cpp-python allows: ``Llama.eval`` per token,
    no logits copied out (``logits_all=False``), the served default F16 KV cache."""

    def __init__(self, gguf_file: Path, n_ctx: int, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(str(gguf_file), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                         n_threads_batch=threads, logits_all=False, verbose=False)

    def decode(self, prompt: list[int], tokens: list[int]) -> float:
        self.llm.reset()
        self.llm.eval(prompt)
        t0 = time.perf_counter()
        for t in tokens:
            self.llm.eval([t])
        return len(tokens) / (time.perf_counter() - t0)

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        return len(ids) / (time.perf_counter() - t0)




def bench_model(model: str, args, work: Path) -> dict:
    print(f"{model}:", flush=True)
    ckpt = checkpoint(model, args.runs, args.train_seconds)
    cs = contenders(model, ckpt, work, args.threads)
    cfg = deploykit.load_model(ckpt).config
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, cfg.vocab_size, PROMPT).tolist()
    tokens = rng.integers(3, cfg.vocab_size, DECODE).tolist()
    long = rng.integers(3, cfg.vocab_size, min(PREFILL, cfg.max_seq_len)).tolist()
    runners = {k: c["runner"] for k, c in cs.items()}
    bare = BareLlama(cs["llama.cpp Q8_0"]["path"] / "model.gguf", cfg.max_seq_len, args.threads)
    decode_fns = {k: (lambda r=r: decode_once(r, prompt, tokens)) for k, r in runners.items()}
    decode_fns["llama.cpp Q8_0 bare"] = lambda: bare.decode(prompt, tokens)
    prefill_fns = {k: (lambda r=r: prefill_once(r, long)) for k, r in runners.items()}
    prefill_fns["llama.cpp Q8_0 bare"] = lambda: bare.prefill(long)
    load_before = os.getloadavg()
    decode = rates_interleaved(decode_fns, args.repeat)
    prefill = rates_interleaved(prefill_fns, args.repeat)
    load_after = os.getloadavg()
    rows = {}
    for k in decode:
        c = cs.get(k, cs["llama.cpp Q8_0"])  # the bare row runs the Q8_0 file
        rows[k] = {"decode_tok_s": decode[k], "prefill_tok_s": prefill[k], "parity": c["parity"],
                   "parity_passed": c["parity_passed"], "artifact_bytes": c["bytes"],
                   "bits_per_weight": c["bits_per_weight"], "delta_ppl_pct": c["delta_ppl_pct"]}
    ratios = {}
    anchor = "llama.cpp Q8_0"
    for k in rows:
        if not k.startswith("llama.cpp"):
            ratios[f"decode {k} / {anchor}"] = decode[k]["median"] / decode[anchor]["median"]
            ratios[f"prefill {k} / {anchor}"] = prefill[k]["median"] / prefill[anchor]["median"]
    ratios[f"decode {anchor} (runner) / bare"] = decode[anchor]["median"] / decode["llama.cpp Q8_0 bare"]["median"]
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x", flush=True)
    return {"model": model, "checkpoint": str(ckpt), "config": cfg.to_dict(), "parameters": cfg.num_params(),
            "rows": rows, "ratios": ratios, "loadavg_before": load_before, "loadavg_after": load_after}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# llama.cpp vs deploykit's fastest CPU runners (decode / prefill tokens/s)", "",
             f"{m['cpu_model']}; {res['threads']} threads (the cores this process may use); "
             f"{describe_native(m['native'])}; llama-cpp-python {m['versions'].get('llama_cpp_python', '?')}.", "",
             f"llama.cpp system info: `{m['llama_cpp_system_info']}`", "",
             *[f"{line}\n" for line in load_lines(res.get("quiet"))],
             "Contenders were measured side by side (round-robin) in one process, same threads and allocator "
             f"({', '.join(f'{k}={v}' for k, v in res['malloc_env'].items())}). Decode: {DECODE} tokens after a "
             f"{PROMPT}-token prompt, KV cache, batch 1; prefill: {PREFILL} tokens, logits of every position; "
             f"median of {res['repeat']} after 3 warm-up rounds (min–max in brackets). llama.cpp rows run "
             "through deploykit's runner (F16 KV cache, as served) except *bare*: `Llama.eval` alone.", ""]
    if res["repeat"] < 20:
        lines += [f"**Only {res['repeat']} repeats: a smoke run, not numbers to quote.**", ""]
    for r in res["models"]:
        lines += [f"## {r['model']} ({r['parameters'] / 1e6:.1f} M parameters, `{r['checkpoint']}`)", "",
                  "| contender | decode tok/s | prefill@128 tok/s | artifact MB | bits/weight | max abs dlogit | KL "
                  "| top-1 | greedy | parity proof |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for k, row in r["rows"].items():
            d, p, q = row["decode_tok_s"], row["prefill_tok_s"], row["parity"]
            bpw = f"{row['bits_per_weight']:.2f}" if row["bits_per_weight"] else ""
            lines.append(f"| {k} | {d['median']:.0f} [{d['min']:.0f}–{d['max']:.0f}] | {p['median']:.0f} "
                         f"[{p['min']:.0f}–{p['max']:.0f}] | {row['artifact_bytes'] / 1e6:.2f} | {bpw} "
                         f"| {q['max_abs_logit']:.3f} | {q['mean_kl']:.1e} | {q['top1']:.3f} | {q['greedy_match']:.3f} "
                         f"| {'passed' if row['parity_passed'] else '**failed**'} |")
        lines += ["", "| ratio (medians) | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f}x |" for k, v in r["ratios"].items()]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="micro")
    ap.add_argument("--repeat", type=int, default=25, help="round-robin rounds (>= 20 for numbers to quote)")
    ap.add_argument("--threads", type=int, default=available_cpus(), help="default: the cores this process may use")
    ap.add_argument("--train-seconds", type=int, default=60, help="training budget of a model runs/ lacks")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="where checkpoints are found or trained")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    add_allow_busy_flag(ap)
    args = ap.parse_args(argv)
    if args.repeat < 1 or args.threads < 1:
        ap.error("--repeat and --threads must be >= 1")
    missing = get_backend("gguf").missing_requirements()
    if missing:
        sys.exit(f"the gguf backend cannot run here: {'; '.join(missing)}")
    try:
        # Before training and converting: a busy machine fails here, not after minutes of work.
        guard = QuietGuard.begin(args.out, allow_busy=args.allow_busy, threads=args.threads)
        run(args, guard)
    except BusyMachineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def run(args: argparse.Namespace, guard: QuietGuard) -> None:
    """Bench every model, then write llamacpp_vs_deploykit.json/.md into --out (or a temporary folder)."""
    import llama_cpp

    torch.set_num_threads(args.threads)
    machine = {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "available_cpus": available_cpus(),
               "native": native_isa(), "python": platform.python_version(),
               "versions": {**library_versions(), "llama_cpp_python": llama_cpp.__version__},
               "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
               "loadavg_start": guard.start.averages}
    with tempfile.TemporaryDirectory(prefix="llamacpp_vs_deploykit-") as tmp:
        models = [bench_model(m, args, Path(tmp)) for m in args.models.split(",")]
    verdict = guard.finish(args.out)
    machine["loadavg_end"] = verdict.end.averages
    res = {"benchmark": "llamacpp_vs_deploykit", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "threads": args.threads, "repeat": args.repeat, "decode_tokens": DECODE, "prompt_tokens": PROMPT,
           "prefill_tokens": PREFILL, "malloc_env": _MALLOC_ENV, "machine": machine, "quiet": verdict.stamp(),
           "models": models}
    out = verdict.write_to
    out.mkdir(parents=True, exist_ok=True)
    (out / "llamacpp_vs_deploykit.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    (out / "llamacpp_vs_deploykit.md").write_text(markdown(res))
    print(markdown(res))
    verdict.raise_if_diverted()


if __name__ == "__main__":
    sys.exit(main())
