"""How much each int8 and 4-bit scheme costs in accuracy, per backend and method, on held-out text.

    .venv/bin/python benchmarks/quantization_accuracy.py runs/demo runs/micro runs/micro-moe
    .venv/bin/python benchmarks/quantization_accuracy.py runs/micro --backends native,gguf --append
    .venv/bin/python benchmarks/quantization_accuracy.py runs/demo --backends torch --schemes int8-static --append

``--append`` keeps the rows of the ``--out`` json that this run does not measure and replaces those it
does (same model, backend, scheme and method), and keeps the json's ``notes`` (prose written under the
table of the md).

For every (backend, scheme, method) it converts the checkpoint (``allow_mismatch=True``, so a failed
proof still leaves an artifact to measure), loads the artifact through its own runner and compares it,
teacher-forced, with the fp32 torch model on held-out text (``deploykit.bench.inputs``: corpus-style
documents from a seed no training run uses, blocks of ``--block`` tokens): max |Δlogit| (also divided
by the fp32 logit range of the position, the scaled bound the tolerances use), mean KL(p_fp32 ‖ p_q),
top-1 agreement and Δ perplexity. The proof's own verdict (``passed``, violations) is copied beside it.

Methods are scheme options (``--option``): a method a backend does not offer is skipped, not faked.
Accuracy does not depend on machine load, so no quiet-machine guard; float results can differ slightly
between instruction sets, so the report names the CPU and its ISA.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

# method -> scheme options. "default" is what `deploykit convert` does with no --option. A method a
# scheme does not take (an unknown option) is skipped. torch's int8 weights are per output channel in
# every method. 4-bit: "rtn" / "gptq" are deploykit's rounding (deploykit.deploy.gptq) of native int4 and of
# gguf q4_0 / q4_k_m (written as Q4_0 / Q4_K blocks, MoE experts included); gguf's "default" is llama.cpp's own
# quantizer (plain Q4_0 / Q4_K_M), "imatrix" llama.cpp's quantizer with an importance matrix from the calibration set,
# "gptq-imatrix" GPTQ's codes on the grid llama.cpp's importance-weighted quantizer chooses.
METHODS: dict[str, dict[str, Any]] = {
    "default": {},
    "lm_head fp32": {"quantize_lm_head": False},
    "smoothquant": {"smoothquant": True},
    # the static schemes of torch (int8-static / qat) and onnx (int8-static) smooth by default: without it
    "no smoothquant": {"smoothquant": False},
    "block 0 fp32": {"keep_fp32": "model.layers.0"},
    # onnx int8-dynamic quantizes activations per token by default; this is ORT's own one scale per tensor
    "per tensor": {"per_token": False},
    # every layer int8: what the schemes whose default is keep_fp32=auto (torch int8-static / qat,
    # tflite int8) do without it. Skipped where it is the default (it would repeat "default").
    "all int8": {"keep_fp32": ""},
    "rtn": {"rounding": "rtn"},
    "gptq": {"rounding": "gptq"},
    "imatrix": {"rounding": "imatrix"},
    "gptq-imatrix": {"rounding": "gptq-imatrix"},
}
SCHEMES = {"torch": ("int8-dynamic", "int8-static", "int8-qat"), "onnx": ("int8-dynamic", "int8-static"),
           "native": ("int8", "int8-moe", "int4"), "gguf": ("q8_0", "q4_0", "q4_k_m"), "tflite": ("int8-dynamic", "int8")}
HALF_SCHEMES = {"torch": ("bf16",), "onnx": ("fp16",), "native": (), "gguf": (), "tflite": ("fp16",)}


def held_out(tokenizer: Any, n_blocks: int, block: int) -> np.ndarray:
    """The bench's held-out documents (bos + text + eos each), cut into n_blocks rows of block tokens."""
    from deploykit.bench.inputs import held_out_texts

    stream: list[int] = []
    for text in held_out_texts(None):
        stream += tokenizer.encode(text, add_bos=True) + [tokenizer.eos_id]
        if len(stream) >= n_blocks * block:
            break
    return np.asarray(stream[: n_blocks * block], dtype=np.int64).reshape(n_blocks, block)  # (N, S)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare(ref: np.ndarray, got: np.ndarray, ids: np.ndarray) -> dict[str, float]:
    """ref, got (N, S, V) logits; ids (N, S). Teacher-forced numbers over all N*S positions."""
    lp, lq = _log_softmax(ref), _log_softmax(got)
    kl = np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0)  # (N, S)
    diff = np.abs(ref.astype(np.float64) - got).max(-1)  # (N, S)
    span = ref.max(-1) - ref.min(-1)  # (N, S): the fp32 logit range per position
    tgt = ids[:, 1:]
    nll_ref = -np.take_along_axis(lp[:, :-1], tgt[..., None], -1).mean()
    nll = -np.take_along_axis(lq[:, :-1], tgt[..., None], -1).mean()
    return {"max_abs_logit": float(diff.max()), "max_rel_logit": float((diff / span).max()),
            "mean_kl": float(kl.mean()), "top1": float((ref.argmax(-1) == got.argmax(-1)).mean()),
            "ppl_fp32": float(np.exp(nll_ref)), "ppl": float(np.exp(nll)),
            "delta_ppl_pct": float(100 * (np.exp(nll - nll_ref) - 1))}


