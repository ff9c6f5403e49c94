"""A MIL program's main function evaluated in numpy with coremltools' own op references.

coremltools has no Core ML runtime off macOS, but every MIL op it defines carries ``value_inference``,
the numpy semantics its constant folding runs. ``MilReference`` walks the program's operations in
order, gives each op its inputs' runtime values and asks that reference for the outputs, in the
program's own dtypes (an fp16 program computes in numpy fp16). A few references read the static
(symbolic) shapes the converter inferred, which are undefined for a ranged dimension; those ops,
and silu, which has none, are computed here (``_OWN``). Not the Core ML runtime: its kernels, op
fusion and ANE accumulation differ.
"""
from __future__ import annotations

from typing import Any

import numpy as np


class MilReference:
    """Evaluates a MIL program's main function with coremltools' numpy op references (``value_inference``).

    Ops whose reference reads the static (symbolic) output shape, or that have none (silu), are
    computed here from the runtime values. Not thread-safe: calls are serialised by the runner.
    """

    def __init__(self, program: Any) -> None:
        self.function = program.functions["main"]
        self.consts = {op.outputs[0].name: op.outputs[0].val for op in self.function.operations
                       if op.op_type == "const"}
        self.consts.update({op.outputs[0].name: np.asarray(op.materialized_val_inference())
                            for op in self.function.operations if op.op_type.startswith("constexpr_")})

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = dict(self.consts)
        for name, var in self.function.inputs.items():
            env[var.name] = feeds[name]
        for op in self.function.operations:
            if op.outputs[0].name in self.consts:
                continue
            outs = self._run(op, env)
            for var, val in zip(op.outputs, outs):
                env[var.name] = np.asarray(val)
        return {v.name: env[v.name] for v in self.function.outputs}

    def _run(self, op: Any, env: dict[str, np.ndarray]) -> tuple[Any, ...]:
        value = _OWN.get(op.op_type)
        if value is not None:
            return (value(op, lambda var: env.get(var.name, var.val)),)
        saved = []
        for var in _vars(list(op.inputs.values())):
            if var.name in env:
                saved.append((var, var._sym_val))
                var._sym_val = _Value(env[var.name])
        try:
            out = op.value_inference()
        finally:
            for var, old in saved:
                var._sym_val = old
        return tuple(out) if len(op.outputs) > 1 else (out,)


class _Value:
    """What a MIL Var keeps in ``_sym_val``: an object with ``.val``."""

    def __init__(self, val: Any) -> None:
        self.val = val


def _vars(items: Any) -> Any:
    for x in items:
        if isinstance(x, (list, tuple)):
            yield from _vars(x)
        elif hasattr(x, "_sym_val"):
            yield x


def _reduce(fn: Any) -> Any:
    def run(op: Any, val: Any) -> np.ndarray:
        x = val(op.x)
        axes = None if op.axes is None else tuple(int(a) for a in val(op.axes))
        return fn(x, axis=axes, keepdims=bool(val(op.keep_dims))).astype(x.dtype)
    return run


def _expand_dims(op: Any, val: Any) -> np.ndarray:
    x = val(op.x)
    rank = x.ndim + len(val(op.axes))
    for axis in sorted(int(a) % rank for a in val(op.axes)):
        x = np.expand_dims(x, axis)
    return x


_OWN = {  # op type -> f(op, value of a var): the references that read static shapes, and silu
    "silu": lambda op, val: val(op.x) / (1 + np.exp(-val(op.x))),
    "shape": lambda op, val: np.array(val(op.x).shape, np.int32),
    "fill_like": lambda op, val: np.full(val(op.ref_tensor).shape, val(op.value)),
    "reshape": lambda op, val: np.reshape(val(op.x), [int(d) for d in val(op.shape)]),
    "expand_dims": _expand_dims,
    "squeeze": lambda op, val: np.squeeze(val(op.x), axis=None if op.axes is None else tuple(int(a) for a in val(op.axes))),
    "reduce_mean": _reduce(np.mean), "reduce_sum": _reduce(np.sum), "reduce_max": _reduce(np.max),
}
