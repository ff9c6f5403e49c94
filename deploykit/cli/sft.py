"""``deploykit sft`` and ``deploykit merge``: supervised fine-tuning (full, LoRA, prompt tuning), and
folding a LoRA adapter into its base for deployment."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = """\
examples:
  deploykit sft runs/micro --data embedded-tasks --method lora --steps 300 --out runs/micro-lora
  deploykit sft runs/micro --data instructions.jsonl --method full --steps 200 --out runs/micro-sft
  deploykit sft runs/micro --data embedded-tasks --method prompt --out runs/micro-prompt
  deploykit merge runs/micro runs/micro-lora --out runs/micro-merged

--data is a JSONL file with "instruction", "input", "output" (and optionally "task") per line,
or embedded-tasks (the verifiable tasks: add, sub, mul, reverse, sort, recall). Exact-match per
task on the held-out examples is reported before and after."""


def add_template_argument(p: argparse.ArgumentParser) -> None:
    """``--template`` for sft, reward, dpo and rlhf: the stages of one pipeline must share a layout."""
    p.add_argument("--template", default="seed", choices=("seed", "qa"),
                   help='prompt layout: seed ("### Instruction / ### Input / ### Response", default) or qa (the '
                   'embedded tasks\' own "Q: ... A: answer", which the bench asks in). reward, dpo and rlhf lay '
                   'out embedded-tasks with it (their JSONL prompts come templated): pass what sft used')


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("sft", help="supervised fine-tuning (full, lora, prompt)",
                       description="Fine-tune a checkpoint on instruction data; loss on the response tokens only.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path, help="base checkpoint folder")
    p.add_argument("--data", required=True, help="instruction JSONL file, or embedded-tasks")
    p.add_argument("--method", default="lora", help="full, lora (default) or prompt")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="default 3e-3 for lora/prompt, 3e-4 for full")
    p.add_argument("--temperature", type=float, default=1.0, help="task mixing temperature (default 1)")
    p.add_argument("--train-per-task", type=int, default=5000,
                   help="embedded-tasks: train examples per task (default 5000; with 400 the model memorised "
                   "them and learnt little of the tasks)")
    p.add_argument("--eval-per-task", type=int, default=20, help="held-out examples per task (default 20)")
    p.add_argument("--replay", type=float, default=0.0,
                   help="share of each batch replaying the embedded pretraining prose with a language-model loss "
                        "(default 0; e.g. 0.25 keeps the base's perplexity while the tasks are learnt)")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names")
    p.add_argument("--prompt-tokens", type=int, default=8, help="virtual tokens for --method prompt")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per eval answer")
    add_template_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True, help="folder to write")
    p.add_argument("--force", action="store_true", help="replace --out if it is an sft run")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (it goes to stderr)")
    _register_merge(sub)
    return p


def _register_merge(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("merge", help="fold a LoRA adapter into its base checkpoint",
                       description="Write an ordinary checkpoint whose outputs equal base + adapter.")
    m.add_argument("base", type=Path, help="base checkpoint folder")
    m.add_argument("adapter", type=Path, help="adapter folder (from `deploykit sft --method lora`)")
    m.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    m.add_argument("--force", action="store_true", help="replace --out if it is a checkpoint")
    m.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    m.set_defaults(func=run_merge)


def run(args: argparse.Namespace) -> int:
    from ..train.sft import TEMPLATES, SftConfig, sft

    cfg = SftConfig(template=TEMPLATES[args.template], base=args.base, data=args.data, out=args.out, method=args.method, steps=args.steps,
                    batch_size=args.batch_size, lr=args.lr, temperature=args.temperature,
                    train_per_task=args.train_per_task, eval_per_task=args.eval_per_task, replay=args.replay, lora_r=args.lora_r,
                    lora_alpha=args.lora_alpha, lora_targets=tuple(t for t in args.lora_targets.split(",") if t),
                    prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens, seed=args.seed,
                    force=args.force)
    result = sft(cfg, progress=not args.no_progress)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    p = result.params
    print(f"{result.method}: {p['trainable_params']:,} trainable of {p['base_params']:,} "
          f"({100 * p['trainable_share']:.2f}%), {result.steps} steps, last loss {result.train_loss:.3f}, "
          f"{result.seconds:.0f} s")
    if result.loss_curve:
        marks = result.loss_curve[:: max(1, len(result.loss_curve) // 5)] + result.loss_curve[-1:]
        print("loss (mean of each window): " + ", ".join(f"{loss:.2f} @ {step}" for step, loss in dict(marks).items()))
    print(f"{'task':10s} {'before':>7s} {'after':>7s}")
    for task in result.after:
        print(f"{task:10s} {result.before[task]:7.2f} {result.after[task]:7.2f}")
    print(f"wrote {result.out}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from ..train.sft import merge_adapter

    out = merge_adapter(args.base, args.adapter, args.out, force=args.force)
    print(f"wrote {out}")
    return 0
