"""The .pyi stubs list exactly the compiled modules' functions with the same parameter names,
order and defaults (read from pybind11's signature line), so they cannot drift."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import deploykit

PKG = Path(deploykit.__file__).parent / "native"


def stub_functions(path: Path) -> dict[str, list[tuple[str, str | None]]]:
    tree = ast.parse(path.read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            args = node.args.args
            defaults = [None] * (len(args) - len(node.args.defaults)) + [
                ast.literal_eval(d) for d in node.args.defaults]
            out[node.name] = [(a.arg, None if d is None else repr(d)) for a, d in zip(args, defaults)]
    return out


def compiled_functions(mod) -> dict[str, list[tuple[str, str | None]]]:
    out = {}
    for name in dir(mod):
        obj = getattr(mod, name)
        if name.startswith("_") or not callable(obj) or isinstance(obj, type):
            continue
        sig = obj.__doc__.splitlines()[0]  # "name(a: T, b: T = 1) -> R"
        m = re.match(rf"{name}\((.*)\) ->", sig)
        assert m, sig
        params = []
        depth, cur = 0, ""
        for ch in m.group(1) + ",":  # split on top-level commas only
            if ch in "[(":
                depth += 1
            elif ch in "])":
                depth -= 1
            if ch == "," and depth == 0:
                if cur.strip():
                    pname, _, rest = cur.strip().partition(":")
                    default = rest.split("=", 1)[1].strip() if "=" in rest else None
                    params.append((pname.strip(), default))
                cur = ""
            else:
                cur += ch
        out[name] = params
    return out


@pytest.mark.parametrize("modname", ["_native", "_native_cuda"])
def test_stub_matches_compiled_module(modname):
    try:
        mod = importlib.import_module(f"deploykit.native.{modname}")
    except ImportError as e:
        pytest.skip(f"deploykit.native.{modname} not built: {e}")
    stub = stub_functions(PKG / f"{modname}.pyi")
    compiled = compiled_functions(mod)
    assert sorted(stub) == sorted(compiled), "functions differ between stub and module"
    for name in compiled:
        got = [(n, None if d is None else repr(ast.literal_eval(d))) for n, d in compiled[name]]
        assert stub[name] == got, f"{modname}.{name}: stub {stub[name]} != compiled {got}"


def stub_classes(path: Path) -> dict[str, list[str]]:
    tree = ast.parse(path.read_text())
    return {node.name: sorted(f.name for f in node.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("_"))
            for node in tree.body if isinstance(node, ast.ClassDef)}


def test_stub_classes_match_compiled_module():
    """Classes (the decode engine): the same classes, each with the same public methods and properties."""
    try:
        mod = importlib.import_module("deploykit.native._native")
    except ImportError as e:
        pytest.skip(f"deploykit.native._native not built: {e}")
    compiled = {name: sorted(m for m in vars(obj) if not m.startswith("_"))
                for name, obj in vars(mod).items() if isinstance(obj, type) and not name.startswith("_")}
    assert stub_classes(PKG / "_native.pyi") == compiled
