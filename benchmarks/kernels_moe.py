"""MoE benchmark (issue 5): routing only and the whole MoE-FFN layer, deploykit.native vs the
seed-style naive per-expert loop and a vectorized torch version (argsort + bincount +
index_add). d=512, ffn=1408, E=8, k=2, T in {1, 16, 256, 2048}; 2 threads; median of >= 20
after warm-up; same allocator settings for all (the script re-executes itself with
MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ set, see FACTS.md on page faults).

    python benchmarks/kernels_moe.py [--quick] [--repeat 25] [--out benchmarks/results] [--allow-busy]

--quick: T in {1, 16} only (a smoke run that proves the script works; kernels_moe_quick.*).

Into benchmarks/results/ only from a quiet machine (deploykit.bench.quiet): refused before measuring
when the 1-minute load average is over 0.75 per CPU; a run that turned busy writes to a temporary
folder instead. --allow-busy writes anyway, stamped "measured on a busy machine".
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from timing import timeit_interleaved, use_bench_allocator  # noqa: E402

_MALLOC_ENV = use_bench_allocator()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from deploykit import native  # noqa: E402
from deploykit.bench.machine import available_cpus, cpu_model, describe_native, native_isa  # noqa: E402
from deploykit.bench.quiet import (  # noqa: E402
    BusyMachineError,
    QuietGuard,
    QuietVerdict,
    add_allow_busy_flag,
    load_lines,
)

D, FF, E, K = 512, 1408, 8, 2
TS = [1, 16, 256, 2048]
TS_QUICK = [1, 16]
# Issue 11's goals: (row key, T predicate, minimum ratio, description)
GOALS = [("route_x_vec", lambda T: T >= 256, 5.0, "routing >= 5x vectorized torch at T >= 256"),
         ("layer_x_vec", lambda T: T >= 256, 3.0, "int8 MoE layer >= 3x torch fp32 at T >= 256"),
         ("layer_x_vec", lambda T: T == 16, 2.0, "int8 MoE layer >= 2x torch fp32 at T = 16")]
THREADS = 2


# --- routing ------------------------------------------------------------------------------
def route_naive(logits, k):
    """Seed style: softmax/topk, then a Python loop over experts collecting their tokens."""
    probs = torch.softmax(logits, -1)
    w, ids = torch.topk(probs, k, -1)
    w = w / w.sum(-1, keepdim=True)
    groups = []
    for e in range(logits.shape[1]):
        tok, slot = torch.where(ids == e)
        groups.append((tok, slot))
    return w, ids, groups


def route_vectorized(logits, k):
    probs = torch.softmax(logits, -1)
    w, ids = torch.topk(probs, k, -1)
    w = w / w.sum(-1, keepdim=True)
    flat = ids.flatten()
    perm = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=logits.shape[1])
    offsets = torch.cumsum(counts, 0)
    return w, ids, perm, counts, offsets


# --- whole layer (fp32 experts for the torch versions) --------------------------------------
def moe_naive(x, logits, w1, w3, w2, k):
    w, ids, groups = route_naive(logits, k)
    out = torch.zeros_like(x)
    for e, (tok, slot) in enumerate(groups):
        if tok.numel() == 0:
            continue
        xe = x[tok]
        ye = F.linear(F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e]), w2[e])
        out.index_add_(0, tok, ye * w[tok, slot, None])
    return out


def moe_vectorized(x, logits, w1, w3, w2, k):
    w, ids, perm, counts, _ = route_vectorized(logits, k)
    tok = perm // k
    xs = x[tok]  # (T*k, D) grouped by expert
    ys = torch.empty_like(xs)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            xe = xs[start:start + c]
            ys[start:start + c] = F.linear(F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e]), w2[e])
        start += c
    out = torch.zeros_like(x)
    out.index_add_(0, tok, ys * w.flatten()[perm, None])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=25)
    ap.add_argument("--quick", action="store_true", help="T in {1, 16} only (smoke run)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help="threads for every contender (issue 5 asks for 2; 1 is a check that is "
                         "less sensitive to other load on a shared machine)")
    add_allow_busy_flag(ap)
    args = ap.parse_args(argv)
    try:
        guard = QuietGuard.begin(args.out, allow_busy=args.allow_busy, threads=args.threads)  # before measuring
        rows, feats = measure(args)
        verdict = guard.finish(args.out)
        write_reports(args, verdict, rows, feats)
        verdict.raise_if_diverted()
    except BusyMachineError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def measure(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Routing and the whole layer timed per T for every contender: (rows, native.cpu_features())."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    feats = native.cpu_features()
    print("cpu_features:", json.dumps(feats))
    w1, w3 = torch.randn(E, FF, D) * 0.04, torch.randn(E, FF, D) * 0.04
    w2 = torch.randn(E, D, FF) * 0.03
    ex = native.pack_moe_experts(w1, w3, w2)
    router = torch.randn(E, D) * 0.05
    rows = []
    print(f"{'T':>5} | {'route us: native':>16} {'naive':>8} {'vector':>8} {'x naive':>8} {'x vec':>6} |"
          f" {'layer us: native':>16} {'naive':>9} {'vector':>9} {'x naive':>8} {'x vec':>6}")
    for T in TS_QUICK if args.quick else TS:
        x = torch.randn(T, D)
        logits = F.linear(x, router)
        with torch.inference_mode():
            t = timeit_interleaved({
                "route_native_us": lambda: native.moe_route(logits, K),
                "route_naive_us": lambda: route_naive(logits, K),
                "route_vec_us": lambda: route_vectorized(logits, K)}, args.repeat)
            t |= timeit_interleaved({
                "layer_native_us": lambda: native.moe_ffn(x, logits, ex, K),
                "layer_naive_us": lambda: moe_naive(x, logits, w1, w3, w2, K),
                "layer_vec_us": lambda: moe_vectorized(x, logits, w1, w3, w2, K)}, args.repeat)
            r = dict(T=T, **{k: v * 1e6 for k, v in t.items()})
            ref = moe_naive(x, logits, w1, w3, w2, K)
            r["layer_rel_err_vs_fp32"] = float((native.moe_ffn(x, logits, ex, K) - ref).abs().max()
                                               / ref.abs().max())
        for p in ("route", "layer"):
            r[f"{p}_x_naive"] = r[f"{p}_naive_us"] / r[f"{p}_native_us"]
            r[f"{p}_x_vec"] = r[f"{p}_vec_us"] / r[f"{p}_native_us"]
        rows.append(r)
        print(f"{T:>5} | {r['route_native_us']:>16.1f} {r['route_naive_us']:>8.1f} {r['route_vec_us']:>8.1f} "
              f"{r['route_x_naive']:>8.1f} {r['route_x_vec']:>6.1f} | {r['layer_native_us']:>16.1f} "
              f"{r['layer_naive_us']:>9.1f} {r['layer_vec_us']:>9.1f} {r['layer_x_naive']:>8.2f} "
              f"{r['layer_x_vec']:>6.2f}", flush=True)
    return rows, feats


def write_reports(args: argparse.Namespace, verdict: QuietVerdict, rows: list[dict], feats: dict) -> None:
    """<stem>.json and <stem>.md into ``verdict.write_to`` (``--out``, unless a busy run was diverted)."""
    stamp = verdict.stamp()
    meta = dict(threads=args.threads, repeat=args.repeat, statistic="median", torch=torch.__version__,
                python=platform.python_version(), malloc_env=_MALLOC_ENV, cpu_model=cpu_model(),
                available_cpus=available_cpus(), native=native_isa(), cpu_features=feats,
                isa=native.selected_isa(), load_avg=stamp["load_average_end"], quiet=stamp, d=D, ffn=FF, E=E, k=K,
                time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    out = verdict.write_to
    out.mkdir(parents=True, exist_ok=True)
    stem = "kernels_moe_quick" if args.quick else "kernels_moe"
    if args.threads != THREADS:
        stem += f"_{args.threads}t"
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    with open(out / f"{stem}.md", "w") as f:
        f.write(f"# MoE: deploykit.native vs naive per-expert loop vs vectorized torch\n\n"
                f"d={D}, ffn={FF}, E={E}, k={K}; {meta['cpu_model']}, {meta['available_cpus']} CPUs; "
                f"{describe_native(meta['native'])}; {args.threads} threads, median of {args.repeat}. "
                "× = baseline time / native time. The torch layers run fp32 experts, native runs int8 "
                "experts (layer_rel_err = max |native - fp32| / max |fp32|).\n\n")
        f.write("".join(f"{line}\n\n" for line in load_lines(stamp)))
        f.write("| T | route native µs | naive µs | vectorized µs | × naive | × vectorized | "
                "layer native µs | naive µs | vectorized µs | × naive | × vectorized | layer rel err |\n")
        f.write("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for r in rows:
            f.write(f"| {r['T']} | {r['route_native_us']:.1f} | {r['route_naive_us']:.1f} | "
                    f"{r['route_vec_us']:.1f} | {r['route_x_naive']:.1f} | {r['route_x_vec']:.1f} | "
                    f"{r['layer_native_us']:.1f} | {r['layer_naive_us']:.1f} | {r['layer_vec_us']:.1f} | "
                    f"{r['layer_x_naive']:.2f} | {r['layer_x_vec']:.2f} | {r['layer_rel_err_vs_fp32']:.4f} |\n")
        f.write("\n## Goals (issue 11)\n\n")
        f.writelines(f"- {line}\n" for line in goal_lines(rows))
        f.write(f"\ncpu_features: `{json.dumps(feats)}`\n")


def goal_lines(rows: list[dict]) -> list[str]:
    """One line per goal: the measured ratios at the T it covers, met or missed (or not measured)."""
    out = []
    for key, covers, need, what in GOALS:
        got = [(r["T"], r[key]) for r in rows if covers(r["T"])]
        if not got:
            out.append(f"{what}: not measured in this run")
            continue
        ok = all(v >= need for _, v in got)
        vals = ", ".join(f"T={t}: {v:.1f}x" for t, v in got)
        out.append(f"{what}: {vals} -> {'met' if ok else 'missed'}")
    return out


if __name__ == "__main__":
    sys.exit(main())