def measure(source: Path, backend: str, scheme: str, options: dict[str, Any], ids: np.ndarray,
            ref: np.ndarray, work: Path, threads: int | None = None) -> dict[str, Any]:
    import deploykit
    from deploykit.errors import BackendError, ConfigError

    out = work / f"{backend}-{scheme}"
    if options and _same_as_default(backend, scheme, options):
        return {"skipped": "the scheme's default already (the 'default' row)"}
    t0 = time.perf_counter()
    try:
        res = deploykit.convert(source, backend, scheme, out, force=True, allow_mismatch=True, options=options)
    except ConfigError as e:  # an option this scheme does not take: the method does not exist here
        return {"skipped": str(e).splitlines()[0]}
    except BackendError as e:  # a scheme that does not run this model (native int4 on MoE), said why
        if "cannot convert this model" not in str(e):
            raise
        return {"skipped": str(e).splitlines()[0]}
    runner = deploykit.load(out, threads=threads)
    got = np.concatenate([np.asarray(runner.forward(ids[i:i + 1]), np.float32) for i in range(len(ids))])
    row = compare(ref, got, ids)
    rep = res.report
    row |= {"convert_seconds": round(time.perf_counter() - t0, 1), "passed": rep.passed(),
            "violations": rep.violations(), "options": res.manifest.get("options"),
            "proof": {k: v for k, v in rep.to_dict()["summary"].items()}}
    return row


def _same_as_default(backend: str, scheme: str, options: dict[str, Any]) -> bool:
    from deploykit.deploy.registry import registry
    from deploykit.errors import ConfigError

    sch = registry().get_backend(backend).scheme(scheme)
    try:
        return sch.parse_options(options, backend=backend) == sch.parse_options({}, backend=backend)
    except ConfigError:  # an option the scheme does not take: measure() reports the skip
        return False


def _key(row: dict[str, Any]) -> tuple[str, str, str, str]:
    return row["model"], row["backend"], row["scheme"], row["method"]


