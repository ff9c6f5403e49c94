"""``deploykit generate``: sample text from a checkpoint folder or a converted artifact."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = """\
examples:
  deploykit generate runs/micro --prompt "Once upon a time" --max-new-tokens 64
  deploykit generate runs/micro --prompt "Q: 12+30=? A:" --max-new-tokens 8          # greedy
  deploykit generate runs/micro --prompt "The cat" --temperature 0.8 --top-p 0.9 --seed 1
  deploykit generate artifacts/micro-onnx --prompt "Hello" --json"""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate text from a checkpoint or artifact",
                       description="Generate a continuation of --prompt. Greedy unless --temperature > 0. "
                       "Uses the KV cache. Works on checkpoint folders and on converted artifacts.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="checkpoint folder (deploykit or transformers) or artifact folder")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); e.g. 0.8 to sample")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling, >= 0 (default: a fresh one)")
    p.add_argument("--stop", action="append", default=[], help="stop once this non-empty string appears (repeatable)")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    return p


def check_flags(args: argparse.Namespace) -> None:
    """The sampling flags checked by the rules Runner.generate applies, named as typed, before the model loads."""
    from ..model import inputs

    inputs.check_max_new_tokens(args.max_new_tokens, "--max-new-tokens")
    inputs.check_temperature(args.temperature, "--temperature")
    inputs.check_top_k(args.top_k, "--top-k")
    inputs.check_top_p(args.top_p, "--top-p")
    inputs.check_seed(args.seed, "--seed")
    inputs.check_stop(args.stop, "--stop")


def run(args: argparse.Namespace) -> int:
    import time

    from ..deploy.runtime import load

    check_flags(args)
    runner = load(args.path)
    t0 = time.perf_counter()
    text = runner.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"prompt": args.prompt, "completion": text, "seconds": round(seconds, 4),
                          "backend": runner.info.backend}))
    else:
        print(args.prompt + text)
    return 0
