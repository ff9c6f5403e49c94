"""End-to-end benchmark of the ``native`` backend (issue 11): the C++ decode engine against torch,
onnx and llama.cpp, decode and prefill tokens/s, measured side by side.

Models (``--models``): ``micro`` and ``micro-moe`` (``runs/<model>`` reused, else trained for 60 s;
``--random-weights`` skips training) and ``smollm2-135m``, a random-weight model with SmolLM2-135M's
shapes (d_model 576, 30 layers, 9 heads, 3 kv heads, ffn 1536, vocab 49152, tied embeddings).

- Contenders (``--contenders``): torch fp32, torch int8-dynamic, onnx int8-dynamic, native int8
  (the engine), native int8 through its torch modules (the reference path the engine replaced), native
  int4 (the engine, GPTQ-rounded 4-bit weights; dense and legacy models only), and llama.cpp Q8_0 / Q4_0,
  each also with llama.cpp's flash attention (``--option flash_attn=true``; the issue's decode goal is
  against Q8_0 + flash attention), and Q4_0 holding deploykit's GPTQ rounding (``--option rounding=gptq``),
  through deploykit's GGUF backend (``deploykit.convert(..., "gguf", "q8_0")``; rows skipped with the reason
  when that backend is not importable or does not run the model). Each is converted through
  ``deploykit.convert`` so its parity proof runs; the verdict is shown beside it.
- decode: a fresh session is fed a 16-token prompt (untimed), then 128 fixed tokens one at a time
  through the KV cache (batch 1), timed. Prefill: a fresh session fed 128 and 512 tokens at once
  (capped at max_seq_len). Load: seconds of ``deploykit.load`` (manifest hashes skipped).
  Contenders are timed round-robin after warm-up, so load changes on a shared machine hit all alike;
  median (min–max) of ``--repeat`` (>= 20 into benchmarks/results/) repeats.
- Peak RSS: after the timing, each contender is loaded again in its own fresh worker process (this script
  benchmarks/rss_worker.py: ``import deploykit`` and nothing else, then ``deploykit.load``, the 16-token
  prompt and one decode token), because in one process the contenders' memory cannot be told apart. Two
  numbers: the worker's peak resident memory (VmHWM, what the process costs), and that peak over the
  worker's memory just before the load (the peak is reset there, ``/proc/self/clear_refs``): what the
  contender's load and first steps add (weights, KV cache, runtime buffers, the runtime it imports, code
  pages it touches). The worker also times that first load in a fresh process, after settling the full
  garbage collection the imports leave due (``gc.collect()``, seconds kept as ``import_gc_s``): whatever
  allocates first after the imports pays it, and the import is not the load. A native, onnx or gguf
  artifact loads without torch (``torch_imported`` false), so that collection is small there.
- Goals (issue 11) are ratio rows with their verdict: decode native int8 >= 1.2x llama.cpp Q8_0 + flash
  attention, native int4 >= 1.2x Q4_0, prefill >= 1.3x llama.cpp, peak RSS <= llama.cpp's + 10 %, load <= 0.1 s.

All contenders run in this one process with the same thread count (2) and allocator settings (the
script re-executes itself with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set; FACTS.md).

    python benchmarks/native_e2e.py [--models micro,micro-moe,smollm2-135m] [--repeat 25] [--threads 2]
    python benchmarks/native_e2e.py --quick      # proves the script works in about a minute (numbers mean nothing)

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
from deploykit.bench.machine import available_cpus, cpu_model, native_isa  # noqa: E402
from deploykit.bench.quiet import BusyMachineError, QuietGuard, add_allow_busy_flag, load_lines  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 16
SMOLLM2 = dict(variant="dense", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
               max_seq_len=2048, rope_theta=100000.0, tie_embeddings=True)
CONTENDERS = {  # label -> (backend, scheme or None = the model's native scheme)
    "torch fp32": ("torch", "fp32"), "torch int8-dynamic": ("torch", "int8-dynamic"),
    "onnx int8-dynamic": ("onnx", "int8-dynamic"), "native int8": ("native", None),
    "native int8 (torch modules)": ("native", None), "native int4": ("native", "int4"),
    "llama.cpp Q8_0": ("gguf", "q8_0"), "llama.cpp Q8_0 + flash attention": ("gguf", "q8_0"),
    "llama.cpp Q4_0": ("gguf", "q4_0"), "llama.cpp Q4_0 + flash attention": ("gguf", "q4_0"),
    "llama.cpp Q4_0 (deploykit GPTQ)": ("gguf", "q4_0"),
}
OPTIONS = {"native int4": {"rounding": "gptq"}, "llama.cpp Q4_0 (deploykit GPTQ)": {"rounding": "gptq"},
           "llama.cpp Q8_0 + flash attention": {"flash_attn": True},
           "llama.cpp Q4_0 + flash attention": {"flash_attn": True}}
# --quick: random-weight nano, unproved, a few tokens: shows the script runs, measures nothing. Its contenders
# cover every code path of this script (the engine, its torch modules, llama.cpp with and without flash
# attention, the peak-RSS workers, the goal rows); the other conversions take minutes on a busy machine.
QUICK = {"models": "nano", "repeat": 2, "decode_tokens": 8, "prefill": "32,64"}
QUICK_CONTENDERS = ("torch fp32", "native int8", "native int8 (torch modules)", "llama.cpp Q8_0",
                    "llama.cpp Q8_0 + flash attention", "llama.cpp Q4_0 + flash attention")


def random_checkpoint(model: str, work: Path) -> Path:
    """A random-weight checkpoint: SmolLM2-135M's shapes, or a preset (speed only; parity still proved)."""
    from deploykit.model.checkpoint import save_model
    from deploykit.model.config import ModelConfig, preset
    from deploykit.model.graph import CausalLM

    torch.manual_seed(0)
    cfg = ModelConfig(**SMOLLM2) if model == "smollm2-135m" else preset(model)
    folder = work / f"ckpt-{model}"
    save_model(CausalLM(cfg).eval(), folder, bench_tokenizer(work, min(cfg.vocab_size, 8192)))
    return folder


