"""The tree is the architecture: every import in deploykit, the built-in backends, the benchmark
scripts and the example plugin runs along the arrows, never against them.

    foundation (errors, fsutil, lazy)  <-  model  <-  data  <-  train
                                     model  <-  deploy  <-  plugins (built-in backends)
    foundation  <-  native  <-  plugins
    model, data, deploy  <-  eval  (checkpoints and artifacts alike, through the Runner API)
    everything  <-  bench  <-  cli          nothing imports cli (but ``python -m deploykit``)

Backends import the core, never each other; the core (model, deploy) knows no backend and no
training. Benchmark scripts and the example plugin are users: they import public names only.
Imports are read with ``ast`` from the source, function-level and TYPE_CHECKING ones included, so
a lazy import cannot hide an arrow.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Layer of each deploykit module, by module-name prefix (longest match wins).
LAYERS: dict[str, str] = {
    "deploykit": "api",  # the package's __init__: the public API
    "deploykit.backend": "api",  # the contract re-exported for plugin authors
    "deploykit.__main__": "main",
    "deploykit.errors": "foundation",
    "deploykit.fsutil": "foundation",
    "deploykit.lazy": "foundation",
    "deploykit.model": "model",
    "deploykit.data": "data",
    "deploykit.train": "train",
    "deploykit.native": "native",
    "deploykit.deploy": "deploy",
    "deploykit.eval": "eval",
    "deploykit.bench": "bench",
    "deploykit.cli": "cli",
    "deploykit_plugins": "plugins",
}
# What each layer may import (of the layers above). Third-party libraries are not restricted here.
ALLOWED: dict[str, set[str]] = {
    "foundation": {"foundation"},
    "model": {"foundation", "model"},
    "data": {"foundation", "model", "data"},
    "train": {"foundation", "model", "data", "train"},
    "native": {"foundation", "native"},
    "deploy": {"foundation", "model", "deploy"},
    "api": {"api", "foundation", "model", "deploy"},
    "eval": {"api", "foundation", "model", "data", "deploy", "eval"},
    "plugins": {"api", "foundation", "model", "deploy", "native"},
    "bench": {"api", "foundation", "model", "data", "train", "native", "deploy", "eval", "bench"},
    "cli": {"api", "foundation", "model", "data", "train", "native", "deploy", "eval", "bench", "cli"},
    "main": {"cli"},
    # users of deploykit: public names of every layer but the CLI; never a backend module
    "benchmarks": {"api", "foundation", "model", "data", "train", "native", "deploy", "eval", "bench"},
    "examples": {"api", "foundation", "model", "deploy"},
}
# The only top-level modules of the package; everything else lives in a layer package.
TOP_LEVEL = {"__init__.py", "__main__.py", "errors.py", "fsutil.py", "lazy.py", "backend.py"}
LAYER_PACKAGES = {"model", "data", "train", "deploy", "native", "eval", "bench", "cli"}


@dataclass(frozen=True)
class Import:
    source: str  # file, relative to the repository
    line: int
    target: str  # absolute module imported from
    names: tuple[str, ...]  # names imported from it ("" for `import x`)


def module_name(path: Path) -> str:
    """Module name of a source file in the package trees (deploykit/..., plugins/deploykit_plugins/...)."""
    rel = path.relative_to(ROOT / "plugins") if path.is_relative_to(ROOT / "plugins") else path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, module: str, is_package: bool, label: str) -> list[Import]:
    """Every import in ``source`` (at any depth), relative ones resolved against ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [Import(label, node.lineno, a.name, ("",)) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append(Import(label, node.lineno, target, tuple(a.name for a in node.names)))
    return out


def is_module(name: str) -> bool:
    """Whether ``deploykit.x.y`` names a module (file or package) in the source tree."""
    parts = name.split(".")
    base = ROOT / "plugins" if parts[0] == "deploykit_plugins" else ROOT
    path = base.joinpath(*parts)
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() or \
        any(path.parent.glob(path.name + ".*.so")) or path.with_suffix(".pyi").is_file()


def layer_of(module: str) -> str | None:
    best = None
    for prefix, layer in LAYERS.items():
        if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, layer)
    return None if best is None else best[1]


def targets(imp: Import) -> list[str]:
    """The deploykit modules an import reaches: ``from deploykit import native`` reaches deploykit.native."""
    if imp.names == ("",):
        return [imp.target]
    found = [f"{imp.target}.{n}" for n in imp.names if is_module(f"{imp.target}.{n}")]
    rest = [n for n in imp.names if not is_module(f"{imp.target}.{n}")]
    if imp.target == "deploykit" and rest == ["__version__"]:
        rest = []  # set on the first line of deploykit/__init__.py, before it imports any layer: metadata, not an arrow
    return found + ([imp.target] if rest else [])


