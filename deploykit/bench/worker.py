"""One bench row, measured in a process of its own: ``python -m deploykit.bench.worker SPEC.json``.

Why a subprocess per row: a runtime that crashes (a segfault in a native library), leaks or grabs
memory cannot spoil the rows after it, peak RSS is the row's own, and every row starts equally cold.
The parent (``deploykit.bench.harness``) writes SPEC.json, runs this module with a fixed thread count
and the same allocator environment for every row, and reads the result JSON it writes. A worker that
dies without writing one becomes an error row.

Two phases, each its own process:

- ``convert``: ``deploykit.convert`` the source checkpoint into the cached artifact folder.
- ``measure``: load the artifact, time prefill and decode, then score parity, perplexity, tasks and
  MoE routing against the fp32 reference in ``inputs.npz`` (see ``deploykit.bench.inputs``).
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from deploykit.deploy.registry import PluginRegistry


def _pin_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)  # no inter-op pool competing with the intra-op threads
    except RuntimeError:  # already started; harmless
        pass


def _stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples, dtype=np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "q1": float(np.percentile(a, 25)), "q3": float(np.percentile(a, 75))}


# -- convert -----------------------------------------------------------------------------------------
def run_convert(spec: dict[str, Any]) -> dict[str, Any]:
    import deploykit

    _pin_threads(spec["threads"])
    t0 = time.perf_counter()
    # allow_mismatch: a scheme past its parity tolerance is still worth a row; the manifest records
    # the failure and the row shows the numbers, instead of the bench hiding the scheme.
    deploykit.convert(spec["source"], spec["backend"], quant=spec["scheme"], out=spec["artifact"],
                      force=True, verify=True, allow_mismatch=True, threads=spec["threads"])
    return {"convert_s": time.perf_counter() - t0}


# -- measure -----------------------------------------------------------------------------------------
def _time_prefill(runner: Any, prompt: np.ndarray, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        runner.forward(prompt)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        runner.forward(prompt)  # (B, P) -> (B, P, V)
        out.append(time.perf_counter() - t0)
    return out


def _time_decode(runner: Any, prompt: np.ndarray, tokens: np.ndarray, warmup: int, repeat: int) -> list[float]:
    """Seconds to feed ``tokens`` one at a time after an (untimed) prefill of ``prompt``.

    The tokens are fixed (teacher-forced from held-out text) rather than sampled, so every backend
    does identical work; MoE routing, and with it the cost, depends on the tokens.
    """
    out = []
    for i in range(warmup + repeat):
        session = runner.new_session()
        session.feed(prompt.tolist())
        t0 = time.perf_counter()
        for tok in tokens.tolist():
            session.feed([tok])
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _parity(runner: Any, data: Any) -> tuple[dict[str, float], list[np.ndarray]]:
    """max |Δlogit|, top-1 agreement and mean KL(p_ref ‖ p_row) over all probe positions."""
    max_abs, agree, kl, n = 0.0, 0, 0.0, 0
    experts: list[np.ndarray] = []
    i = 0
    while f"probe_{i}" in data:
        ref = data[f"ref_logits_{i}"][0]  # (T, V)
        got = np.asarray(runner.forward(data[f"probe_{i}"]), dtype=np.float32)[0]  # (T, V)
        routing = _runner_routing(runner)
        if routing is not None:
            experts.append(routing)
        max_abs = max(max_abs, float(np.abs(got - ref).max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        lp_ref, lp_got = _log_softmax(ref), _log_softmax(got)
        kl += float((np.exp(lp_ref) * (lp_ref - lp_got)).sum())
        n += ref.shape[0]
        i += 1
    return {"parity_max_abs_logit": max_abs, "parity_top1": agree / n, "parity_kl": kl / n}, experts


def _runner_routing(runner: Any) -> np.ndarray | None:
    """Experts chosen in the runner's last forward, (L, T, k), when the runner exposes its torch model.

    deploykit's MoE layers record ``last_experts``; runtimes that compile the graph (ONNX Runtime,
    llama.cpp...) keep routing internal, so those rows report n/a.
    """
    model = getattr(runner, "model", None)
    layers = model.moe_layers() if hasattr(model, "moe_layers") else []
    chosen = [m.last_experts for m in layers if getattr(m, "last_experts", None) is not None]
    if not chosen or len(chosen) != len(layers):
        return None
    import torch

    return torch.stack([c.reshape(-1, c.shape[-1]) for c in chosen]).cpu().numpy()  # (L, T, k)


def _routing_agreement(data: Any, experts: list[np.ndarray]) -> float:
    """Share of (layer, token) pairs whose top-k expert *set* equals the fp32 reference's."""
    same, total = 0, 0
    for i, got in enumerate(experts):
        ref = data[f"ref_experts_{i}"]  # (L, T, k)
        same += int((np.sort(got, -1) == np.sort(ref, -1)).all(-1).sum())
        total += ref.shape[0] * ref.shape[1]
    return same / total


def _perplexity(runner: Any, blocks: np.ndarray) -> float:
    """``deploykit eval``'s sliding-window perplexity over the blocks (N, S+1), which overlap by one
    token: S-token windows at stride S score exactly the blocks' targets, one block in memory at a time."""
    from deploykit.eval.perplexity import sliding_perplexity

    S = blocks.shape[1] - 1
    stream = np.concatenate([blocks[0], *(b[1:] for b in blocks[1:])])  # (N·S + 1,)
    return sliding_perplexity(runner.forward, stream, window=S, stride=S).ppl


