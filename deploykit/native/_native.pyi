"""Type stubs for the compiled CPU module deploykit._native (checked by tests/native/test_stubs.py).

Arrays are numpy arrays (zero-copy views of torch CPU tensors); every one must be C-contiguous
with the exact dtype named; outputs are written in place. Use deploykit.native, not this module.
"""
from typing import Any

import numpy as np
import numpy.typing as npt

PANEL: int
__version__: str

def cpu_features() -> dict[str, Any]: ...
def selected_isa() -> str: ...
def supported_isas() -> list[str]: ...
def pack_int8_weight(qw: npt.NDArray[np.int8], scales: npt.NDArray[np.float32], swiglu: bool,
                     packed: npt.NDArray[np.int8], sw_out: npt.NDArray[np.float32],
                     colsum: npt.NDArray[np.int32]) -> None: ...
def packed_sizes(rows: int, K: int, swiglu: bool) -> tuple[int, int]: ...
def quantize_rows(x: npt.NDArray[np.float32], qa: npt.NDArray[np.int8],
                  sa: npt.NDArray[np.float32], isa: str = "") -> None: ...
def int8_gemm_s32(qa: npt.NDArray[np.int8], packed: npt.NDArray[np.int8],
                  scales: npt.NDArray[np.float32], colsum: npt.NDArray[np.int32], N: int,
                  swiglu: bool, out: npt.NDArray[np.int32], nthreads: int = 1,
                  isa: str = "") -> None: ...
def int8_linear(x: npt.NDArray[np.float32], packed: npt.NDArray[np.int8],
                scales: npt.NDArray[np.float32], colsum: npt.NDArray[np.int32], N: int,
                swiglu: bool, bias: npt.NDArray[np.float32] | None, out: npt.NDArray[np.float32],
                nthreads: int = 1, isa: str = "") -> None: ...
def moe_route(logits: npt.NDArray[np.float32], k: int, softmax_all: bool,
              ids: npt.NDArray[np.int32], weights: npt.NDArray[np.float32],
              counts: npt.NDArray[np.int32], offsets: npt.NDArray[np.int32],
              perm: npt.NDArray[np.int32], inv: npt.NDArray[np.int32]) -> None: ...
def moe_gather(x: npt.NDArray[np.float32], perm: npt.NDArray[np.int32], k: int,
               out: npt.NDArray[np.float32], nthreads: int = 1) -> None: ...
def moe_scatter(ys: npt.NDArray[np.float32], inv: npt.NDArray[np.int32],
                weights: npt.NDArray[np.float32], out: npt.NDArray[np.float32],
                nthreads: int = 1) -> None: ...
def moe_ffn(x: npt.NDArray[np.float32], logits: npt.NDArray[np.float32], k: int,
            softmax_all: bool, w13: npt.NDArray[np.int8], sw13: npt.NDArray[np.float32],
            cs13: npt.NDArray[np.int32], w2: npt.NDArray[np.int8], sw2: npt.NDArray[np.float32],
            cs2: npt.NDArray[np.int32], F: int, out: npt.NDArray[np.float32], nthreads: int = 1,
            isa: str = "") -> None: ...