def bench_tokenizer(work: Path, vocab: int):
    """A byte-level BPE on the embedded corpus (the GGUF backend embeds a tokenizer; ids past it stay unused)."""
    from deploykit.data.corpus import english_documents
    from deploykit.model.tokenizer import Tokenizer

    path = work / f"tokenizer-{vocab}"
    if not (path / "tokenizer.json").is_file():
        Tokenizer.train(english_documents(20_000, seed=0), vocab).save(path)
    return Tokenizer.load(path)


def checkpoint(model: str, work: Path, random_weights: bool) -> Path:
    if random_weights or model == "smollm2-135m":
        return random_checkpoint(model, work)
    folder = ROOT / "runs" / model
    if not (folder / "model.safetensors").is_file():
        print(f"training {model} for 60 s into {folder}", flush=True)
        subprocess.run([sys.executable, "-m", "deploykit", "train", "--preset", model, "--data", "embedded",
                        "--time-budget", "60", "--out", str(folder)], check=True)
    return folder


def contenders(model: str, ckpt: Path, work: Path, args) -> tuple[dict, dict]:
    """(label -> converted and loaded contender, label -> why it was skipped)."""
    native_scheme = "int8-moe" if "moe" in model else "int8"
    out, skipped, native_runner = {}, {}, None
    for label in args.contenders.split(","):
        backend, scheme = CONTENDERS[label]
        options = OPTIONS.get(label)
        scheme = scheme or native_scheme
        label = label.replace("native int8", f"native {native_scheme}")
        if label.endswith("(torch modules)") and native_runner is not None:
            c = dict(out[f"native {native_scheme}"])
            out[label] = {**c, "runner": native_runner.reference(), "reference": True}
            continue
        t0 = time.perf_counter()
        try:
            # allow_mismatch: a contender past its parity tolerance still has a speed worth knowing; the
            # verdict is recorded and shown next to it.
            folder = work / "-".join([model, backend, scheme, *(f"{k}={v}" for k, v in (options or {}).items())])
            r = deploykit.convert(ckpt, backend, scheme, folder, threads=args.threads, allow_mismatch=True,
                                  options=options, verify=not args.quick)
        except Exception as e:  # noqa: BLE001  (an absent backend or runtime: the row says why)
            if backend in ("gguf", "onnx") or scheme == "int4":  # int4: MoE models are refused, with the reason
                skipped[label] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                print(f"  {label}: skipped ({skipped[label]})", flush=True)
                continue
            raise
        convert_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner = deploykit.load(r.path, threads=args.threads, verify_files=False)
        load_s = time.perf_counter() - t0
        if backend == "native" and scheme != "int4":
            native_runner = runner
        s = r.report.to_dict()["summary"] if r.report else None  # --quick: not proved
        out[label] = {"runner": runner, "convert_s": convert_s, "load_s": load_s, "path": str(r.path),
                      "parity": {k: s[k] for k in ("max_abs_logit", "mean_kl", "top1", "greedy_match")} if s else None,
                      "parity_passed": r.report.passed() if r.report else None, "bytes": r.manifest["total_bytes"]}
        print(f"  {label}: converted in {convert_s:.1f}s, loaded in {load_s:.3f}s, parity {out[label]['parity']}",
              flush=True)
    return out, skipped


