"""``deploykit eval``: perplexity, generation tasks and multiple choice on a checkpoint or any artifact."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = """\
examples:
  deploykit eval runs/micro
  deploykit eval artifacts/micro-onnx-int8 --json
  deploykit eval runs/micro --data held_out/*.txt --window 512 --stride 256
  deploykit eval runs/micro --tasks qa.jsonl --suites generation

Runs through the same Runner API every backend implements, so a checkpoint and its artifacts are
measured alike. Defaults: the embedded held-out text (never trained on) for perplexity, and the
verifiable tasks' eval split for generation (exact match, token F1, BLEU, ROUGE-L) and for multiple
choice (4 options scored by log-likelihood; chance 0.25)."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="evaluate a checkpoint or artifact: perplexity, tasks, multiple choice",
                       description="One evaluation suite for checkpoints and every backend's artifacts.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="checkpoint folder or artifact folder")
    p.add_argument("--data", help="held-out text for perplexity: file, folder or glob (default: embedded)")
    p.add_argument("--tasks", help='JSONL of {"prompt", "answer", optional "task"} for generation (default: embedded)')
    p.add_argument("--suites", default="perplexity,generation,choice", help="comma-separated subset to run")
    p.add_argument("--ppl-tokens", type=int, default=4096, help="held-out tokens scored (default 4096)")
    p.add_argument("--window", type=int, default=256, help="perplexity window in tokens (default 256)")
    p.add_argument("--stride", type=int, default=128, help="perplexity stride (default 128)")
    p.add_argument("--n-tasks", type=int, default=60, help="generation prompts (default 60)")
    p.add_argument("--n-choices", type=int, default=60, help="multiple-choice questions (default 60)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from ..eval import EvalConfig, evaluate

    cfg = EvalConfig(data=args.data, tasks=args.tasks, ppl_tokens=args.ppl_tokens, window=args.window,
                     stride=args.stride, n_tasks=args.n_tasks, n_choices=args.n_choices,
                     max_new_tokens=args.max_new_tokens, suites=tuple(s.strip() for s in args.suites.split(",") if s.strip()))
    result = evaluate(args.path, cfg, threads=args.threads)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['path']} ({result['backend']} {result['quant']}), {result['seconds']:.1f} s")
    if "perplexity" in result:
        p = result["perplexity"]
        print(f"perplexity {p['ppl']:.3f} over {p['tokens']} tokens (window {p['window']}, stride {p['stride']}, "
              f"{p['windows']} windows; {p['data']})")
    if "generation" in result:
        print(f"{'task':<10}{'exact':>8}{'F1':>8}{'BLEU':>8}{'ROUGE-L':>9}{'n':>5}")
        for kind, s in result["generation"].items():
            print(f"{kind:<10}{s['exact_match']:>8.3f}{s['token_f1']:>8.3f}{s['bleu']:>8.1f}{s['rouge_l']:>9.3f}{s['n']:>5}")
    if "choice" in result:
        c = result["choice"]
        print(f"multiple choice ({c['n']} questions, chance {c['chance']:.2f}): "
              + ", ".join(f"{k} {v:.2f}" for k, v in c["accuracy"].items())
              + f"; per-token normalised overall {c['accuracy_per_token']['overall']:.2f}")
    return 0
