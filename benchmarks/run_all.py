"""Regenerate benchmarks/results/: bench the standard models across every backend available here.

    .venv/bin/python benchmarks/run_all.py                 # micro and micro-moe (what `make bench` runs)
    .venv/bin/python benchmarks/run_all.py --models small  # the slow one
    .venv/bin/python benchmarks/run_all.py --models micro --repeat 3 --results /tmp/bench

Each model needs a trained checkpoint: ``runs/<model>`` is reused when it exists, otherwise it is
trained briefly first with ``deploykit train --preset <model> --data embedded --time-budget S``. Reports
(report.md, report.png, results.json, results.csv) go to ``benchmarks/results/<model>/`` and the
summary tables into ``benchmarks/README.md`` between the RESULTS markers (only when the reports went
to benchmarks/results/: a run into --results elsewhere leaves the committed README alone).

Only from a quiet machine (``deploykit.bench.quiet``): a 1-minute load average over 0.75 per CPU refuses
the run before any training or measuring, and a model whose run turned busy has its reports written
to a temporary folder instead (the script stops there, exit code 75). ``--allow-busy`` writes anyway,
stamped "measured on a busy machine" in each report and in the README table.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from deploykit.bench.quiet import BusyMachineError, QuietGuard, add_allow_busy_flag

ROOT = Path(__file__).resolve().parent.parent
STANDARD = ("micro", "micro-moe")
# Brief training budgets (seconds of `deploykit train --time-budget`, which shortens its schedule to fit):
# enough for the model to learn the corpus' shape, so quantization error shows in perplexity and task
# accuracy the way it does on real models (random weights exaggerate it).
TRAIN_SECONDS = {"micro": 240, "micro-moe": 240, "small": 900, "small-moe": 900}
BEGIN, END = "<!-- RESULTS:BEGIN -->", "<!-- RESULTS:END -->"


def ensure_checkpoint(model: str, runs: Path, steps: int | None, threads: int, seconds: float | None = None) -> Path:
    """``runs/<model>`` if it holds a checkpoint, else train one (``deploykit train``) and return it."""
    ckpt = runs / model
    if (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file():
        print(f"[{model}] reusing checkpoint {ckpt}", flush=True)
        return ckpt
    budget = seconds or TRAIN_SECONDS.get(model, 240)
    cmd = [sys.executable, "-m", "deploykit", "train", "--preset", model, "--data", "embedded",
           "--time-budget", str(budget), "--threads", str(threads), "--out", str(ckpt)]
    if steps:
        cmd += ["--steps", str(steps)]
    print(f"[{model}] training: {' '.join(cmd[2:])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, check=True, env=env)
    return ckpt


def update_readme(readme: Path, results_dir: Path) -> None:
    """Replace the block between the RESULTS markers with the summary table of every model benched so far."""
    import json

    from deploykit.bench.machine import describe
    from deploykit.bench.quiet import load_lines
    from deploykit.bench.report import seed_table

    found = [p.name for p in sorted(results_dir.iterdir()) if (p / "results.json").is_file()] \
        if results_dir.is_dir() else []
    models = [m for m in STANDARD if m in found] + [m for m in found if m not in STANDARD]
    parts = [BEGIN, ""]
    for model in models:
        path = results_dir / model / "results.json"
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        rel = Path(os.path.relpath(path.parent, readme.parent))
        busy = [line for line in load_lines(results.get("quiet")) if line.startswith(">")]
        parts += [f"### `{model}` — {results['model']['params']:,} parameters", "",
                  f"{describe(results['machine'])}; measured {results['created']}. "
                  f"Full table: [{rel}/report.md]({rel}/report.md).", "", *[f"{line}\n" for line in busy],
                  seed_table(results), "", f"![{model}: decode tokens/s vs size]({rel}/report.png)", ""]
    parts.append(END)
    text = readme.read_text() if readme.is_file() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(head + "\n".join(parts) + tail)


def main(argv: list[str] | None = None) -> int:
    from deploykit.bench.machine import available_cpus

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(STANDARD), help="comma-separated presets (default micro,micro-moe)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs", help="where checkpoints are reused or trained (default runs/)")
    p.add_argument("--steps", type=int, default=None, help="training steps when a checkpoint must be trained")
    p.add_argument("--train-seconds", type=float, default=None,
                   help=f"training time budget when a checkpoint must be trained (default {TRAIN_SECONDS})")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="report root")
    p.add_argument("--threads", type=int, default=available_cpus())
    p.add_argument("--backends", default="all")
    p.add_argument("--schemes", default="all")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rebuild report.md/png/csv and the README from each results.json")
    add_allow_busy_flag(p)
    args = p.parse_args(argv)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.report_only:
        import json

        from deploykit.bench.report import write_reports

        for model in models:
            folder = args.results / model
            write_reports(json.loads((folder / "results.json").read_text()), folder)
        _update_committed_readme(args.results)
        return 0
    try:
        # Before any training or measuring: a busy machine fails here, not minutes later.
        guard = QuietGuard.begin(args.results, allow_busy=args.allow_busy, threads=args.threads)
        for model in models:
            bench_one(model, args, guard)
    except BusyMachineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    _update_committed_readme(args.results)
    return 0


def bench_one(model: str, args: argparse.Namespace, guard: QuietGuard) -> None:
    """Train ``model`` if needed, bench it into ``args.results/<model>``, print its table."""
    from rich.console import Console

    from deploykit.bench import BenchConfig
    from deploykit.bench.progress import run_bench_with_progress
    from deploykit.bench.report import rich_table

    ckpt = ensure_checkpoint(model, args.runs, args.steps, args.threads, args.train_seconds)
    cfg = BenchConfig(model=ckpt, out=args.results / model, threads=args.threads,
                      backends=tuple(args.backends.split(",")), schemes=tuple(args.schemes.split(",")),
                      repeat=args.repeat, prompt_len=args.prompt_len, gen_len=args.gen_len,
                      allow_busy=args.allow_busy, force=True)  # regenerating the committed reports
    # The guard begun before training: its start load is the machine's, not this script's training.
    results = run_bench_with_progress(cfg, guard=guard)
    console = Console()
    console.print(rich_table(results))
    console.print(f"[{model}] {results['outputs']['md']}")


def _update_committed_readme(results_dir: Path) -> None:
    """The README's tables describe benchmarks/results/ only; reports written elsewhere stay out of it."""
    committed = ROOT / "benchmarks" / "results"
    if results_dir.resolve() != committed.resolve():
        print(f"benchmarks/README.md not updated: the reports are in {results_dir}, not {committed}")
        return
    update_readme(ROOT / "benchmarks" / "README.md", results_dir)


if __name__ == "__main__":
    sys.exit(main())
