"""One schema check for every JSON file deploykit reads.

``config.json``, ``model.safetensors.index.json``, the artifact manifest, backend layout files and
the trainer state all come from disk, so any of them may be truncated, hand-edited or written by
another tool. They are read with :func:`read_json_object` and their fields taken with the typed
accessors of :class:`JsonObject`, so that every malformed file ends in the caller's deploykit error
(exit 2) with one line naming the file, the key, the expected type and what was found — never a
``KeyError`` or ``TypeError`` from deep inside the code that uses the value.

    doc = read_json_object(path, error=ConfigError, what="model config", hint="restore config.json")
    vocab = doc.field("vocab_size", int, check=positive)            # required
    eps = doc.field("rms_norm_eps", float, default=1e-6)            # optional; ints are accepted
    rope = doc.object("rope_scaling", default=None)                 # nested: keys named rope_scaling.x
    shards = doc.mapping("weight_map", str, check=relative_file)    # {str: str}

Kinds are ``int`` (never a bool, never a float), ``float`` (an int is accepted and converted; NaN and
infinities are refused), ``bool``, ``str``, ``dict``, ``list``, ``None``, :class:`ListOf` and tuples of
those for "one of". It sits in ``deploykit.model`` because every reader (model, deploy, train,
plugins) may import it, and it imports only ``deploykit.errors``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, NoReturn, Union

from ..errors import ConfigError, DeploykitError


@dataclass(frozen=True)
class ListOf:
    """A JSON list whose items all have ``item``'s kind (and exactly ``length`` of them, if given)."""

    item: Kind
    length: int | None = None


Kind = Union[type, None, ListOf, tuple]  # a tuple of kinds means "any one of them"
Check = Callable[[Any], "str | None"]  # value -> the rule it breaks ("must be > 0"), or None
_REQUIRED: Any = object()
_MAX_REPR = 48


# -- value rules (for ``check=``) -------------------------------------------------------------------
def positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def one_of(*allowed: Any) -> Check:
    def check(value: Any) -> str | None:
        return None if value in allowed else f"must be one of {', '.join(map(repr, allowed))}"
    return check


def relative_file(value: str) -> str | None:
    """A file name inside the folder: relative, without '..', NUL or backslashes.

    Checked on the name, not the resolved path: Hugging Face's cache stores snapshot files as symlinks
    into a blobs folder, and those are fine; a name that climbs out of the folder is not.
    """
    parts = PurePosixPath(value).parts
    if not value or "\x00" in value or "\\" in value or PurePosixPath(value).is_absolute() or ".." in parts:
        return "must be a relative file name inside the folder (no '..', no absolute path)"
    return None