def main(argv: list[str] | None = None) -> int:
    import torch

    from deploykit.model.checkpoint import load_model
    from deploykit.model.tokenizer import Tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--backends", default="torch,onnx")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--schemes", default="", help="comma list to restrict the schemes (default: all int8 + half)")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/quantization_accuracy"))
    p.add_argument("--append", action="store_true", help="add these rows to the --out json instead of replacing it")
    p.add_argument("--threads", type=int, default=2, help="torch and runtime threads (1 on a shared machine)")
    p.add_argument("--name", action="append", default=[],
                   help="CHECKPOINT=NAME: the model column for a checkpoint (default: its folder name)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = dict(x.split("=", 1) for x in args.name)
    rows: list[dict[str, Any]] = []
    notes = ""
    if args.append and args.out.with_suffix(".json").is_file():
        previous = json.loads(args.out.with_suffix(".json").read_text())
        rows, notes = previous["rows"], previous.get("notes", "")
    with tempfile.TemporaryDirectory() as tmp:
        for src in args.checkpoints:
            tok = Tokenizer.load(src)
            model = load_model(src).eval()
            ids = held_out(tok, args.blocks, min(args.block, model.config.max_seq_len))
            with torch.inference_mode():
                ref = np.concatenate([model(torch.from_numpy(ids[i:i + 1])).float().numpy() for i in range(len(ids))])
            for backend in args.backends.split(","):
                plan = [(s, m) for s in SCHEMES[backend] for m in args.methods.split(",")]
                plan += [(s, "default") for s in HALF_SCHEMES[backend] if "default" in args.methods.split(",")]
                for scheme, method in plan:
                    if args.schemes and scheme not in args.schemes.split(","):
                        continue
                    row = {"model": names.get(str(src), src.name), "backend": backend, "scheme": scheme, "method": method}
                    row |= measure(src, backend, scheme, METHODS[method], ids, ref, Path(tmp), args.threads)
                    at = next((i for i, r in enumerate(rows) if _key(r) == _key(row)), None)
                    rows = rows + [row] if at is None else rows[:at] + [row] + rows[at + 1:]  # in its old place
                    print(json.dumps({k: v for k, v in row.items() if k not in ("proof", "options")}), flush=True)
                    _write(args, rows, notes)  # after every row: a long run stopped midway keeps its rows
    _write(args, rows, notes)
    return 0


def _write(args: argparse.Namespace, rows: list[dict[str, Any]], notes: str) -> None:
    import torch

    from deploykit.bench.machine import cpu_model, machine_info

    flags = machine_info(2)["cpu_flags"]
    isa = ", ".join(f for f, on in flags.items() if on) or "no flag of deploykit's list"
    report = {"machine": {"cpu": cpu_model(), "isa": isa, "torch": torch.__version__},
              "held_out": {"blocks": args.blocks, "block": args.block}, "rows": rows, "notes": notes}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    args.out.with_suffix(".md").write_text(render(report))


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# Quantization accuracy: int8 and 4-bit schemes vs fp32 torch",
        "",
        f"Machine: {m['cpu']}; ISA flags {m['isa']}; torch {m['torch']}. Held-out text: {report['held_out']['blocks']} "
        f"blocks of {report['held_out']['block']} tokens (deploykit.bench.inputs), teacher-forced. The proof columns "
        "are the artifact's own parity proof (deploykit.deploy.parity probes) against its declared tolerance. "
        "Written by `benchmarks/quantization_accuracy.py`; accuracy does not depend on machine load, but float "
        "results can differ slightly across ISAs.",
        "",
        "| model | backend | scheme | method | held-out max \\|Δlogit\\| | / logit range | KL | top-1 | Δppl % "
        "| proof Δppl % | proof KL | proof top-1 | proof |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        if "skipped" in r:
            continue
        proof = "pass" if r["passed"] else "**fail**: " + "; ".join(r["violations"]).replace("|", "\\|")
        q = r.get("proof", {})
        dp = f"{100 * q['delta_ppl']:+.2f}" if "delta_ppl" in q else "-"
        lines.append(f"| {r['model']} | {r['backend']} | {r['scheme']} | {r['method']} | {r['max_abs_logit']:.3g} | "
                     f"{r['max_rel_logit']:.3f} | {r['mean_kl']:.2g} | {r['top1']:.3f} | {r['delta_ppl_pct']:+.2f} | "
                     f"{dp} | {format(q['mean_kl'], '.2g') if 'mean_kl' in q else '-'} | "
                     f"{format(q['top1'], '.3f') if 'top1' in q else '-'} | {proof} |")
    if report.get("notes"):
        lines += ["", report["notes"].rstrip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
