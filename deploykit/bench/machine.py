"""What machine a benchmark ran on: CPU model and flags, cores, threads, memory, library versions.

Every bench report carries this block, because a speed table means nothing without it: the same
int8 artifact is 4x faster on a CPU with AVX-512 VNNI than on one with AVX2 only.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# /proc/cpuinfo flags worth a line in a report: they decide which int8/bf16 kernels can run.
CPU_FLAGS: tuple[str, ...] = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
)

# Libraries whose versions change measurements; missing ones are simply left out.
LIBRARIES: tuple[str, ...] = (
    "deploykit", "torch", "numpy", "onnx", "onnxruntime", "onnxscript", "transformers", "safetensors",
    "tokenizers", "torchao", "llama_cpp_python", "gguf", "tensorflow-cpu", "coremltools",
)

# glibc returns large freed blocks to the OS, so the next call page-faults them back in; with these
# thresholds every worker keeps its memory and timings measure kernels, not page faults
# (see /work/shared/FACTS.md "Page faults decide benchmarks"). Set identically for every row.
ALLOCATOR_ENV: dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": "1073741824",
    "MALLOC_TRIM_THRESHOLD_": "2147483648",
}


def available_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS/Windows
        return os.cpu_count() or 1


def load_average() -> float | None:
    """1-minute load average: other processes on the cores make timings meaningless, so record it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def busy_warning(info: dict[str, Any]) -> str | None:
    """A sentence for reports when the machine was busy while measuring, else None.

    The end load includes the run's own threads (a quiet 2-thread run ends near 2.0), so they are
    discounted before comparing; the start load is read before the run does anything.
    """
    start, end = info.get("load_average_start"), info.get("load_average_end")
    loads = [x for x in (start, end) if x is not None]
    others = [x for x in (start, None if end is None else max(0.0, end - (info.get("threads") or 0))) if x is not None]
    cpus = info.get("available_cpus") or 1
    if others and max(others) > 0.5 * cpus + 0.5:
        return (f"the machine was busy while measuring (1-min load average up to {max(loads):.1f} on {cpus} CPUs): "
                "other processes competed for the cores, so absolute speeds are unreliable; rerun on an idle machine")
    return None


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC"), from /proc/cpuinfo where there is one."""
    return _cpuinfo()[0]


def native_isa() -> dict[str, Any]:
    """Whether deploykit.native is built and which kernel variant it chose: every int8 timing depends on it.

    In this process: for the scripts that time the native kernels and have them loaded anyway. The bench
    asks a child process instead (``start_native_probe``), for the reason given there.
    """
    from .. import native

    if not native.available():
        return {"available": False, "unavailable": native.unavailable_reason()}
    features = native.cpu_features()
    return {"available": True, "selected_isa": features["selected_isa"],
            "supported_isas": list(features["supported_isas"])}


def describe_native(features: dict[str, Any] | None) -> str:
    """One line for reports from ``native_isa()`` or the bench's probe: the ISA chosen, or why there is none."""
    if not features:
        return "native kernels: not recorded"
    if "selected_isa" not in features:
        return f"native kernels: not available ({features.get('unavailable') or 'no reason given'})"
    supported = ", ".join(features.get("supported_isas") or []) or "?"
    return f"native kernels: ISA `{features['selected_isa']}` selected (supported: {supported})"


def library_versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    versions: dict[str, str] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    versions.update(extra or {})
    return dict(sorted(versions.items()))


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    path = Path("/proc/cpuinfo")
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    return model, flags


def machine_info(threads: int) -> dict[str, Any]:
    """The machine block of results.json."""
    import psutil

    model, flags = _cpuinfo()
    info: dict[str, Any] = {
        "cpu_model": model,
        "cpu_flags": {f: f in flags for f in CPU_FLAGS},
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cpus": psutil.cpu_count(logical=True),
        "available_cpus": available_cpus(),
        "threads": threads,
        "memory_bytes": psutil.virtual_memory().total,
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "allocator_env": dict(ALLOCATOR_ENV),
        "load_average_start": load_average(),
    }
    return info


_NATIVE_PROBE = ("import json; from deploykit import native; print(json.dumps(native.cpu_features() "
                 "if native.available() else {'unavailable': native.unavailable_reason()}))")


def start_native_probe() -> subprocess.Popen[str]:
    """Ask the native extension for its cpuid report, in a child process started now.

    A child, not this process: the extension may be mid-rebuild (a replaced .so segfaults whoever has it
    loaded), and a crash here must cost one field of the report, not the whole bench. Started early and
    collected at the end, so its interpreter start-up overlaps the bench.
    """
    return subprocess.Popen([sys.executable, "-c", _NATIVE_PROBE], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish_native_probe(proc: subprocess.Popen[str], timeout_s: float = 120.0) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"unavailable": f"cpu_features() did not answer within {timeout_s:.0f} s"}
    if proc.returncode != 0:
        last = (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"unavailable": f"cpu_features() failed: {last}"}
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"unavailable": f"cpu_features() printed no JSON: {out[-200:]!r}"}


def describe(info: dict[str, Any]) -> str:
    """One line for report headers: 'AMD EPYC, 2 CPUs, 2 threads, AVX2, no AVX-512 VNNI'."""
    flags = info.get("cpu_flags", {})
    isa = ["AVX-512 VNNI" if flags.get("avx512_vnni") else None, "AVX-512 BF16" if flags.get("avx512_bf16") else None,
           "AMX" if flags.get("amx_tile") else None, "AVX2" if flags.get("avx2") else None]
    shown = ", ".join(x for x in isa if x) or "no AVX2"
    if not flags.get("avx512_vnni"):
        shown += ", no AVX-512 VNNI"
    threads = info.get("threads", "?")
    return (f"{info.get('cpu_model', '?')}, {info.get('available_cpus', '?')} CPUs, "
            f"{threads} thread{'' if threads == 1 else 's'}, {shown}")