def _task_completions(runner: Any, tasks: list[dict[str, Any]]) -> list[list[int]]:
    from deploykit.model.generation import decode_loop

    return [decode_loop(runner.new_session(), t["ids"], max_new_tokens=t["max_new_tokens"],
                        eos_token_id=runner.eos_token_id) for t in tasks]


def _peak_rss() -> int:
    """Peak resident bytes of this process image.

    /proc/self/status VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across fork + exec, so
    every worker would report at least the parent's RSS at fork time (the same number for every row).
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource  # not Linux: ru_maxrss (bytes on macOS)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_measure(spec: dict[str, Any]) -> dict[str, Any]:
    import psutil

    _pin_threads(spec["threads"])
    import deploykit.deploy.runtime

    data = np.load(spec["inputs"], allow_pickle=False)
    prompt = data["prompt"]  # (B, P)
    base_rss = psutil.Process().memory_info().rss  # interpreter + torch + numpy, before the artifact

    t0 = time.perf_counter()
    runner = deploykit.deploy.runtime.load(spec["artifact"], threads=spec["threads"])
    load_s = time.perf_counter() - t0

    prefill = _time_prefill(runner, prompt, spec["warmup"], spec["repeat"])
    decode = _time_decode(runner, prompt[0], data["decode_tokens"], spec["warmup"], spec["repeat"])
    # Peak RSS of serving (load + prefill + decode), before the accuracy passes below add their own.
    peak_rss = _peak_rss()

    n_prompt = prompt.shape[0] * prompt.shape[1]
    n_decode = len(data["decode_tokens"])
    ps, ds = _stats(prefill), _stats([n_decode / s for s in decode])
    kv_cache = runner.info.kv_cache
    result: dict[str, Any] = {
        "load_s": load_s,
        "prefill_ms": ps["median"] * 1e3, "prefill_ms_min": ps["min"] * 1e3, "prefill_ms_max": ps["max"] * 1e3,
        "prefill_tok_s": n_prompt / ps["median"],
        "decode_tok_s": ds["median"], "decode_tok_s_min": ds["min"], "decode_tok_s_max": ds["max"],
        "decode_ms_per_token": 1e3 / ds["median"],
        "kv_cache": kv_cache, "decode_recomputed": not kv_cache,
        "peak_rss_bytes": peak_rss, "base_rss_bytes": base_rss,
        "samples": {"prefill_s": prefill, "decode_s": decode},
    }
    parity, experts = _parity(runner, data)
    result.update(parity)
    if "ref_experts_0" in data:
        if experts:
            result["moe_routing_agreement"] = _routing_agreement(data, experts)
        else:
            result["moe_routing_note"] = (f"n/a: the {spec['backend']} runner does not expose expert routing "
                                          "(only runners holding a deploykit torch model do)")
    else:
        result["moe_routing_note"] = "n/a: dense model"
    result["perplexity"] = _perplexity(runner, data["ppl_blocks"])
    tasks = json.loads(Path(spec["tasks"]).read_text())
    result["task_completions"] = _task_completions(runner, tasks)

    from deploykit.deploy import registry as plugins

    row = {"backend": spec["backend"], "scheme": spec["scheme"], **result}
    result["extra"], result["extra_errors"] = plugin_metrics(runner, row, plugins.registry())
    return result


def plugin_metrics(runner: Any, row: dict[str, Any], registry: PluginRegistry) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``deploykit_bench_metrics`` columns of every plugin, merged as the hookspec promises, and the
    plugins that failed: ({column: value}, {plugin: error}).

    Later plugins win on equal keys: merged in registration order (pluggy *calls* the last registered
    first, so its result list is the reverse; a tryfirst plugin counts as the latest, as it would win a
    firstresult hook). None adds nothing. Each plugin is called on its own (``call_isolated``): one that
    raises or returns a non-dict loses its own columns only, is named with its error, and the row keeps
    its measurements and the other plugins' columns.
    """
    merged: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, metrics, error in registry.call_isolated("deploykit_bench_metrics", runner=runner, row=dict(row)):
        if error is not None:
            errors[name] = f"{type(error).__name__}: {error}"
        elif isinstance(metrics, dict):
            merged.update({str(k): v for k, v in metrics.items()})
        elif metrics not in (None, []):  # [] is what a hookwrapper-only plugin yields
            errors[name] = f"returned {type(metrics).__name__}, expected a dict of metrics or None"
    return merged, errors


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m deploykit.bench.worker SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    out = Path(spec["result"])
    try:
        result = {"ok": True, **(run_convert(spec) if spec["phase"] == "convert" else run_measure(spec))}
    except BaseException as e:  # noqa: BLE001 - every failure becomes the row's error, never a lost row
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        result = {"ok": False, "error": f"{type(e).__name__}: {message}", "traceback": traceback.format_exc()}
        from deploykit.errors import BackendUnavailable

        if isinstance(e, BackendUnavailable):  # e.g. a Core ML package off macOS: converted, not runnable here
            result.update(unavailable=True, error=message)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, out)  # the parent never reads a half-written result
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
