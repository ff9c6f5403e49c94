"""``deploykit rlhf``: PPO against a reward model, from an SFT checkpoint."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .sft import add_template_argument

EXAMPLES = """\
examples:
  deploykit sft runs/micro --data embedded-tasks --method full --out runs/micro-sft
  deploykit reward runs/micro-sft --data embedded-tasks --out runs/micro-rm
  deploykit rlhf runs/micro-sft --reward runs/micro-rm --steps 30 --out runs/micro-ppo
  deploykit rlhf runs/micro-sft --reward runs/micro-rm --kl-coef 0.1 --target-kl none --out runs/micro-ppo-fixed

Each iteration samples one response per prompt (--batch-size prompts), scores it with the reward
model, pays a per-token KL penalty against the frozen SFT model, and runs --ppo-epochs passes of
clipped PPO updates over minibatches. Logged per iteration: mean reward, KL, entropy, clip
fraction, value loss and, on the embedded tasks, the share of sampled answers that are right.
--out gets the tuned policy (an ordinary checkpoint), rlhf_report.json, rlhf_log.jsonl and rlhf.png."""


def _target_kl(text: str) -> float | None:
    if text.lower() == "none":
        return None
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{text!r}: a number > 0, or none for a fixed --kl-coef")
    return value


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("rlhf", help="RLHF: PPO of an SFT policy against a reward model",
                       description="Proximal policy optimisation with a KL penalty to the SFT model, GAE "
                       "advantages and a value head; the reward model comes from `deploykit reward`.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("policy", type=Path, help="SFT checkpoint to tune (also the frozen KL reference)")
    p.add_argument("--reward", type=Path, required=True, help="reward-model folder from `deploykit reward`")
    p.add_argument("--data", default="embedded-tasks",
                   help='prompts: embedded-tasks (default) or JSONL with "prompt" (templated), optional "answer"')
    p.add_argument("--steps", type=int, default=30, help="PPO iterations, one rollout each (default 30)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per rollout (default 16)")
    p.add_argument("--minibatch-size", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--kl-coef", type=float, default=0.05, help="initial KL coefficient (default 0.05)")
    p.add_argument("--target-kl", type=_target_kl, default=1.0,
                   help="adaptive controller's target KL per response in nats, or none (default 1.0)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the rollouts")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--eval-per-task", type=int, default=20, help="held-out prompts per task for exact-match")
    p.add_argument("--seed", type=int, default=0)
    add_template_argument(p)
    p.add_argument("--out", type=Path, required=True, help="folder to write")
    p.add_argument("--force", action="store_true", help="replace --out if it is an rlhf run")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from ..train.rlhf import RlhfConfig, rlhf
    from ..train.sft import TEMPLATES

    cfg = RlhfConfig(template=TEMPLATES[args.template], policy=args.policy, reward=args.reward, out=args.out, data=args.data, steps=args.steps,
                     batch_size=args.batch_size, minibatch_size=args.minibatch_size, ppo_epochs=args.ppo_epochs,
                     lr=args.lr, kl_coef=args.kl_coef, target_kl=args.target_kl, temperature=args.temperature,
                     max_new_tokens=args.max_new_tokens, eval_per_task=args.eval_per_task, seed=args.seed,
                     force=args.force)

    def show(s: dict) -> None:
        if not args.json:
            print(f"iter {s['iteration']:>3}  reward {s['reward']:+.3f}  kl {s['kl']:.3f}  "
                  f"coef {s['kl_coef']:.3f}  entropy {s['entropy']:.2f}  clip {s['clip_fraction']:.2f}  "
                  f"right {s['sample_accuracy']:.2f}", flush=True)

    report = rlhf(cfg, on_iteration=show)
    if args.json:
        print(json.dumps(report))
        return 0
    before, after = report["exact_match_before"], report["exact_match_after"]
    if before:
        print(f"{'task':<10}{'before':>8}{'after':>8}")
        for task in before:
            print(f"{task:<10}{before[task]:>8.2f}{after[task]:>8.2f}")
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")
    return 0