def peak_rss(contender: dict, prompt: list[int], token: int, threads: int) -> dict:
    """rss_worker.py's numbers for one contender, from a fresh process that imports only deploykit (same
    interpreter and allocator settings)."""
    spec = {"path": contender["path"], "reference": bool(contender.get("reference")), "prompt": prompt,
            "token": token, "threads": threads}
    p = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / "rss_worker.py"), json.dumps(spec)],
                       check=False, capture_output=True, text=True, timeout=900, env=os.environ)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["worker failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def bench_model(model: str, args, work: Path) -> dict:
    print(f"{model}:", flush=True)
    ckpt = checkpoint(model, work, args.random_weights)
    cs, skipped = contenders(model, ckpt, work, args)
    cfg = next(iter(cs.values()))["runner"].config
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, cfg.vocab_size, PROMPT).tolist()
    tokens = rng.integers(3, cfg.vocab_size, args.decode_tokens).tolist()
    lengths = sorted({min(int(n), cfg.max_seq_len) for n in args.prefill.split(",")})
    runners = {k: c["runner"] for k, c in cs.items()}
    load_before = os.getloadavg()
    decode = rates_interleaved({k: (lambda r=r: decode_once(r, prompt, tokens)) for k, r in runners.items()}, args.repeat)
    prefill = {}
    for n in lengths:
        ids = rng.integers(3, cfg.vocab_size, n).tolist()
        prefill[n] = rates_interleaved({k: (lambda r=r, ids=ids: prefill_once(r, ids)) for k, r in runners.items()},
                                 args.repeat)
    load_after = os.getloadavg()
    memory = {}  # after the timing: the workers' loads must not disturb it
    for k, c in cs.items():
        memory[k] = peak_rss(c, prompt, tokens[0], args.threads)
        print(f"  {k}: peak RSS {memory[k]}", flush=True)
    rows = {}
    for k, c in cs.items():
        rows[k] = {"decode_tok_s": decode[k], **{f"prefill{n}_tok_s": prefill[n][k] for n in lengths},
                   "load_s": c["load_s"], "parity": c["parity"], "parity_passed": c["parity_passed"],
                   "artifact_bytes": c["bytes"], "memory": memory[k]}
    ratios = {}
    for nat in (k for k in runners if k.startswith("native") and "torch modules" not in k):
        for base in runners:
            if base.startswith("native"):
                continue
            ratios[f"decode {nat} / {base}"] = decode[nat]["median"] / decode[base]["median"]
            for n in lengths:
                ratios[f"prefill{n} {nat} / {base}"] = prefill[n][nat]["median"] / prefill[n][base]["median"]
    ratios |= resource_ratios(rows)
    for k, v in ratios.items():
        print(f"  {k}: {v:.2f}x", flush=True)
    label = str(ckpt.relative_to(ROOT)) if ckpt.is_relative_to(ROOT) else "random weights"
    return {"model": model, "checkpoint": label, "config": cfg.to_dict(), "parameters": cfg.num_params(),
            "rows": rows, "skipped": skipped, "ratios": ratios, "prefill_lengths": lengths,
            "loadavg_before": load_before, "loadavg_after": load_after}


LOAD_GOAL_S = 0.1


def resource_ratios(rows: dict) -> dict[str, float]:
    """Peak RSS of each native contender over each llama.cpp one (the process, and what the load adds), and
    each native load (in this process, and the first in a fresh one) over the 0.1 s goal."""
    out = {}
    for nat, row in rows.items():
        if not nat.startswith("native") or "torch modules" in nat:
            continue
        mem = row["memory"]
        out[f"load {nat} / {LOAD_GOAL_S:g} s"] = row["load_s"] / LOAD_GOAL_S
        if "load_s" in mem:
            out[f"load in a fresh process {nat} / {LOAD_GOAL_S:g} s"] = mem["load_s"] / LOAD_GOAL_S
        if "import_gc_s" in mem:  # what a user's first load after `import deploykit` takes, collection included
            out[f"load + the imports' due gc in a fresh process {nat} / {LOAD_GOAL_S:g} s"] = \
                (mem["load_s"] + mem["import_gc_s"]) / LOAD_GOAL_S
        for base, b in rows.items():
            if base.startswith("llama.cpp") and "peak_mb" in mem and "peak_mb" in b["memory"]:
                out[f"peak RSS (process) {nat} / {base}"] = mem["process_peak_mb"] / b["memory"]["process_peak_mb"]
                out[f"peak RSS (added by the load) {nat} / {base}"] = mem["peak_mb"] / b["memory"]["peak_mb"]
    return out