# -- reading ---------------------------------------------------------------------------------------
def read_json_object(path: str | Path, *, error: type[DeploykitError], what: str, hint: str) -> JsonObject:
    """The JSON object in ``path``; anything else (unreadable, not UTF-8, not JSON, not an object) is
    ``error`` naming the file. ``what`` names the file's role in messages ("model config")."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e})", hint=hint) from e
    return parse_json_object(raw, source=str(path), error=error, what=what, hint=hint)


def parse_json_object(raw: str | bytes, *, source: str, error: type[DeploykitError], what: str,
                      hint: str) -> JsonObject:
    """Like :func:`read_json_object` for JSON text that is not a file of its own (ONNX metadata)."""
    try:
        # utf-8-sig: a byte-order mark, as some Windows editors write, is not an error.
        text = raw.decode("utf-8-sig") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise error(f"{source}: the {what} is not UTF-8 text (byte {e.start})", hint=hint) from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{source}: the {what} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})",
                    hint=hint) from e
    except (ValueError, RecursionError) as e:  # an integer of 5000 digits, lists nested 100k deep
        raise error(f"{source}: the {what} is not valid JSON ({type(e).__name__}: {_short(str(e))})",
                    hint=hint) from e
    if not isinstance(data, dict):
        raise error(f"{source}: the {what} must be a JSON object {{...}}, got {_got(data)}", hint=hint)
    return JsonObject(data, source=source, error=error, hint=hint)


class JsonObject(dict):
    """A JSON object read from ``source``, with typed accessors that fail as ``error`` naming the key.

    It is a plain ``dict`` too, so code that receives one (plugins given a manifest) needs nothing new.
    ``prefix`` is the key path of a nested object ("deploykit.model_config.").
    """

    def __init__(self, data: dict[str, Any], *, source: str, error: type[DeploykitError], hint: str,
                 prefix: str = "") -> None:
        super().__init__(data)
        self.source, self.error, self.hint, self.prefix = source, error, hint, prefix

    def fail(self, key: str | None, problem: str, *, hint: str | None = None) -> NoReturn:
        """Raise ``error``: "SOURCE: KEY PROBLEM" (``key`` None: this object itself), with the reader's
        hint unless another is given."""
        raise self.error(f"{self.source}: {self.key_path(key)} {problem}", hint=hint or self.hint)

    def key_path(self, key: str | None) -> str:
        """``key`` as named in messages: its path from the top of the file."""
        if key is None:
            return self.prefix.rstrip(".") or "the top level"
        return self.prefix + _key_text(key)

    def field(self, key: str, kind: Kind, *, default: Any = _REQUIRED, check: Check | None = None) -> Any:
        """``self[key]`` if it has ``kind`` (and passes ``check``); ``default`` when absent, if given.

        An explicit ``null`` for an optional key whose kind does not allow ``None`` counts as absent:
        transformers writes ``"head_dim": null`` and similar for "not set".
        """
        if key not in self or (self[key] is None and default is not _REQUIRED and not _allows_none(kind)):
            if default is _REQUIRED:
                self.fail(key, f"is missing (it must be {describe(kind)})")
            return default
        return self.value(key, self[key], kind, check)

    def value(self, key: str, value: Any, kind: Kind, check: Check | None = None) -> Any:
        """``value`` (found under ``key``) checked against ``kind`` and ``check``, ints made floats where
        a number is expected."""
        if not matches(value, kind):
            self.fail(key, f"must be {describe(kind)}, got {_got(value)}")
        value = coerce(value, kind)
        if check is not None and value is not None and (problem := check(value)):
            self.fail(key, f"= {_short(repr(value))} {problem}")
        return value

    def object(self, key: str, *, default: Any = _REQUIRED) -> JsonObject:
        """The nested object ``self[key]``, whose keys are named ``key.inner`` in messages."""
        value = self.field(key, dict, default=default)
        if value is default and default is not _REQUIRED:
            return default
        return self.nested(key, value)

    def nested(self, key: str, value: dict[str, Any]) -> JsonObject:
        return JsonObject(value, source=self.source, error=self.error, hint=self.hint,
                          prefix=f"{self.key_path(key)}.")

    def mapping(self, key: str, kind: Kind, *, default: Any = _REQUIRED, check: Check | None = None) -> dict[str, Any]:
        """The object ``self[key]`` with every value of ``kind``: ``{str: value}``."""
        value = self.field(key, dict, default=default)
        if value is default and default is not _REQUIRED:
            return default
        inner = self.nested(key, value)
        return {k: inner.value(k, v, kind, check) for k, v in value.items()}

    def dataclass_fields(self, cls: type) -> dict[str, Any]:
        """The keys of this object as keyword arguments for the dataclass ``cls``, each checked against
        the field's annotation (``int | None``, ``tuple[float, float]``, ``Path``...); unknown keys are
        refused. Nested dataclass fields are built recursively from their objects."""
        kinds = field_kinds(cls)
        known = list(kinds)
        unknown = sorted(set(self) - set(known))
        if unknown:
            self.fail(None, f"has unknown field(s) {', '.join(map(_key_text, unknown))}",
                      hint=f"{cls.__name__} fields: {', '.join(known)}")
        out: dict[str, Any] = {}
        hints = typing.get_type_hints(cls)
        for name in (n for n in known if n in self):
            value = self.value(name, self[name], kinds[name])
            nested = _dataclass_in(hints[name])
            out[name] = self.nested(name, value).build(nested) if nested and isinstance(value, dict) else value
        return out

    def build(self, cls: type, **overrides: Any) -> Any:
        """``cls(**self.dataclass_fields(cls), **overrides)``; a rule the dataclass enforces on
        construction (a ConfigError, "n_heads must divide d_model") is re-raised naming this file."""
        kwargs = {**self.dataclass_fields(cls), **overrides}
        for f in dataclasses.fields(cls):
            if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.fail(f.name, f"is missing (it must be {describe(field_kinds(cls)[f.name])})")
        try:
            return cls(**kwargs)
        except ConfigError as e:
            where = f"{self.source}: {self.prefix.rstrip('.')}" if self.prefix else self.source
            raise self.error(f"{where}: {e.args[0]}", hint=e.hint or self.hint) from e


# -- kinds -----------------------------------------------------------------------------------------
@functools.cache
def field_kinds(cls: type) -> dict[str, Kind]:
    """{field name: JSON kind} of a dataclass, from its annotations (resolved once per class)."""
    hints = typing.get_type_hints(cls)
    return {f.name: kind_of(hints[f.name]) for f in dataclasses.fields(cls)}


def kind_of(tp: Any) -> Kind:
    """The JSON kind of a (resolved) type annotation: how a dataclass field is stored in JSON."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return tuple(kind_of(a) for a in args)
    if origin is typing.Literal:
        return tuple(sorted({type(a) for a in args}, key=lambda t: t.__name__))
    if origin in (tuple, list):
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return ListOf(kind_of(args[0]))
        if origin is tuple and args:
            kinds = tuple(dict.fromkeys(kind_of(a) for a in args))
            return ListOf(kinds[0] if len(kinds) == 1 else kinds, length=len(args))
        return ListOf(kind_of(args[0])) if args else list
    if origin is dict or tp is dict:
        return dict
    if tp is type(None) or tp is None:
        return None
    if tp in (int, float, bool, str):
        return tp
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return str
    if dataclasses.is_dataclass(tp):
        return dict
    raise TypeError(f"deploykit.model.schema: no JSON kind for the annotation {tp!r}")


