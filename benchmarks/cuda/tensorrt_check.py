"""The whole TensorRT path on a machine with an NVIDIA GPU, in a few minutes:

1. the backend's GPU tests (``pytest -m gpu tests/test_tensorrt_backend.py``),
2. a small model trained for a few seconds, converted to every TensorRT scheme through
   ``deploykit.convert`` (export, Q/DQ, engine build, parity proof against fp32 torch on the GPU),
3. per scheme: engine size, build time, the proof's numbers, prefill and decode speed (KV cache on
   the GPU), beside the fp32 torch reference on the CPU.

Prints one table and writes runs/tensorrt_check/tensorrt_check.{json,md} (``--out`` elsewhere; copy it
to benchmarks/results/ by hand once checked: this script does not run the quiet-machine guard).

    pip install 'deploykit[tensorrt]' --extra-index-url https://pypi.nvidia.com   (plus a CUDA torch)
    python benchmarks/cuda/tensorrt_check.py [--quick]

``--quick`` skips the pytest step and times fewer tokens: a smoke run of the script itself.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def train(folder: Path, steps: int) -> Path:
    """The nano preset trained briefly on the embedded corpus (as the tests' fixture), saved to ``folder``."""
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tokenizer, train_tiny

    return train_tiny("nano", folder, make_tokenizer(), steps=steps)


def time_decode(runner, prompt: list[int], tokens: int) -> tuple[float, float]:
    """(prefill tok/s of the prompt, decode tok/s of ``tokens`` greedy steps) through a session."""
    import numpy as np

    session = runner.new_session()
    t0 = time.perf_counter()
    logits = session.feed(prompt)
    t1 = time.perf_counter()
    for _ in range(tokens):
        logits = session.feed([int(np.argmax(logits))])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), tokens / (t2 - t1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "tensorrt_check")
    parser.add_argument("--quick", action="store_true", help="no pytest step, fewer timed tokens")
    args = parser.parse_args()

    import torch

    import deploykit
    from deploykit.deploy.registry import get_backend

    backend = get_backend("tensorrt")
    missing = backend.missing_requirements()
    if missing:
        print(f"tensorrt cannot run here: {'; '.join(missing)}")
        return 4
    if not args.quick:
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", str(ROOT / "tests/test_tensorrt_backend.py")],
                       check=False, cwd=ROOT)
    tokens = 32 if args.quick else 256
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = train(Path(tmp) / "nano", steps=20 if args.quick else 60)
        prompt = deploykit.load(ckpt).tokenizer.encode("Once upon a time, there was a little", add_bos=True)
        rows.append({"backend": "torch (cpu)", "scheme": "fp32", "status": "reference",
                     **_speeds(deploykit.load(ckpt), prompt, tokens)})
        for scheme in backend.schemes:
            reason = backend.unsupported(scheme, deploykit.load(ckpt).config)
            if reason:
                rows.append({"backend": "tensorrt", "scheme": scheme.name, "status": f"not applicable: {reason}"})
                continue
            out = Path(tmp) / scheme.name
            t0 = time.perf_counter()
            try:
                result = deploykit.convert(ckpt, "tensorrt", scheme.name, out=out, allow_mismatch=True)
            except Exception as e:  # noqa: BLE001 - a failed scheme is a row, not the end of the check
                rows.append({"backend": "tensorrt", "scheme": scheme.name, "status": f"error: {type(e).__name__}: {e}"})
                continue
            r = result.report
            rows.append({"backend": "tensorrt", "scheme": scheme.name, "status": "ok" if r.passed() else "past tolerance",
                         "convert_s": round(time.perf_counter() - t0, 1),
                         "build_s": result.manifest["backend_info"].get("build_seconds"),
                         "engine_mb": round(result.manifest["backend_info"]["engine_bytes"] / 1e6, 2),
                         "max_abs_logit": r.max_abs_logit, "mean_kl": r.mean_kl, "top1": r.top1,
                         "greedy": r.greedy_match, "delta_ppl": r.delta_ppl,
                         **_speeds(deploykit.load(out), prompt, tokens)})
    gpu = torch.cuda.get_device_name(0)
    report = {"gpu": gpu, "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
              "tensorrt": backend.versions().get("tensorrt"), "tokens": tokens, "rows": rows}
    _write(args.out, report)
    return 0


def _speeds(runner, prompt: list[int], tokens: int) -> dict[str, float]:
    time_decode(runner, prompt, 8)  # warm-up: kernels, allocator, profiles
    prefill, decode = time_decode(runner, prompt, tokens)
    return {"prefill_tok_s": round(prefill, 1), "decode_tok_s": round(decode, 1)}


def _write(out: Path, report: dict) -> None:
    cols = ["backend", "scheme", "status", "engine_mb", "build_s", "max_abs_logit", "mean_kl", "top1", "greedy",
            "prefill_tok_s", "decode_tok_s"]
    lines = [f"# TensorRT check on {report['gpu']} (sm {report['compute_capability']}, TensorRT {report['tensorrt']})", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in report["rows"]:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in cols) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tensorrt_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "tensorrt_check.md").write_text(text)


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


if __name__ == "__main__":
    sys.exit(main())
