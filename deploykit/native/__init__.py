"""deploykit.native: Python face of the compiled kernels in ``deploykit.native._native``.

Import never fails: when the extension is missing, ``available()`` is False and
``unavailable_reason()`` says why (callers such as the ``native`` backend report it).

This package itself needs only numpy: the extension, the CPU report and ``deploykit.native.engine``
(the C++ decode engine over numpy arrays) serve a native artifact without torch. The torch API (the
int8 linear and MoE kernels on tensors, ``Int8Linear``, ``Int8SwiGLU``...) lives in
``deploykit.native.kernels`` and is imported on first use of one of its names here (PEP 562).
"""
from __future__ import annotations

from typing import Any

from deploykit.errors import BackendUnavailable
from deploykit.lazy import lazy_attributes

try:
    from deploykit.native import _native as _C

    _IMPORT_ERROR: str | None = None
except ImportError as e:  # not built, or built for another Python/ABI
    _C = None  # type: ignore[assignment]
    _IMPORT_ERROR = (
        f"deploykit.native._native could not be imported ({e}); build it with "
        "`pip install --no-build-isolation -e .` (needs a C++17 compiler and CMake >= 3.18)"
    )

__all__ = [
    "available", "unavailable_reason", "cpu_features", "cpu_summary", "selected_isa", "supported_isas",
    "quantize_weight", "quantize_rows", "PackedInt8Weight", "pack_int8_weight",
    "pack_int8_swiglu", "int8_linear", "int8_gemm_s32", "Int8Linear", "Int8SwiGLU",
    "MoERouting", "moe_route", "moe_gather", "moe_scatter", "PackedMoEExperts",
    "pack_moe_experts", "moe_ffn",
]


def available() -> bool:
    """True when the compiled CPU extension is importable."""
    return _C is not None


def unavailable_reason() -> str | None:
    """Why the extension is missing, or None when it is available."""
    return _IMPORT_ERROR


def _require() -> Any:
    if _C is None:
        raise BackendUnavailable("deploykit native kernels are not available", hint=_IMPORT_ERROR)
    return _C


def cpu_features() -> dict[str, Any]:
    """cpuid/xgetbv report plus the kernel variant chosen for this process."""
    return _require().cpu_features()


def cpu_summary() -> dict[str, Any]:
    """The chosen variant and the CPU features that decide it, flat (for manifests, runner info, reports)."""
    f = cpu_features()
    flags = [k for k in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_tile",
                         "amx_int8") if f.get(k)]
    return {"isa": f["selected_isa"], "supported_isas": list(f["supported_isas"]),
            "forced_isa": f.get("forced_isa"), "cpu": f"{f.get('vendor', '?')} {f.get('brand', '?')}".strip(),
            "cpu_flags": " ".join(flags), "os_zmm": bool(f.get("os_zmm"))}


def selected_isa() -> str:
    """'avx512vnni', 'avx2' or 'scalar' (DEPLOYKIT_NATIVE_ISA forces one, 'amx' included: AMX is opt-in)."""
    return _require().selected_isa()


def supported_isas() -> list[str]:
    """Variants this CPU and OS can run, scalar first."""
    return _require().supported_isas()


__getattr__ = lazy_attributes(__name__, dict.fromkeys((
    "quantize_weight", "quantize_rows", "PackedInt8Weight", "pack_int8_weight", "pack_int8_swiglu", "int8_linear",
    "int8_gemm_s32", "Int8Linear", "Int8SwiGLU", "MoERouting", "moe_route", "moe_gather", "moe_scatter",
    "PackedMoEExperts", "pack_moe_experts", "moe_ffn", "_np", "_threads", "_pack", "_linear_impl", "_moe_ffn_impl",
), "deploykit.native.kernels"))
