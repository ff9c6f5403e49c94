"""``deploykit reward``: a Bradley-Terry reward model; ``deploykit dpo``: DPO on the same pairs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .sft import add_template_argument

EXAMPLES = """\
examples:
  deploykit reward runs/micro-sft --data embedded-tasks --steps 100 --out runs/micro-rm
  deploykit reward runs/micro-sft --data pairs.jsonl --out runs/micro-rm
  deploykit dpo runs/micro-sft --data embedded-tasks --steps 100 --beta 0.1 --out runs/micro-dpo

--data is JSONL with "prompt", "chosen", "rejected" (or "prompt" and "responses" ranked best
first: every ordered pair), or embedded-tasks: the right answer of a verifiable task against a
plausible wrong one. Held-out pairwise accuracy is reported before and after."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", type=Path, help="checkpoint folder (usually an SFT model)")
    p.add_argument("--data", required=True, help="pairs JSONL file, or embedded-tasks")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step (default 8)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--pairs-per-task", type=int, default=200, help="embedded-tasks: train pairs per task")
    p.add_argument("--eval-per-task", type=int, default=20, help="held-out pairs per task")
    p.add_argument("--seed", type=int, default=0)
    add_template_argument(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="replace --out if this command wrote it")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("reward", help="train a Bradley-Terry reward model on preference pairs",
                       description="Backbone + scalar head read at the last response token; "
                       "loss -log sigmoid(r_chosen - r_rejected).",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    d = sub.add_parser("dpo", help="direct preference optimisation against a frozen reference",
                       description="DPO on response-token log-probs; the reference is a frozen copy of BASE.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(d)
    d.add_argument("--beta", type=float, default=0.1, help="DPO temperature (default 0.1)")
    d.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per exact-match answer")
    d.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    d.set_defaults(func=run_dpo)
    return p


def _config(args: argparse.Namespace, **extra):
    from ..train.preference import PreferenceConfig
    from ..train.sft import TEMPLATES

    return PreferenceConfig(template=TEMPLATES[args.template], base=args.base, data=args.data, out=args.out, steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, pairs_per_task=args.pairs_per_task,
                            eval_per_task=args.eval_per_task, seed=args.seed, force=args.force, **extra)


def _print(report: dict, args: argparse.Namespace, pairs: list[tuple[str, str]]) -> None:
    if args.json:
        print(json.dumps(report))
        return
    print(f"{report['kind']}: {report['steps']} steps, last loss {report['train_loss']:.3f}, "
          f"{report['seconds']:.0f} s")
    for label, key in pairs:
        print(f"{label}: " + ", ".join(f"{t} {v:.2f}" for t, v in report[key].items()))
    print(f"wrote {args.out}")


def run(args: argparse.Namespace) -> int:
    from ..train.preference import train_reward

    _print(train_reward(_config(args)), args,
           [("pairwise accuracy before", "accuracy_before"), ("pairwise accuracy after", "accuracy_after")])
    return 0


def run_dpo(args: argparse.Namespace) -> int:
    from ..train.preference import train_dpo

    _print(train_dpo(_config(args, beta=args.beta, max_new_tokens=args.max_new_tokens)), args,
           [("exact-match before", "exact_match_before"), ("exact-match after", "exact_match_after"),
            ("implicit-reward accuracy", "implicit_reward_accuracy")])
    return 0