def describe(kind: Kind) -> str:
    """'an integer', 'a number or null', 'a list of 2 numbers'..."""
    if isinstance(kind, tuple):
        return " or ".join(describe(k) for k in kind)
    if isinstance(kind, ListOf):
        count = f"{kind.length} " if kind.length is not None else ""
        return f"a list of {count}{_PLURAL.get(kind.item, 'items') if not isinstance(kind.item, tuple) else 'items'}"
    return _NAMES[kind]


_NAMES: dict[Any, str] = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
                          dict: "an object", list: "a list", None: "null"}
_PLURAL: dict[Any, str] = {int: "integers", float: "numbers", bool: "booleans", str: "strings", dict: "objects",
                           list: "lists"}


def matches(value: Any, kind: Kind) -> bool:
    """Whether ``value`` (as JSON parsed it, or as a caller passed it) has ``kind``."""
    if isinstance(kind, tuple):
        return any(matches(value, k) for k in kind)
    if isinstance(kind, ListOf):
        return (isinstance(value, list) and (kind.length is None or len(value) == kind.length)
                and all(matches(v, kind.item) for v in value))
    if kind is None:
        return value is None
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


def coerce(value: Any, kind: Kind) -> Any:
    """``value`` (which matches ``kind``) with ints made floats where ``kind`` expects a number."""
    if isinstance(kind, tuple):
        # The first alternative that matches decides, so (int, float) keeps 3 an int.
        return coerce(value, next(k for k in kind if matches(value, k)))
    if isinstance(kind, ListOf):
        return [coerce(v, kind.item) for v in value]
    if kind is float:
        return float(value)
    return value


def _allows_none(kind: Kind) -> bool:
    return kind is None or (isinstance(kind, tuple) and any(_allows_none(k) for k in kind))


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass a field annotation holds (``ModelConfig | None`` -> ModelConfig), if any."""
    for t in (tp, *typing.get_args(tp)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


# -- message pieces --------------------------------------------------------------------------------
def _got(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        keys = ", ".join(_key_text(k) for k in list(value)[:4])
        return f"an object with keys {_short(keys)}" if value else "an empty object"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    noun = {int: "an integer", float: "a number", str: "a string"}.get(type(value), type(value).__name__)
    return f"{noun} {_short(repr(value))}"


def short_repr(value: Any) -> str:
    """``repr(value)`` on one bounded line, for messages about values read from files."""
    return _short(repr(value))


def _short(text: str) -> str:
    # One line, bounded: a value from a file may be megabytes long or hold newlines.
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= _MAX_REPR else text[:_MAX_REPR - 3] + "..."


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.\-/\[\]]+")


def _key_text(key: str) -> str:
    # Keys come from the file: quote anything unusual so a message stays one readable line.
    return key if _PLAIN_KEY.fullmatch(key) else _short(repr(key))
