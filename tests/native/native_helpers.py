"""Shared helpers for the native-kernel tests."""
from __future__ import annotations

import pytest

from deploykit import native

requires_native = pytest.mark.skipif(not native.available(),
                                     reason=f"deploykit.native._native not built: {native.unavailable_reason()}")

ALL_ISAS = ["scalar", "avx2", "avx512vnni", "amx"]


def _skip_reason(isa: str, sup: list[str]) -> str:
    reason = f"CPU/OS does not support {isa} (supported here: {sup})"
    if isa == "amx" and native.available():
        f = native.cpu_features()
        reason += ("; " + f["amx_note"]) if f.get("amx_note") else ("" if f.get("amx_int8") else "; no AMX-INT8 on this CPU")
    return reason


def isa_params():
    """Every variant as a parameter; those this CPU/OS cannot run are skipped with the reason."""
    sup = native.supported_isas() if native.available() else []
    return [pytest.param(i, marks=pytest.mark.skipif(i not in sup, reason=_skip_reason(i, sup))) for i in ALL_ISAS]