def goal(key: str) -> tuple[str, float] | None:
    """Issue 11's goal for a ratio row, as (">=" | "<=", bound), or None."""
    if key.startswith("load "):
        return "<=", 1.0
    if key.startswith("peak RSS ") and "GPTQ" not in key:
        return "<=", 1.10
    if " / llama.cpp " not in key or "GPTQ" in key:
        return None
    nat, base = key.split(" / ")
    if key.startswith("prefill"):
        return ">=", 1.3
    if nat == "decode native int8" and base == "llama.cpp Q8_0 + flash attention":
        return ">=", 1.2
    if nat == "decode native int4" and base.startswith("llama.cpp Q4_0"):
        return ">=", 1.2
    return None


def goal_cell(key: str, value: float) -> str:
    g = goal(key)
    if g is None:
        return ""
    op, bound = g
    met = value >= bound if op == ">=" else value <= bound
    return f"{'≥' if op == '>=' else '≤'} {bound:.2f}x: {'met' if met else '**missed**'}"


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# native backend, end to end (decode / prefill tokens/s)", "",
             f"{m['cpu']}; {res['threads']} threads; selected ISA **{m['selected_isa']}** "
             f"(supported: {', '.join(m['supported_isas'])}); CPU flags: {m['cpu_flags']}.",
             "", *[f"{line}\n" for line in load_lines(res.get("quiet"))],
             "Contenders were measured side by side (round-robin) in one process, so load changes hit all alike.",
             f"Allocator: {', '.join(f'{k}={v}' for k, v in res['malloc_env'].items())} for every contender. "
             f"Decode: {res['decode_tokens']} tokens after a {PROMPT}-token prompt, KV cache, batch 1; prefill: one "
             f"call with the whole prompt; load: deploykit.load without hashing; median of {res['repeat']} after "
             "3 warm-up rounds (min–max in brackets). `native ... (torch modules)` is the same artifact run "
             "through its torch modules (the path the C++ engine replaced). Peak RSS: each contender in its own "
             "fresh worker process (benchmarks/rss_worker.py: `import deploykit`, then load, the prompt and one decode "
             "token): the process's peak resident memory, and that peak over the memory just before the load "
             "(what the load and first steps add). Load s: in the benchmark's process (runtimes imported); "
             "fresh process: the worker's first load, after a gc.collect() that settles the collection the imports "
             "leave due (its seconds in brackets, import_gc_s in the JSON). Serving a native, onnx or gguf artifact "
             "imports no torch (torch_imported in the JSON); torch rows and `(torch modules)` bring it.", ""]
    for r in res["models"]:
        lengths = r["prefill_lengths"]
        lines += [f"## {r['model']} ({r['parameters'] / 1e6:.1f} M parameters, {r['checkpoint']})", "",
                  "| contender | decode tok/s | " + " | ".join(f"prefill@{n} tok/s" for n in lengths)
                  + " | load s | load s (fresh process) | peak RSS MB (process) | peak RSS MB (added by the load) "
                  "| artifact MB | max abs dlogit | KL | top-1 | parity proof |",
                  "|---|---:|" + "---:|" * len(lengths) + "---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for k, row in r["rows"].items():
            d, q = row["decode_tok_s"], row["parity"]
            pre = " | ".join(f"{row[f'prefill{n}_tok_s']['median']:.0f} [{row[f'prefill{n}_tok_s']['min']:.0f}–"
                             f"{row[f'prefill{n}_tok_s']['max']:.0f}]" for n in lengths)
            mem = row.get("memory") or {}
            gc_s = f" (+{mem['import_gc_s']:.3f} gc)" if "import_gc_s" in mem else ""
            rss = (f"{mem['load_s']:.3f}{gc_s} | {mem['process_peak_mb']:.1f} | {mem['peak_mb']:.1f}" if "peak_mb" in mem
                   else f"error: {mem.get('error', 'not measured')} | |")
            proof = ("not proved (--quick)" if row.get("parity_passed") is None
                     else "passed" if row["parity_passed"] else "**failed**")
            par = (f"{q['max_abs_logit']:.3f} | {q['mean_kl']:.1e} | {q['top1']:.3f}" if q else "– | – | –")
            lines.append(f"| {k} | {d['median']:.0f} [{d['min']:.0f}–{d['max']:.0f}] | {pre} | {row['load_s']:.3f} "
                         f"| {rss} | {row['artifact_bytes'] / 1e6:.2f} | {par} | {proof} |")
        for k, why in r["skipped"].items():
            lines.append(f"| {k} | skipped: {why} |" + " |" * (len(lengths) + 9))
        lines += ["", "| ratio (medians) | value | goal (issue 11) |", "|---|---:|---|"]
        lines += [f"| {k} | {v:.2f}x | {goal_cell(k, v)} |" for k, v in r["ratios"].items()]
        lines += [""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="micro,micro-moe,smollm2-135m")
    ap.add_argument("--contenders", default=None,
                    help=f"comma-separated, from: {', '.join(CONTENDERS)} (default: all)")
    ap.add_argument("--random-weights", action="store_true", help="random-weight checkpoints (no training)")
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--prefill", default="128,512", help="prefill lengths (capped at max_seq_len)")
    ap.add_argument("--repeat", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/)")
    ap.add_argument("--quick", action="store_true",
                    help="prove the script works in about a minute: random-weight nano, six contenders unproved, "
                         "a few tokens, into a temporary folder (numbers mean nothing)")
    add_allow_busy_flag(ap)
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
        args.random_weights = args.allow_busy = True
        args.out = args.out or Path(tempfile.mkdtemp(prefix="native_e2e-quick-"))
        args.contenders = args.contenders or ",".join(QUICK_CONTENDERS)
    args.contenders = args.contenders or ",".join(CONTENDERS)
    args.out = args.out or ROOT / "benchmarks" / "results"
    unknown = [c for c in args.contenders.split(",") if c not in CONTENDERS]
    if unknown:
        ap.error(f"unknown contenders {unknown}; choose from {', '.join(CONTENDERS)}")
    if args.repeat < 20 and args.out.resolve() == (ROOT / "benchmarks" / "results").resolve():
        ap.error("--repeat must be >= 20 into benchmarks/results/ (the issue asks for the median of at least 20)")
    if not native.available():
        sys.exit(f"native kernels unavailable: {native.unavailable_reason()}")
    try:
        # Before training and converting: a busy machine fails here, not after minutes of work.
        guard = QuietGuard.begin(args.out, allow_busy=args.allow_busy, threads=args.threads)
        run(args, guard)
    except BusyMachineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def run(args: argparse.Namespace, guard: QuietGuard) -> None:
    """Bench every model, then write native_e2e.json/.md into --out (or a temporary folder, see quiet)."""
    torch.set_num_threads(args.threads)
    s = native.cpu_summary()
    machine = {"cpu": s["cpu"], "cpus": os.cpu_count(), "selected_isa": s["isa"],
               "supported_isas": s["supported_isas"], "forced_isa": s["forced_isa"], "cpu_flags": s["cpu_flags"],
               "cpu_features": native.cpu_features(), "python": platform.python_version(), "torch": torch.__version__,
               "quantized_engine": torch.backends.quantized.engine, "native": native_isa(),
               "cpu_model": cpu_model(), "available_cpus": available_cpus(),
               "loadavg_start": guard.start.averages}
    with tempfile.TemporaryDirectory(prefix="native_e2e-") as tmp:
        models = [bench_model(m, args, Path(tmp)) for m in args.models.split(",")]
    verdict = guard.finish(args.out)
    machine["loadavg_end"] = verdict.end.averages
    res = {"benchmark": "native_e2e", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "threads": args.threads,
           "repeat": args.repeat, "decode_tokens": args.decode_tokens, "prompt_tokens": PROMPT,
           "malloc_env": _MALLOC_ENV, "machine": machine, "quiet": verdict.stamp(), "models": models}
    out = verdict.write_to
    out.mkdir(parents=True, exist_ok=True)
    (out / "native_e2e.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    (out / "native_e2e.md").write_text(markdown(res))
    print(markdown(res))
    verdict.raise_if_diverted()


if __name__ == "__main__":
    sys.exit(main())