def violations(layer: str, module: str, imps: list[Import], *, public_only: bool) -> list[str]:
    out = []
    for imp in imps:
        for target in targets(imp):
            to = layer_of(target)
            if to is None:
                continue  # not deploykit: torch, numpy, onnx...
            where = f"{imp.source}:{imp.line}"
            if layer == to == "plugins":
                if target != "deploykit_plugins" and target.split(".")[:2] != module.split(".")[:2]:
                    out.append(f"{where}: backend {module} imports another backend {target}")
            elif to not in ALLOWED[layer]:
                out.append(f"{where}: {layer} ({module}) imports {target} ({to})")
            if public_only:
                private = [p for p in target.split(".") if p.startswith("_")]
                private += [n for n in imp.names if n.startswith("_")]
                if private:
                    out.append(f"{where}: {module} imports private {', '.join(private)} from {target}")
    return out


def sources() -> list[tuple[Path, str, str, bool]]:
    """(path, layer, module, public_only) for every file whose imports are checked."""
    out = []
    for path in sorted((ROOT / "deploykit").rglob("*.py")) + sorted((ROOT / "plugins").rglob("*.py")):
        module = module_name(path)
        out.append((path, layer_of(module) or "unknown", module, False))
    for path in sorted((ROOT / "benchmarks").rglob("*.py")):
        out.append((path, "benchmarks", f"benchmarks/{path.relative_to(ROOT / 'benchmarks')}", True))
    for path in sorted((ROOT / "examples").rglob("*.py")):
        out.append((path, "examples", f"examples/{path.relative_to(ROOT / 'examples')}", True))
    return out


def test_every_import_runs_along_the_arrows():
    problems = []
    for path, layer, module, public_only in sources():
        if layer == "unknown":
            problems.append(f"{path.relative_to(ROOT)}: in no layer; place it in one of {sorted(LAYER_PACKAGES)}")
            continue
        label = str(path.relative_to(ROOT))
        imps = imports_of(path.read_text(), module, path.name == "__init__.py", label)
        problems += violations(layer, module, imps, public_only=public_only)
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_the_package_top_level_holds_only_the_api_and_the_foundation():
    pkg = ROOT / "deploykit"
    modules = {p.name for p in pkg.glob("*.py")}
    packages = {p.name for p in pkg.iterdir() if (p / "__init__.py").is_file()}
    assert modules == TOP_LEVEL, f"new top-level modules belong in a layer package: {sorted(modules - TOP_LEVEL)}"
    assert packages == LAYER_PACKAGES


def test_nothing_but_main_imports_the_cli():
    for path, layer, module, _ in sources():
        if layer in ("cli", "main"):
            continue
        imps = imports_of(path.read_text(), module, path.name == "__init__.py", str(path))
        assert not [t for i in imps for t in targets(i) if layer_of(t) == "cli"], f"{path} imports deploykit.cli"


@pytest.mark.parametrize("layer,module,source,expect", [
    ("model", "deploykit.model.graph", "from ..deploy import registry", "model (deploykit.model.graph) imports deploykit.deploy.registry"),
    ("deploy", "deploykit.deploy.runtime", "def f():\n    from ..train.config import RUN_FILES\n", "imports deploykit.train.config"),
    ("model", "deploykit.model.graph", "if TYPE_CHECKING:\n    from deploykit.bench import run_bench\n", "imports deploykit.bench"),
    ("plugins", "deploykit_plugins.onnx_backend", "from deploykit_plugins.torch_backend import SCHEMES", "another backend"),
    ("benchmarks", "benchmarks/x.py", "from deploykit.cli.bench import run", "imports deploykit.cli.bench (cli)"),
    ("benchmarks", "benchmarks/x.py", "from deploykit.bench.harness import _Silent", "private _Silent"),
    ("benchmarks", "benchmarks/x.py", "import deploykit_plugins.native_backend", "imports deploykit_plugins.native_backend"),
    ("examples", "examples/e.py", "from deploykit.native import _native", "private _native"),
])
def test_the_checker_catches_each_kind_of_wrong_arrow(layer, module, source, expect):
    imps = imports_of(source, module, False, "snippet")
    found = violations(layer, module, imps, public_only=layer in ("benchmarks", "examples"))
    assert any(expect in v for v in found), found


def test_the_checker_accepts_the_arrows_as_drawn():
    ok = [("plugins", "deploykit_plugins.native_backend", "from deploykit import native\nfrom deploykit.deploy import backend"),
          ("bench", "deploykit.bench.worker", "from ..deploy import registry\nfrom ..data import load_texts"),
          ("train", "deploykit.train.pretrain", "from ..model.checkpoint import save_model"),
          ("benchmarks", "benchmarks/x.py", "import deploykit\nfrom deploykit.bench.progress import RichReporter")]
    for layer, module, source in ok:
        imps = imports_of(source, module, False, "snippet")
        assert not violations(layer, module, imps, public_only=layer == "benchmarks"), (module, source)
