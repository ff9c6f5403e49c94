"""``deploykit bench``: convert a checkpoint to every backend/scheme and measure speed, size and accuracy."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..bench.quiet import add_allow_busy_flag

EXAMPLES = """\
examples:
  deploykit bench runs/micro                                  # every available backend and scheme
  deploykit bench runs/micro --backends torch,onnx --schemes fp32,int8-dynamic
  deploykit bench runs/micro --schemes torch:bf16,onnx:int8-static --threads 2
  deploykit bench runs/micro-moe --prompt-len 64 --gen-len 32 --repeat 5 --out bench/micro-moe
  deploykit bench runs/micro --eval-data held_out.jsonl --json > results.json
  deploykit bench runs/micro --out benchmarks/results/micro --force   # refused on a busy machine (--allow-busy)

Every row is measured in its own subprocess (a crashing runtime becomes an error row); the first row
is always fp32 torch and every speed, size and accuracy change is relative to it, in the same run.
Artifacts are cached by source sha256 + backend + scheme + library versions in
~/.cache/deploykit/artifacts (or --cache / $DEPLOYKIT_CACHE); a changed checkpoint converts afresh.
Writes OUT/results.json, results.csv, report.md (the summary table) and report.png, all at once when
the run ends; an earlier report in OUT is replaced only with --force.

benchmarks/results/ holds the project's committed numbers, so a run into it needs a quiet machine: a
1-minute load average over 0.75 per CPU (1.5 on 2) refuses it before any work (exit code 75), and a run
that turned busy on the way writes its reports to a temporary folder instead, named in the error
(the run's own --threads are discounted from the end load). --allow-busy writes anyway and stamps
results.json ("quiet") and report.md ("Measured on a busy machine"). Any other --out is never refused."""


def _csv(value: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in value.split(",") if x.strip())
    if not items:
        raise argparse.ArgumentTypeError("expects a comma-separated list, e.g. torch,onnx")
    return items


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="measure speed, size and accuracy across backends and schemes",
                       description="Convert MODEL to each requested backend/scheme (or reuse cached artifacts), "
                       "measure load time, prefill and decode speed, peak memory, parity with fp32 torch, "
                       "perplexity on held-out text and exact-match task accuracy, and write a report.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="checkpoint folder (e.g. runs/micro from `deploykit train`)")
    p.add_argument("--backends", type=_csv, default=("all",), metavar="all|A,B",
                   help="backends to bench (default: all registered; unavailable ones become rows with the reason)")
    p.add_argument("--schemes", type=_csv, default=("all",), metavar="all|S,B:S",
                   help="schemes: 'all' (default), names applied to every backend offering them, or backend:scheme")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens for prefill timing (default 128)")
    p.add_argument("--gen-len", type=int, default=64, help="tokens decoded one at a time (default 64)")
    p.add_argument("--batch", type=int, default=1, help="prefill batch size (decode is one sequence; default 1)")
    p.add_argument("--threads", type=int, default=None, help="threads per runtime (default: CPUs available)")
    p.add_argument("--repeat", type=int, default=10, help="timed runs after warm-up; median and min-max reported (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs (default 2)")
    p.add_argument("--eval-data", default=None, metavar="FILE",
                   help="held-out text for perplexity (text/JSONL file, folder or glob; default: generated held-out text)")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens scored for perplexity (default 2048)")
    p.add_argument("--tasks", type=int, default=60, dest="n_tasks",
                   help="exact-match task examples from the held-out task set (default 60; 0 = skip)")
    p.add_argument("--out", type=Path, default=None, help="report folder (default: bench/<model name>)")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier bench report in --out (a folder bench did not write is never replaced)")
    p.add_argument("--cache", type=Path, default=None, help="artifact cache (default ~/.cache/deploykit/artifacts)")
    p.add_argument("--no-cache", action="store_true", help="convert every row again, replacing cached artifacts")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per conversion or measurement (default 1200)")
    p.add_argument("--convert-jobs", type=int, default=1, metavar="N",
                   help="convert N rows at a time, all before the first measurement, each with threads/N threads "
                   "(default 1: each row converts, then measures); measurements always run one at a time")
    p.add_argument("--keep-work", action="store_true", help="keep the worker specs and logs (in OUT/bench-*)")
    p.add_argument("--json", action="store_true", help="print results.json to stdout instead of the table")
    add_allow_busy_flag(p)
    return p


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..bench import BenchConfig
    from ..bench.cache import default_cache_dir
    from ..bench.machine import available_cpus
    from ..bench.progress import run_bench_with_progress
    from ..bench.report import notes, rich_table

    out = args.out or Path("bench") / args.model.name
    cfg = BenchConfig(model=args.model, out=out, backends=args.backends, schemes=args.schemes,
                      prompt_len=args.prompt_len, gen_len=args.gen_len, batch=args.batch,
                      threads=args.threads or available_cpus(), repeat=args.repeat, warmup=args.warmup,
                      eval_data=args.eval_data, eval_tokens=args.eval_tokens, n_tasks=args.n_tasks,
                      cache_dir=args.cache or default_cache_dir(), use_cache=not args.no_cache,
                      timeout_s=args.timeout, keep_work=args.keep_work, convert_jobs=args.convert_jobs, allow_busy=args.allow_busy, force=args.force)
    results = run_bench_with_progress(cfg)  # progress on stderr: `--json > file` stays clean
    if args.json:
        json.dump(results, sys.stdout, indent=2, default=str)
        print()
    else:
        console = Console()
        if not console.is_terminal:  # piped or captured: no terminal width to respect, keep columns readable
            console = Console(width=200)
        console.print(rich_table(results))
        for line in notes(results):
            console.print(f"  {line}", markup=False, highlight=False)
        print(f"report: {results['outputs']['md']}\nplot:   {results['outputs']['png']}")
    # Other rows failing is a finding the report shows; without the fp32 baseline nothing compares.
    return 0 if results["rows"][0]["status"] == "ok" else 1
