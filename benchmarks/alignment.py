"""The alignment story behind `make align-demo`: base -> SFT -> reward model -> PPO (and DPO), on the
embedded verifiable tasks, measured by exact match on held-out prompts.

    .venv/bin/python benchmarks/alignment.py --base runs/demo --work runs/align

Writes benchmarks/results/alignment.md, alignment.json and alignment.png (PPO's reward and KL per
iteration, next to the verified share of right sampled answers). The base is reused if present,
else trained (`deploykit train --preset micro --time-budget ...`). Every stage is a deploykit
command's own function, so what is measured is what a user runs.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, default=Path("runs/demo"), help="pretrained checkpoint (trained if absent)")
    p.add_argument("--work", type=Path, default=Path("runs/align"), help="folder for the stages' checkpoints")
    p.add_argument("--train-seconds", type=float, default=150.0, help="pretraining budget if the base is trained")
    p.add_argument("--sft-method", default="full", choices=("full", "lora"), help="lora is merged before RM/PPO")
    p.add_argument("--sft-steps", type=int, default=1500)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--sft-examples", type=int, default=20000,
                   help="train examples per task (default 20000: enough that 1500 steps of 32 never repeat one "
                   "often; 400 let the model memorise them, train loss 0.004, and generalise little)")
    p.add_argument("--template", default="qa", choices=("seed", "qa"),
                   help="prompt layout of every stage (default qa: the format the base was pretrained on)")
    p.add_argument("--rm-steps", type=int, default=1500,
                   help="default 1500 of 16 pairs from 2000 per task (300 of 8 from 1000 reached 0.62 held-out "
                   "at train loss 0.17, memorising; this reached 0.70 at 0.60)")
    p.add_argument("--ppo-steps", type=int, default=80)
    p.add_argument("--dpo-steps", type=int, default=200)
    p.add_argument("--dpo-lr", type=float, default=5e-5, help="default 5e-5 (1e-5 for 100 steps moved nothing)")
    p.add_argument("--eval-per-task", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reuse-sft", action="store_true",
                   help="take the SFT stage from <work>/sft-<method> when its report shows the same method, steps, "
                   "template and base (to re-run the later stages without the SFT's minutes)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where alignment.md/json/png go")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from deploykit.bench.machine import load_average

    t0, load_start = time.perf_counter(), load_average()
    base = args.base if (args.base / "config.json").is_file() else _pretrain(args)
    stages = _run_stages(args, base)
    stages["seconds"] = time.perf_counter() - t0
    stages["load_average"] = {"start": load_start, "end": load_average()}
    _write(args, base, stages)
    return 0


def _pretrain(args: argparse.Namespace) -> Path:
    cmd = [sys.executable, "-m", "deploykit", "train", "--preset", "micro", "--data", "embedded",
           "--time-budget", str(args.train_seconds), "--threads", str(args.threads), "--out", str(args.base)]
    print("pretraining:", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return args.base


def _run_stages(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    from deploykit.train.preference import PreferenceConfig, train_dpo, train_reward
    from deploykit.train.rlhf import RlhfConfig, rlhf
    from deploykit.train.sft import TEMPLATES, SftConfig, merge_adapter, sft

    w, tpl = args.work, TEMPLATES[args.template]
    out: dict[str, Any] = {}
    sft_dir = w / f"sft-{args.sft_method}"
    cfg = SftConfig(base=base, data="embedded-tasks", out=sft_dir, method=args.sft_method, steps=args.sft_steps,
                    batch_size=32, lr=args.sft_lr, train_per_task=args.sft_examples,
                    eval_per_task=args.eval_per_task, template=tpl, force=True)
    if args.reuse_sft and (earlier := _earlier_sft(cfg)) is not None:
        print(f"SFT: reusing {sft_dir} (its report shows the same method, steps, template and base)", flush=True)
        out["sft"], out["sft_reused"] = earlier, True
    else:
        print(f"SFT ({args.sft_method}, {args.sft_steps} steps)", flush=True)
        out["sft"] = sft(cfg).to_dict()
    policy = sft_dir
    if args.sft_method == "lora":
        policy = merge_adapter(base, sft_dir, w / "sft-merged", force=True)
    print(f"reward model ({args.rm_steps} steps)", flush=True)
    out["reward"] = train_reward(PreferenceConfig(base=policy, data="embedded-tasks", out=w / "rm",
                                                  steps=args.rm_steps, batch_size=16, lr=1e-4, pairs_per_task=2000,
                                                  eval_per_task=args.eval_per_task, template=tpl, force=True))
    print(f"PPO ({args.ppo_steps} iterations)", flush=True)
    out["rlhf"] = rlhf(RlhfConfig(policy=policy, reward=w / "rm", out=w / "ppo", steps=args.ppo_steps,
                                  eval_per_task=args.eval_per_task, template=tpl, force=True),
                       on_iteration=lambda st: print(f"  iter {st['iteration']:>3} reward {st['reward']:+.3f} "
                                                     f"kl {st['kl']:.3f} right {st['sample_accuracy']:.2f}", flush=True))
    out["rlhf_log"] = [json.loads(line) for line in (w / "ppo" / "rlhf_log.jsonl").read_text().splitlines()]
    print(f"DPO ({args.dpo_steps} steps)", flush=True)
    out["dpo"] = train_dpo(PreferenceConfig(base=policy, data="embedded-tasks", out=w / "dpo", steps=args.dpo_steps,
                                            lr=args.dpo_lr, pairs_per_task=1000, eval_per_task=args.eval_per_task,
                                            template=tpl, force=True))
    return out


def _earlier_sft(cfg: Any) -> dict[str, Any] | None:
    """The report of an SFT run in ``cfg.out`` made with this very configuration, else None."""
    from dataclasses import asdict

    path = cfg.out / "sft_report.json"
    if not path.is_file():
        return None
    rep = json.loads(path.read_text())
    same = (rep.get("method"), rep.get("steps"), rep.get("template"), rep.get("base")) == \
        (cfg.method, cfg.steps, asdict(cfg.template), str(cfg.base))
    return rep if same else None


def _row(label: str, scores: dict[str, float], tasks: list[str]) -> str:
    return f"| {label} | " + " | ".join(f"{scores.get(t, float('nan')):.2f}" for t in tasks) + " |"


def _write(args: argparse.Namespace, base: Path, st: dict[str, Any]) -> None:
    from deploykit.bench.machine import machine_info

    info = machine_info(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in st["sft"]["before"] if t != "overall"] + ["overall"]
    ppo, dpo, rm = st["rlhf"], st["dpo"], st["reward"]
    lines = [
        "# Alignment: base → SFT → reward model → PPO / DPO on the embedded tasks",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} by `benchmarks/alignment.py` ({st['seconds'] / 60:.1f} min in all"
        + (f"; the SFT stage reused from an identical earlier run, which took {st['sft']['seconds'] / 60:.1f} min"
           if st.get("sft_reused") else "") + "). "
        f"Base: `{base}`. Exact match on {args.eval_per_task} held-out prompts per task (the tasks' eval split: "
        f"never a training prompt), greedy, {args.template} template.",
        "",
        "| model | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
        _row("base", st["sft"]["before"], tasks),
        _row(f"SFT ({st['sft']['method']}, {st['sft']['steps']} steps)", st["sft"]["after"], tasks),
        _row(f"PPO ({ppo['config']['steps']} iterations) from SFT", ppo["exact_match_after"], tasks),
        _row(f"DPO ({dpo['steps']} steps) from SFT", dpo["exact_match_after"], tasks),
        "",
        f"Reward model: held-out pairwise accuracy {rm['accuracy_after']['overall']:.2f} "
        f"(chosen = right answer, rejected = a plausible wrong one; {rm['steps']} steps).",
        "",
        f"PPO: mean reward {ppo['first']['reward']:+.3f} → {ppo['last']['reward']:+.3f}, KL to the SFT model "
        f"{ppo['first']['kl']:.3f} → {ppo['last']['kl']:.3f} nats per response (coefficient "
        f"{ppo['first']['kl_coef']:.3f} → {ppo['last']['kl_coef']:.3f}), share of sampled answers right "
        f"{ppo['first']['sample_accuracy']:.2f} → {ppo['last']['sample_accuracy']:.2f}; "
        f"entropy {ppo['last']['entropy']:.2f}, clip fraction {ppo['last']['clip_fraction']:.2f}. Curves: alignment.png.",
        "",
        f"DPO: implicit-reward accuracy on held-out pairs {dpo['implicit_reward_accuracy']['overall']:.2f}.",
        "",
        f"Machine: {info['cpu_model']}, threads {args.threads}, load average {st['load_average']['start']} at the start, {st['load_average']['end']} at the end (the stages' results do not depend on load; their times do).",
    ]
    (args.out / "alignment.md").write_text("\n".join(lines) + "\n")
    (args.out / "alignment.json").write_text(json.dumps({"base": str(base), **st}, indent=1, default=str) + "\n")
    shutil.copyfile(args.work / "ppo" / "rlhf.png", args.out / "alignment.png")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
