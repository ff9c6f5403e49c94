"""Training throughput on one machine: 1 process x 2 threads against 2 processes x 1 thread (DDP over
gloo, launched by torchrun), the all-reduce each DDP step must pay, and the peak memory of a step with
and without gradient checkpointing.

- throughput (``--preset``, default micro): ``deploykit train`` runs ``--steps`` optimizer steps on the
  embedded corpus, once as one process with 2 threads and once as ``torchrun --nproc_per_node 2`` with
  1 thread per rank, the same global batch; tokens/s is the global batch over the median step time of
  the second half of the steps (the first ones pay for allocations), MFU is 6 · params · tokens/s over
  the machine's measured fp32 GEMM peak on 2 threads (both runs are measured against the same figure).
  The runs alternate ``--repeat`` times, so load changes on a shared machine hit both alike.
- all-reduce: 2 gloo ranks all-reduce one fp32 buffer the size of the model's gradients (what DDP sends
  each step, in its buckets), median of 20 after warm-up; set beside the 2-process step time.
- memory (``--memory-preset``, default small): ``deploykit train --memory-report`` (torch's MemTracker:
  parameters, gradients, AdamW state, activations, peak) with and without ``--grad-checkpointing``, each in
  its own process, with that process's peak RSS.

    python benchmarks/train_scaling.py                      # the real run, into benchmarks/results/
    python benchmarks/train_scaling.py --tiny --allow-busy --out /tmp/scaling   # proves it works (nano, seconds)

Into benchmarks/results/ only from a quiet machine (deploykit.bench.quiet); --allow-busy writes anyway,
stamped "measured on a busy machine".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# the all-reduce worker (run under torchrun by this same script)
# ---------------------------------------------------------------------------------------------
def allreduce_worker(numel: int, repeat: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    buf = torch.randn(numel)  # (numel,) fp32: every gradient of the model, flattened
    for _ in range(3):
        dist.all_reduce(buf)
    times = []
    for _ in range(repeat):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        times.append(time.perf_counter() - t0)
    if dist.get_rank() == 0:
        print(json.dumps({"allreduce_s": statistics.median(times), "min_s": min(times), "bytes": numel * 4}))
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# the measurements
# ---------------------------------------------------------------------------------------------
def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def _last_json(text: str) -> dict:
    return json.loads(next(line for line in reversed(text.strip().splitlines()) if line.startswith("{")))


def _train(args: argparse.Namespace, out: Path, tokenizer: Path | None, *, procs: int, peak: float) -> dict:
    flags = ["train", "--preset", args.preset, "--data", "embedded", "--steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--block-size", str(args.block_size), "--eval-interval", "0",
             "--checkpoint-interval", "0", "--sample-tokens", "1", "--threads", str(2 // procs),
             "--peak-flops", str(peak / procs), "--out", str(out), "--force", "--json", "--no-progress"]
    if tokenizer is not None:
        flags += ["--tokenizer", str(tokenizer)]
    if procs == 1:
        cmd = [sys.executable, "-m", "deploykit", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "deploykit", *flags, "--strategy", "ddp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(2 // procs), cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    summary = _last_json(proc.stdout)
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    secs = [r["step_seconds"] for r in steps if r["kind"] == "train"]
    steady = statistics.median(secs[len(secs) // 2:])
    tps = args.batch_size * args.block_size / steady
    return {"processes": procs, "threads_per_process": 2 // procs, "step_s": steady, "tokens_per_s": tps,
            "mfu": 6 * summary["active_params"] * tps / peak, "params": summary["params"],
            "final_loss": summary["train_loss"]}


def _allreduce(numel: int, repeat: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--allreduce-worker", str(numel), "--repeat", str(repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(1), cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"all-reduce worker failed:\n{proc.stderr[-3000:]}")
    return _last_json(proc.stdout)


def _memory(preset: str, batch: int, block: int, checkpointing: bool) -> dict:
    cmd = [sys.executable, "-m", "deploykit", "train", "--preset", preset, "--batch-size", str(batch),
           "--block-size", str(block), "--memory-report", "--json", "--out", os.devnull,
           *(["--grad-checkpointing"] if checkpointing else [])]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_env(2), cwd=ROOT)
        stdout = proc.stdout.read()
        # wait4, not wait: the rusage of this child alone, whose ru_maxrss is its own peak RSS (KiB on Linux)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read()[-3000:]}")
    return {**_last_json(stdout), "process_peak_rss_bytes": usage.ru_maxrss * 1024}


def _peak_flops() -> float:
    import torch

    from deploykit.train.optim import measure_peak_flops

    torch.set_num_threads(2)
    return measure_peak_flops(torch.float32)


def measure(args: argparse.Namespace) -> dict:
    peak = _peak_flops()
    with tempfile.TemporaryDirectory(prefix="train_scaling-") as tmp:
        tmp = Path(tmp)
        runs: dict[str, list[dict]] = {"1x2": [], "2x1": []}
        tokenizer = None
        for i in range(args.repeat):  # alternate, so load changes hit both layouts alike
            for procs, key in ((1, "1x2"), (2, "2x1")):
                out = tmp / f"{key}-{i}"
                runs[key].append(_train(args, out, tokenizer, procs=procs, peak=peak))
                tokenizer = tokenizer or out  # the first run's tokenizer for the rest: same data, less set-up
    best = {k: min(v, key=lambda r: r["step_s"]) for k, v in runs.items()}
    numel = best["1x2"]["params"]
    reduce = _allreduce(numel, 20 if not args.tiny else 3)
    memory = [_memory(args.memory_preset, args.memory_batch, args.memory_block, c) for c in (False, True)]
    return {"peak_flops_2_threads": peak, "runs": runs, "best": best, "allreduce": reduce,
            "allreduce_share_of_2x1_step": reduce["allreduce_s"] / best["2x1"]["step_s"],
            "speedup_2x1_over_1x2": best["2x1"]["tokens_per_s"] / best["1x2"]["tokens_per_s"], "memory": memory}


def markdown(res: dict) -> str:
    from deploykit.bench.quiet import load_lines

    a = res["args"]
    lines = ["# Training scaling: 1 process x 2 threads vs 2 processes x 1 thread (DDP, gloo)", "",
             f"{res['machine']['cpu_model']}; preset **{a['preset']}**, global batch {a['batch_size']} x "
             f"{a['block_size']} tokens, {a['steps']} steps per run, best of {a['repeat']} alternating runs "
             "(median step time of the second half of each run).", "",
             *[f"{line}\n" for line in load_lines(res.get("quiet"))],
             f"MFU is against the measured fp32 2048³ GEMM peak on 2 threads: {res['peak_flops_2_threads'] / 1e9:.0f} "
             "GFLOP/s.", "",
             "| layout | step s | tokens/s | MFU |", "|---|---:|---:|---:|"]
    for key, r in res["best"].items():
        lines.append(f"| {key.replace('x', ' process(es) x ')} thread(s) | {r['step_s']:.4f} | {r['tokens_per_s']:,.0f} "
                     f"| {r['mfu']:.1%} |")
    ar = res["allreduce"]
    lines += ["", f"2 x 1 over 1 x 2: **{res['speedup_2x1_over_1x2']:.2f}x** tokens/s. One all-reduce of the "
              f"gradients ({ar['bytes'] / 1e6:.1f} MB fp32, 2 gloo ranks): {ar['allreduce_s'] * 1e3:.1f} ms median "
              f"(min {ar['min_s'] * 1e3:.1f}), {res['allreduce_share_of_2x1_step']:.0%} of a 2-process step.", "",
              f"## Memory of one step ({a['memory_preset']}, batch {a['memory_batch']} x {a['memory_block']})", "",
              "| | params MiB | grads MiB | AdamW MiB | activations MiB | step peak MiB | peak / params | "
              "(w+g+opt) / params | process peak RSS MiB |", "|---|" + "---:|" * 8]
    mib = 1 << 20
    for m in res["memory"]:
        rss = m["process_peak_rss_bytes"]
        lines.append(f"| {'gradient checkpointing' if m['grad_checkpointing'] else 'plain'} | {m['params'] / mib:.1f} "
                     f"| {m['grads'] / mib:.1f} | {m['optimizer'] / mib:.1f} | {m['activations'] / mib:.1f} "
                     f"| {m['peak'] / mib:.1f} | {m['peak_ratio']:.2f}x | {m['static_ratio']:.2f}x "
                     f"| {'n/a' if rss is None else f'{rss / mib:.0f}'} |")
    plain, ckpt = res["memory"]
    lines += ["", f"Gradient checkpointing keeps {ckpt['activations'] / plain['activations']:.0%} of the activations "
              f"and {ckpt['peak'] / plain['peak']:.0%} of the step's peak. The seed's \"3-4x model size\" is weights + "
              "gradients + two AdamW moments (4.00x in fp32); activations come on top and depend on batch x context.",
              "Process peak RSS is each report's own process (os.wait4), torch and Python included."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="micro")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory-preset", default="small")
    ap.add_argument("--memory-batch", type=int, default=8)
    ap.add_argument("--memory-block", type=int, default=256)
    ap.add_argument("--tiny", action="store_true", help="nano, 4 steps, 1 repeat: proves the script works")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--allreduce-worker", type=int, metavar="NUMEL", help=argparse.SUPPRESS)
    from deploykit.bench.quiet import BusyMachineError, QuietGuard, add_allow_busy_flag

    add_allow_busy_flag(ap)
    args = ap.parse_args(argv)
    if args.allreduce_worker is not None:
        allreduce_worker(args.allreduce_worker, args.repeat)
        return 0
    if args.tiny:
        args.preset, args.steps, args.repeat, args.batch_size, args.block_size = "nano", 4, 1, 4, 32
        args.memory_preset, args.memory_batch, args.memory_block = "nano", 2, 32
    if args.tiny and args.out.resolve() == (ROOT / "benchmarks" / "results").resolve():
        ap.error("--tiny numbers do not go into benchmarks/results/: pass --out")
    try:
        guard = QuietGuard.begin(args.out, allow_busy=args.allow_busy, threads=2)
        res = measure(args)
        verdict = guard.finish(args.out)
    except BusyMachineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    from deploykit.bench.machine import machine_info

    res = {"benchmark": "train_scaling", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "args": {k: v for k, v in vars(args).items() if k not in ("out", "allreduce_worker")},
           "machine": {**machine_info(2), "load_average_end": verdict.end.averages}, "quiet": verdict.stamp(), **res}
    out = verdict.write_to
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_scaling.json").write_text(json.dumps(res, indent=2, default=float) + "\n")
    (out / "train_scaling.md").write_text(markdown(res))
    print(markdown(res))
    try:
        verdict.raise_if_diverted()
    except BusyMachineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
