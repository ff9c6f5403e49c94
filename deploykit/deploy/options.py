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
import typing
from collections.abc import Mapping
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
