"""The extension imports and its CPU-feature report agrees with /proc/cpuinfo."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from deploykit import native

pytestmark = pytest.mark.skipif(not native.available(), reason=str(native.unavailable_reason()))

# cpu_features() key -> /proc/cpuinfo flag (Linux names)
FLAG_NAMES = {
    "sse4_2": "sse4_2",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "avx512f": "avx512f",
    "avx512dq": "avx512dq",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
}


def _cpuinfo_flags() -> set[str]:
    p = Path("/proc/cpuinfo")
    if not p.exists():
        pytest.skip("no /proc/cpuinfo (not Linux)")
    for line in p.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    pytest.skip("/proc/cpuinfo has no flags line (not x86?)")


def test_report_matches_proc_cpuinfo():
    # Linux lists a flag only when the kernel enabled its register state, so it matches
    # cpuid masked by xgetbv, which is what cpu_features() reports.
    flags = _cpuinfo_flags()
    f = native.cpu_features()
    mismatches = {k: (f[k], v in flags) for k, v in FLAG_NAMES.items() if f[k] != (v in flags)}
    # avx_vnni is missing from old kernels' flag tables: tolerate only "cpu has it, kernel silent"
    if "avx_vnni" in mismatches and mismatches["avx_vnni"] == (True, False):
        del mismatches["avx_vnni"]
    assert not mismatches, f"cpu_features() vs /proc/cpuinfo (ours, cpuinfo): {mismatches}"


def test_vendor_and_brand_match():
    f = native.cpu_features()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "vendor_id" not in text:
        pytest.skip("no vendor_id in /proc/cpuinfo")
    vendor = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("vendor_id"))
    model = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name"))
    assert f["vendor"] == vendor
    assert " ".join(f["brand"].split()) == " ".join(model.split())


def test_selected_isa_is_supported_and_best():
    f = native.cpu_features()
    assert f["supported_isas"][0] == "scalar"
    assert native.selected_isa() in f["supported_isas"]
    if not os.environ.get("DEPLOYKIT_NATIVE_ISA"):
        # AMX is opt-in (DEPLOYKIT_NATIVE_ISA=amx) until verified on hardware: the best of the rest is chosen.
        assert native.selected_isa() == f["best_isa"] == [i for i in f["supported_isas"] if i != "amx"][-1]
    assert ("amx" in f["supported_isas"]) == bool(f["amx_int8"] and f["amx_tile"] and f["amx_permission"]
                                                   and "avx512vnni" in f["supported_isas"])
    if f["amx_int8"] and not f["amx_permission"]:
        assert f["amx_note"]  # the reason it is off is reported
    if f["avx512_vnni"] and f["avx512bw"] and f["avx512vl"]:
        assert "avx512vnni" in f["supported_isas"]
    if f["avx2"] and f["fma"]:
        assert "avx2" in f["supported_isas"]


def test_env_var_forces_variant(tmp_path):
    import subprocess
    import sys

    # Load the compiled module by file path: no torch import, so the subprocess starts fast.
    from deploykit.native import _native

    code = ("import importlib.util as u; s = u.spec_from_file_location('deploykit.native._native', "
            f"{_native.__file__!r}); m = u.module_from_spec(s); s.loader.exec_module(m); "
            "print(m.selected_isa())")
    env = dict(os.environ, DEPLOYKIT_NATIVE_ISA="scalar")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "scalar"
    env["DEPLOYKIT_NATIVE_ISA"] = "sse9"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "valid values: scalar, avx2, avx512vnni, amx" in out.stderr
