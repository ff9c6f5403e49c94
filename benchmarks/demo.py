"""The main job behind `make demo`: train the demo model briefly (or reuse it), show a sample, tune it
on the embedded tasks (LoRA SFT in the tasks' own format, merged into an ordinary checkpoint), then
convert the tuned model to every available backend/scheme and bench them, ending with the measured
table: its task-accuracy column shows what quantization does to a model that can do something.

    .venv/bin/python benchmarks/demo.py --out runs/demo --threads 2

Budget: measured 9 min 42 s on 2 quiet cores from a fresh checkpoint (training 150 s, LoRA SFT of
rank 32 with a quarter of prose replay 245 s, conversions and measurements 175 s; the fifth session's
12 min 53 s spent 317 s on rank-8 SFT and 298 s on the bench, before the bench's workers forked from
one pre-imported zygote and converted two at a time). A second run reuses the checkpoints and the
cached artifacts.

The report goes next to the checkpoint (``<out>-bench``, runs/demo-bench by default), so a busy
machine never stops the demo; it still records the load averages. Only an ``--out`` inside
benchmarks/results/ falls under the quiet-machine rule (``deploykit.bench.quiet``, ``--allow-busy``).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from deploykit.bench.quiet import BusyMachineError, QuietGuard, add_allow_busy_flag


def main(argv: list[str] | None = None) -> int:
    from deploykit.bench.machine import available_cpus

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="checkpoint folder (reused if present)")
    p.add_argument("--preset", default="micro")
    p.add_argument("--threads", type=int, default=available_cpus())
    p.add_argument("--train-seconds", type=float, default=150.0, help="training time budget (default 150)")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per row (default 5, to fit the demo budget)")
    p.add_argument("--sft-steps", type=int, default=1000,
                   help="LoRA (rank 32) SFT steps of 32 examples on the embedded tasks before the bench (default 1000, "
                   "under 4 minutes on 2 cores with --replay 0.25; 0 benches the base)")
    p.add_argument("--replay", type=float, default=0.25,
                   help="share of each SFT batch replaying the pretraining prose (default 0.25; without it the "
                   "tuned model forgets the corpus: held-out perplexity ~6 -> 29 after 1500 steps)")
    add_allow_busy_flag(p)
    args = p.parse_args(argv)
    bench_out = args.out.parent / f"{args.out.name}-bench"
    try:
        # Before training: its own load must not count as the machine's.
        guard = QuietGuard.begin(bench_out, allow_busy=args.allow_busy, threads=args.threads)
        return _demo(args, bench_out, guard)
    except BusyMachineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def _demo(args: argparse.Namespace, bench_out: Path, guard: QuietGuard) -> int:
    if (args.out / "config.json").is_file() and (args.out / "model.safetensors").is_file():
        print(f"reusing the trained checkpoint {args.out} (delete it to train again)", flush=True)
        ckpt = args.out
    else:
        ckpt = _train(args)
    print("\nsample (greedy):", flush=True)
    subprocess.run([sys.executable, "-m", "deploykit", "generate", str(ckpt), "--prompt", "Once upon a time",
                    "--max-new-tokens", "40"], check=True)
    if args.sft_steps:
        ckpt = _tune(args, ckpt)

    from rich.console import Console

    from deploykit.bench import BenchConfig
    from deploykit.bench.progress import run_bench_with_progress
    from deploykit.bench.report import notes, rich_table

    # Conversions two at a time before the measurements (one at a time): a minute less of the budget.
    cfg = BenchConfig(model=ckpt, out=bench_out, threads=args.threads, repeat=args.repeat, allow_busy=args.allow_busy,
                      convert_jobs=min(2, args.threads), force=True)  # the demo replaces its own earlier report
    results = run_bench_with_progress(cfg, guard=guard)
    console = Console() if Console().is_terminal else Console(width=200)
    console.print(rich_table(results))
    for line in notes(results):
        console.print(f"  {line}", markup=False, highlight=False)
    console.print(f"\nreport: {results['outputs']['md']}\nplot:   {results['outputs']['png']}")
    return 0


def _train(args: argparse.Namespace) -> Path:
    cmd = [sys.executable, "-m", "deploykit", "train", "--preset", args.preset, "--data", "embedded",
           "--time-budget", str(args.train_seconds), "--threads", str(args.threads), "--out", str(args.out)]
    print("training:", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True)
    return args.out


def _tune(args: argparse.Namespace, base: Path) -> Path:
    """LoRA SFT on the embedded tasks in their own "Q: ... A:" format (the one the bench's task column
    asks in), merged into an ordinary checkpoint; reused when present."""
    adapter = args.out.parent / f"{args.out.name}-lora"
    merged = args.out.parent / f"{args.out.name}-tuned"
    if (merged / "config.json").is_file() and (merged / "model.safetensors").is_file():
        print(f"reusing the tuned checkpoint {merged} (delete it to tune again)", flush=True)
        return merged
    dk = [sys.executable, "-m", "deploykit"]
    # Rank 32 learns in 1,000 steps what rank 8 did in 1,500 (held-out exact match, 50 per task: r8 x 1500
    # 0.067 on 20 per task; r32 x 1000 0.073, r32 x 800 0.093, r64 x 800 0.070, r16 at lr 6e-3 x 1000 0.057):
    # at this model size a step costs about the same at either rank, so the demo saves a third of its SFT.
    sft = ["sft", str(base), "--data", "embedded-tasks", "--method", "lora", "--template", "qa",
           "--lora-r", "32", "--lora-alpha", "64",
           "--steps", str(args.sft_steps), "--batch-size", "32", "--train-per-task", "20000", "--replay", str(args.replay),
           "--out", str(adapter),
           "--force"]
    print("\ntuning:", " ".join(sft), flush=True)
    subprocess.run(dk + sft, check=True)
    subprocess.run(dk + ["merge", str(base), str(adapter), "--out", str(merged), "--force"], check=True)
    return merged


if __name__ == "__main__":
    sys.exit(main())
