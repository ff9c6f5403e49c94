"""Scheme options: what ``--option key=value`` may say to a scheme, as a frozen dataclass per scheme.

A backend declares the class on its :class:`~deploykit.deploy.backend.Scheme`; deploykit parses the
user's strings (or Python values) once, in ``convert``, and hands the backend a validated instance in
``ConvertContext.options``. The backend never sees a raw dict, and every scheme reports bad input
the same way: one error naming every unknown key and bad value, with the valid options listed.

    @dataclass(frozen=True)
    class PruneOptions(SchemeOptions):
        sparsity: float = option(0.3, "share of weights set to zero, in [0, 1)")

        def check(self) -> list[str]:
            return [] if 0 <= self.sparsity < 1 else ["sparsity must be in [0, 1)"]
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import ConfigError

T = TypeVar("T", bound="SchemeOptions")
_TYPES = (bool, int, float, str)
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def option(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best at the call site
    """A scheme option field: its default and the one-line help shown when an option is wrong."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SchemeOptions:
    """Base class: a scheme that takes no options. Subclasses add fields made with :func:`option`
    (types bool, int, float or str) and override :meth:`check` for rules across values."""

    def __post_init__(self) -> None:
        problems = [p for f, t in _fields(type(self)) if (p := _type_problem(f.name, getattr(self, f.name), t))]
        if not problems:
            problems = self.check()
        if problems:
            raise InvalidOptions(type(self).__name__, problems, self.valid_options_hint())

    def check(self) -> list[str]:
        """Broken rules as "name must ..." sentences (empty: valid). Types are checked before this."""
        return []

    @classmethod
    def parse(cls: type[T], given: Mapping[str, Any] | None, *, where: str) -> T:
        """Build the options from user input; strings (from the CLI) are converted to the field's type.

        ``where`` names the scheme in errors ("torch/int8-qat"). Raises one ConfigError listing every
        unknown key and bad value, with the valid options in its hint.
        """
        given = dict(given or {})
        types = {f.name: t for f, t in _fields(cls)}
        problems = [f"unknown option {k!r}" for k in sorted(given, key=str) if k not in types]
        values: dict[str, Any] = {}
        for key, raw in given.items():
            if key in types:
                values[key], problem = _convert(key, raw, types[key])
                problems += [problem] if problem else []
        try:  # with what could be read, so the rules (check) are reported in the same error
            options = cls(**{k: v for k, v in values.items() if not any(p.startswith(f"{k}=") for p in problems)})
        except InvalidOptions as e:  # a rule across values, or a Python value of the wrong type
            problems += e.problems
        else:
            if not problems:
                return options
        raise ConfigError(f"{where}: {'; '.join(problems)}", hint=cls.valid_options_hint())

    @classmethod
    def describe(cls) -> list[dict[str, Any]]:
        """One entry per option: name, type, default and help (``deploykit backends`` shows them)."""
        return [{"name": f.name, "type": t.__name__, "default": f.default, "help": f.metadata.get("help", "")}
                for f, t in _fields(cls)]

    @classmethod
    def valid_options_hint(cls) -> str:
        lines = [f"{o['name']} ({o['type']}, default {_show(o['default'])}): {o['help']}".rstrip(": ")
                 for o in cls.describe()]
        return ("valid options: " + "; ".join(lines) + " (pass --option key=value)") if lines else \
            "this scheme takes no options"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class NoOptions(SchemeOptions):
    """The options of a scheme that has none."""


@dataclass(frozen=True)
class Int8Options(SchemeOptions):
    """What every int8 scheme of a torch-graph backend lets the user choose (see ``roles.QUANTIZED``)."""

    quantize_lm_head: bool = option(True, "quantize the lm_head too (false keeps it fp32)")


