"""``deploykit plan``: parameters, training FLOPs, Chinchilla tokens, memory and time for a config."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

EXAMPLES = """\
examples:
  deploykit plan --preset small --tokens 1e9
  deploykit plan --preset micro-moe --batch-size 32 --gradient-checkpointing
  deploykit plan runs/demo --from-run runs/demo          # a checkpoint's config, that run's measured MFU
  deploykit plan --params 1.2e8 --tokens 2.4e9 --json    # only N: 6ND and 16 bytes/parameter

Training FLOPs = 6·N_matmul·D (every matrix product a token goes through, backward = 2 forwards)
+ the causal attention term 6·L·(T+1)·H·hd·D; tokens default to Chinchilla's 20 per parameter.
Memory: fp32 weights + gradients + AdamW moments (16 B/param) + activations (Korthikanti et al.).
Time = FLOPs / (peak × MFU): this machine's peak is a measured fp32 GEMM (skip with --no-measure),
accelerators use datasheet dense bf16 peaks; MFU is --mfu, or the median of a run's log (--from-run)."""


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (e.g. 1e9)") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("plan", help="estimate a training run: params, FLOPs, tokens, memory, time",
                       description="A compute plan for a model config, every term stated.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, nargs="?", help="plan for this checkpoint's config.json")
    p.add_argument("--preset", help="plan for a preset (nano, micro, small, with -moe / -legacy forms)")
    p.add_argument("--params", type=_number, help="plan from a parameter count alone")
    p.add_argument("--tokens", type=_number, help="training tokens (default: Chinchilla-optimal, 20 per parameter)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the config's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step, for activation memory (default 16)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="keep only block inputs for the backward")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation to assume (default 0.4)")
    p.add_argument("--from-run", type=Path, help="take MFU (and this machine's peak) from a training run's log")
    p.add_argument("--no-measure", action="store_true", help="do not time a GEMM for this machine's peak")
    p.add_argument("--threads", type=int, default=None, help="threads for the GEMM measurement")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _request(args: argparse.Namespace):
    from ..errors import ConfigError
    from ..model.checkpoint import load_config
    from ..model.config import preset
    from ..train.plan import DEFAULT_MFU, PlanRequest, run_mfu

    given = [x for x in (args.checkpoint, args.preset, args.params) if x is not None]
    if len(given) != 1:
        raise ConfigError("plan needs exactly one of CHECKPOINT, --preset and --params",
                          hint="e.g. deploykit plan --preset small --tokens 1e9")
    config = load_config(args.checkpoint) if args.checkpoint else preset(args.preset) if args.preset else None
    mfu, source, peak = args.mfu or DEFAULT_MFU, "given" if args.mfu else "assumed", None
    if args.from_run is not None:
        run, peak = run_mfu(args.from_run)
        if args.mfu is None:
            mfu, source = run, f"median of {args.from_run}'s log"
    if peak is None and not args.no_measure:
        import torch

        from ..train.optim import measure_peak_flops

        if args.threads:
            torch.set_num_threads(args.threads)
        peak = measure_peak_flops(n=1024)
    return PlanRequest(config=config, params=int(args.params) if args.params else None, tokens=args.tokens,
                       seq_len=args.seq_len, batch_size=args.batch_size,
                       gradient_checkpointing=args.gradient_checkpointing, mfu=mfu, mfu_source=source,
                       peak_flops=peak)


def run(args: argparse.Namespace) -> int:
    from ..train.plan import human_seconds, plan

    result = plan(_request(args))
    if args.json:
        print(json.dumps(_nan_to_none(result)))  # n/a terms (a --params plan) are null
        return 0
    f, m = result["flops"], result["memory_bytes"]
    print(f"parameters        {result['params']:,}" + (f" ({result['active_params']:,} active per token)"
                                                        if result.get("active_params", result["params"]) != result["params"] else ""))
    print(f"tokens            {result['tokens']:.3g} ({result['tokens_per_param']:.1f} per parameter; "
          f"Chinchilla-optimal {result['chinchilla_tokens']:.3g})")
    att = "n/a (needs the shape)" if f["attention"] != f["attention"] else f"{f['attention']:.3g}"
    print(f"training FLOPs    {f['total']:.3g} = matmul {f['matmul']:.3g} + attention {att}")
    gib = 2.0 ** 30
    act = "n/a" if m["activations"] != m["activations"] else f"{m['activations'] / gib:.2f}"
    print(f"memory (GiB)      {m['total'] / gib:.2f} = weights {m['weights'] / gib:.2f} + grads {m['gradients'] / gib:.2f}"
          f" + AdamW {m['optimizer'] / gib:.2f} + activations {act}"
          f"  ({result['memory_vs_weights']:.1f}× the weights; batch {result['batch_size']}"
          f"{', checkpointed' if result['gradient_checkpointing'] else ''})")
    print(f"time at MFU {next(iter(result['time'].values()))['mfu']:.0%} ({result['mfu_source']}):")
    for name, t in result["time"].items():
        print(f"  {name:<42} {t['peak_flops'] / 1e12:8.2f} TFLOP/s  {human_seconds(t['seconds'])}")
    return 0


def _nan_to_none(obj):
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    return obj
