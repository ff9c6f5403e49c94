"""One contender's first load in a fresh process, for native_e2e.py: peak RSS and load seconds.

Run as ``python benchmarks/rss_worker.py SPEC_JSON``; prints one JSON line. It imports deploykit and
nothing else, so what it measures is what a serving process pays: a native, onnx or gguf artifact
loads without torch (``torch_imported`` in the result says whether the load brought it in).
"""
from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import deploykit


def status_kb(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Reset the peak, load the contender, feed the prompt and one decode token: peak resident memory (MB)
    in all and over the baseline, load seconds, and the collection the imports left due."""
    # Imports leave a full garbage collection due (torch alone tracks ~170k objects, when it is imported):
    # the first allocations after them trigger it, whatever code makes them. Settled and timed apart.
    t0 = time.perf_counter()
    gc.collect()
    import_gc_s = time.perf_counter() - t0
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
        reset = True
    except OSError:
        reset = False
    base = status_kb("VmRSS")
    t0 = time.perf_counter()
    runner = deploykit.load(spec["path"], threads=spec["threads"], verify_files=False)
    load_s = time.perf_counter() - t0
    torch_at_load = "torch" in sys.modules
    if spec.get("reference"):
        runner = runner.reference()
    session = runner.new_session()
    session.feed(spec["prompt"])
    session.feed([spec["token"]])
    peak = status_kb("VmHWM")
    return {"base_mb": base / 1024, "process_peak_mb": peak / 1024, "peak_mb": (peak - base) / 1024,
            "rss_mb": (status_kb("VmRSS") - base) / 1024, "load_s": load_s, "import_gc_s": import_gc_s,
            "peak_reset": reset, "torch_imported": torch_at_load}


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
