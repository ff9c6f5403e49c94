"""Times the CUDA kernels (int8 dp4a GEMM + epilogue, MoE routing) against torch on the same GPU:
torch._int_mm (int8 -> int32), fp16/fp32 F.linear, and the vectorized torch routing.
Writes benchmarks/results/kernels_cuda.{json,md}. Run by run_cuda_checks.sh."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from deploykit.native import cuda as ncu


def cuda_time(fn, repeat=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeat):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) * 1e3)
    return statistics.median(ts)  # microseconds


def torch_route(logits, k):
    p = torch.softmax(logits, -1)
    w, ids = torch.topk(p, k, -1)
    w = w / w.sum(-1, keepdim=True)
    flat = ids.flatten()
    perm = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=logits.shape[1])
    return w, ids, perm, counts


def main():
    if not ncu.available():
        raise SystemExit(f"no GPU: {ncu.unavailable_reason()}")
    rows = []
    dev = "cuda"
    for K, N in [(512, 512), (512, 1408), (1408, 512), (1024, 4096), (4096, 1024), (2048, 2048)]:
        w = torch.randn(N, K)
        cw = ncu.pack_cuda_weight(w)
        w16 = w.half().to(dev)
        w32 = w.to(dev)
        b8 = torch.randint(-127, 128, (K, N), dtype=torch.int8, device=dev)
        for M in [1, 8, 64, 512, 4096]:
            x = torch.randn(M, K, device=dev)
            a8 = torch.randint(-127, 128, (max(M, 17), K), dtype=torch.int8, device=dev)
            r = dict(M=M, K=K, N=N,
                     native_us=cuda_time(lambda: ncu.int8_linear(x, cw)),
                     int_mm_us=cuda_time(lambda: torch._int_mm(a8, b8)),
                     fp16_us=cuda_time(lambda: F.linear(x.half(), w16)),
                     fp32_us=cuda_time(lambda: F.linear(x, w32)))
            r["native_tops"] = 2 * M * K * N / r["native_us"] / 1e6
            rows.append(r)
            print(r, flush=True)
    route = []
    for T in [1, 16, 256, 2048, 65536]:
        lg = torch.randn(T, 8, device=dev)
        route.append(dict(T=T, native_us=cuda_time(lambda: ncu.moe_route(lg, 2)),
                          torch_us=cuda_time(lambda: torch_route(lg, 2))))
        print(route[-1], flush=True)
    out = Path(__file__).resolve().parents[1] / "results"
    out.mkdir(exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    (out / "kernels_cuda.json").write_text(json.dumps(dict(meta=meta, gemm=rows, route=route), indent=1))
    with open(out / "kernels_cuda.md", "w") as f:
        f.write(f"# CUDA kernels on {meta['gpu']}\n\nmedian µs of 50 (CUDA events)\n\n")
        f.write("| M | K | N | native int8 µs | _int_mm µs | fp16 µs | fp32 µs | native TOP/s |\n|---|---|---|---|---|---|---|---|\n")
        for r in rows:
            f.write(f"| {r['M']} | {r['K']} | {r['N']} | {r['native_us']:.1f} | {r['int_mm_us']:.1f} | "
                    f"{r['fp16_us']:.1f} | {r['fp32_us']:.1f} | {r['native_tops']:.2f} |\n")
        f.write("\n| T | native route µs | torch route µs |\n|---|---|---|\n")
        for r in route:
            f.write(f"| {r['T']} | {r['native_us']:.1f} | {r['torch_us']:.1f} |\n")


if __name__ == "__main__":
    main()
