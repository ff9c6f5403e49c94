"""Shared helpers for the native-kernel tests."""
from __future__ import annotations

import pytest

from deploykit import native

requires_native = pytest.mark.skipif(not native.available(),
                                     reason=f"deploykit.native._native not built: {native.unavailable_reason()}")

ALL_ISAS = ["scalar", "avx2", "avx512vnni"]


def isa_params():
    """Every variant as a parameter; those this CPU/OS cannot run are skipped with the reason."""
    sup = native.supported_isas() if native.available() else []
    return [pytest.param(i, marks=pytest.mark.skipif(
        i not in sup, reason=f"CPU/OS does not support {i} (supported here: {sup})")) for i in ALL_ISAS]