@dataclass(frozen=True)
class SmoothQuantOptions(Int8Options):
    """Int8 options of a backend that runs ``deploy.calibrate.smooth_quant`` before quantizing and honours
    ``keep_fp32`` (explicit names, and ``auto`` / ``auto:N``: see ``calibrate.resolve_keep_fp32``). Here,
    not in calibrate, so that a backend declares its schemes without importing torch."""

    # Off here; the static-activation schemes of torch (int8-static / qat) and onnx (int8-static) turn it
    # on: one fixed scale per tensor is where outlier channels hurt, and on the demo's LoRA-tuned micro
    # it took their held-out top-1 from 0.977-0.982 to 0.986-0.988. Per-token / per-call schemes gain
    # little (mixed on demo), and tflite int8 gained nothing measurable (its int8 FullyConnected also
    # rounds its output). See benchmarks/results/quantization_accuracy.md.
    smoothquant: bool = option(False, "SmoothQuant: move activation outliers into the weights before int8")
    smoothquant_alpha: float = option(-1.0, "migration strength in [0, 1]; -1: chosen on the calibration set")
    keep_fp32: str = option("", "comma list of module names or prefixes kept fp32 (model.layers.0, lm_head, "
                                "model.layers.3.mlp.down_proj); a role name (attn_o, mlp_down...) keeps every such layer; "
                                "auto[:N]: the N layer groups (default 1) whose int8 costs most, measured on the "
                                "calibration set")

    def check(self) -> list[str]:
        a, out = self.smoothquant_alpha, []
        if not (a == -1.0 or 0.0 <= a <= 1.0):
            out.append(f"smoothquant_alpha={a} must be in [0, 1] or -1 (auto)")
        items = [x.strip() for x in self.keep_fp32.split(",") if x.strip()]
        autos = [x for x in items if x.startswith("auto")]
        for item in autos:
            if not _AUTO.fullmatch(item):
                out.append(f"keep_fp32: {item!r} must be auto or auto:N with N >= 1 layer groups")
        if len(autos) > 1:
            out.append(f"keep_fp32: name auto at most once (got {', '.join(autos)})")
        for item in self.keep_list():
            if not item.startswith("auto") and not item.replace(".", "").replace("_", "").isalnum():
                out.append(f"keep_fp32: {item!r} is not a module name, prefix or role")
        return out

    def keep_list(self) -> list[str]:
        """The entries of keep_fp32. An ``auto`` entry among them is resolved by :func:`resolve_keep_fp32`;
        :func:`kept_fp32` alone refuses it (a backend that does not measure must not ignore it)."""
        return [x.strip() for x in self.keep_fp32.split(",") if x.strip()]

    def auto_groups(self) -> int:
        """How many layer groups keep_fp32's auto entry keeps (0: no auto entry)."""
        for x in self.keep_fp32.split(","):
            if (m := _AUTO.fullmatch(x.strip())):
                return int(m.group(1) or 1)
        return 0


_AUTO = re.compile(r"auto(?::([1-9][0-9]*))?")


def kept_fp32(names: Sequence[str], roles: dict[str, Any], keep: Sequence[str], *, where: str) -> set[str]:
    """The names among ``names`` that ``keep`` (module names, prefixes or Role values) keeps fp32.

    An entry that matches no quantizable module is refused, naming the valid ones: a typo must not
    silently quantize the layer the user meant to keep."""
    out: set[str] = set()
    bad = []
    if auto := [x for x in keep if _AUTO.fullmatch(x)]:
        raise ConfigError(f"{where}: keep_fp32={auto[0]} (measured sensitivity) is not supported by this backend",
                          hint="name the layers to keep (module names, prefixes or roles)")
    for item in keep:
        hit = {n for n in names if n == item or n.startswith(item + ".") or getattr(roles.get(n), "value", None) == item}
        if not hit:
            bad.append(item)
        out |= hit
    if bad:
        blocks = sorted({n.split(".self_attn")[0].split(".mlp")[0].split(".block_sparse_moe")[0] for n in names})
        raise ConfigError(f"{where}: keep_fp32 {', '.join(map(repr, bad))} names no quantized module",
                          hint=f"use module names or prefixes ({', '.join(blocks[:3])}, ..., lm_head) or roles "
                               f"({', '.join(sorted({r.value for r in roles.values() if r is not None}))})")
    return out


class InvalidOptions(ConfigError):
    """Options that break their types or rules; ``problems`` lists each as a sentence."""

    def __init__(self, what: str, problems: list[str], hint: str) -> None:
        super().__init__(f"{what}: {'; '.join(problems)}", hint=hint)
        self.problems = problems


def _fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if t not in _TYPES:
            raise TypeError(f"{cls.__name__}.{f.name}: scheme options are bool, int, float or str, not {t!r}")
        out.append((f, t))
    return out


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else str(value)


def _convert(name: str, raw: Any, kind: type) -> tuple[Any, str | None]:
    """(value, None) or (raw, "name=... must be ...") for one user-given value."""
    if not isinstance(raw, str):
        return raw, None  # Python callers pass typed values; __post_init__ checks their type
    text = raw.strip()
    if kind is bool:
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE, None
        return raw, f"{name}={raw!r} must be true or false"
    if kind is int:
        try:
            return int(text), None
        except ValueError:
            return raw, f"{name}={raw!r} must be an integer"
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            return raw, f"{name}={raw!r} must be a number"
        return (value, None) if math.isfinite(value) else (raw, f"{name}={raw!r} must be a finite number")
    return raw, None


def _type_problem(name: str, value: Any, kind: type) -> str | None:
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if math.isfinite(value) else f"{name}={value!r} must be a finite number"
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return None
    if kind in (bool, str) and isinstance(value, kind):
        return None
    return f"{name}={value!r} must be {'true or false' if kind is bool else 'an integer' if kind is int else 'a number' if kind is float else 'a string'}"
