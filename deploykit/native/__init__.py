"""deploykit.native: Python face of the compiled kernels in ``deploykit._native``.

Import never fails: when the extension is missing, ``available()`` is False and
``unavailable_reason()`` says why (callers such as the ``native`` backend report it).
"""
from __future__ import annotations

from typing import Any

try:
    from deploykit import _native as _C

    _IMPORT_ERROR: str | None = None
except ImportError as e:  # not built, or built for another Python/ABI
    _C = None  # type: ignore[assignment]
    _IMPORT_ERROR = (
        f"deploykit._native could not be imported ({e}); build it with "
        "`pip install --no-build-isolation -e .` (needs a C++17 compiler and CMake >= 3.18)"
    )


def available() -> bool:
    """True when the compiled CPU extension is importable."""
    return _C is not None


def unavailable_reason() -> str | None:
    """Why the extension is missing, or None when it is available."""
    return _IMPORT_ERROR


def _require() -> Any:
    if _C is None:
        from deploykit.errors import BackendUnavailable

        raise BackendUnavailable(
            "deploykit native kernels are not available",
            hint=_IMPORT_ERROR,
        )
    return _C


def cpu_features() -> dict[str, Any]:
    """cpuid/xgetbv report plus the kernel variant chosen for this process."""
    return _require().cpu_features()


def selected_isa() -> str:
    """'avx512vnni', 'avx2' or 'scalar' (DEPLOYKIT_NATIVE_ISA forces one)."""
    return _require().selected_isa()


def supported_isas() -> list[str]:
    """Variants this CPU and OS can run, scalar first."""
    return _require().supported_isas()
