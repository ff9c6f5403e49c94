"""Importing coremltools without the frameworks it only probes for (see ``_coremltools``)."""
from __future__ import annotations

import sys
import threading
from typing import Any

# Frameworks coremltools probes for at import (coremltools._deps) that converting a torch model never
# uses: on a busy machine `import coremltools` took 21 s with them and 4.2 s without, once per
# conversion worker of a bench.
_PROBED_UNUSED = ("tensorflow", "torchao", "transformers", "sklearn")
_import_lock = threading.Lock()


def _coremltools() -> Any:
    """``import coremltools`` without its probes of the frameworks in ``_PROBED_UNUSED``.

    A None entry in sys.modules makes ``import X`` raise ImportError, which coremltools reads as
    "not installed"; the entries are removed right after, so the process can still import those
    frameworks itself. One already imported is left alone (coremltools then sees it, as before)."""
    if "coremltools" in sys.modules:
        return sys.modules["coremltools"]
    with _import_lock:
        hidden = [name for name in _PROBED_UNUSED if name not in sys.modules]
        for name in hidden:
            sys.modules[name] = None  # type: ignore[assignment]
        try:
            import coremltools
        finally:
            for name in hidden:
                if sys.modules.get(name, 0) is None:
                    del sys.modules[name]
    return coremltools
