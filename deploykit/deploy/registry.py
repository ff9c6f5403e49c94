"""The plugin manager: finds backends through the ``deploykit.backends`` entry-point group.

Built on demand (``registry()`` is cached, nothing happens at import), the way pytest and datasette do
it: hookspecs first, then deploykit's own loader plugin, then every entry point, then
``check_pending()`` so a misspelt ``deploykit_*`` hook is rejected instead of silently ignored.

Built-in backends (``torch``, ``onnx``) are entry points in deploykit's own pyproject.toml, exactly like a
third-party package's. One broken plugin (import error, a raising ``deploykit_backends``, an invalid or
duplicate backend) is recorded in ``plugin_errors()`` with its reason and the others stay usable.

``DEPLOYKIT_TRACE_HOOKS=1`` prints every hook call and result to stderr (pluggy's tracing).
"""
from __future__ import annotations

import fnmatch
import importlib.metadata
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pluggy

from ..errors import ArtifactError, BackendError, BackendUnavailable, ConfigError, DeploykitError, first_line
from . import hookspecs

if TYPE_CHECKING:
    from .backend import Backend, Runner

ENTRY_POINT_GROUP = "deploykit.backends"
LOADER_PLUGIN_NAME = "deploykit.loader"
TRACE_ENV = "DEPLOYKIT_TRACE_HOOKS"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used, and why (shown by ``deploykit backends``)."""

    plugin: str  # entry point name (or the name it was registered under)
    source: str  # "module:attr" of the entry point, or the distribution
    stage: str  # "import", "register", "deploykit_backends", "validate"
    error: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} ({self.source}) failed at {self.stage}: {self.error}"


class _BuiltinLoader:
    """deploykit's own ``deploykit_load_artifact``: dispatch on ``manifest["backend"]`` (tried last)."""

    def __init__(self, registry: PluginRegistry) -> None:
        self._registry = registry

    @hookspecs.hookimpl(trylast=True)
    def deploykit_load_artifact(self, path: Path, manifest: dict[str, Any], options: dict[str, Any]) -> Runner | None:
        backend = self._backend_for(path, manifest)
        options = dict(options)
        threads = options.pop("threads", None)
        unknown = sorted(options)
        if unknown:
            raise ConfigError(f"{path}: unknown load option(s) {', '.join(unknown)} for a {backend.name!r} artifact",
                              hint="deploykit.load accepts threads=N; other options are for plugins that take over "
                              "loading (deploykit_load_artifact)")
        try:
            return backend.load(Path(path), manifest, threads=threads)
        except (DeploykitError, OSError):  # OSError: the disk or permissions, reported as such by the CLI
            raise
        except Exception as e:
            raise BackendError(f"{path}: backend {backend.name!r} (plugin {self._registry.plugin_of(backend.name)!r}) "
                               f"failed to load its artifact: {type(e).__name__}: {first_line(e)}",
                               hint="this is a bug in that plugin: rerun with --debug for the traceback and report "
                               "it to the plugin's authors") from e

    def _backend_for(self, path: Path, manifest: dict[str, Any]) -> Backend:
        """The manifest's backend, if it is installed and can run here; BackendUnavailable (exit 4) if not."""
        name, plugin = str(manifest.get("backend")), str(manifest.get("plugin") or "?")
        found = self._registry.backends()
        if name not in found:
            broken = [f for f in self._registry.plugin_errors() if f.plugin == plugin]
            why = f"its plugin failed to load ({broken[0].error})" if broken else "no installed plugin provides it"
            raise BackendUnavailable(
                f"{path}: the artifact needs backend {name!r} (plugin {plugin!r}), and {why}",
                hint=f"install the package that provides plugin {plugin!r} (built-in backends come with "
                f"`pip install 'deploykit[all]'`); installed backends: {', '.join(sorted(found)) or '(none)'}")
        backend = found[name]
        _check_listed(path, manifest, backend)
        missing = backend.missing_requirements()
        if missing:
            raise BackendUnavailable(f"{path}: backend {name!r} cannot run here: {'; '.join(missing)}",
                                     hint="install what is missing (the pip command is in the reason above)")
        return backend


def _check_listed(path: Path, manifest: dict[str, Any], backend: Backend) -> None:
    """Every file the backend reads (its ``artifact_files`` patterns) must be in the manifest: an
    unlisted one would be loaded without its sha256 being checked."""
    listed = set(manifest.get("files") or ())
    present = [p.relative_to(path).as_posix() for p in Path(path).rglob("*") if p.is_file()]
    unlisted = sorted(rel for rel in present if rel not in listed
                      and any(fnmatch.fnmatch(rel, pattern) for pattern in backend.artifact_files))
    if unlisted:
        raise ArtifactError(f"{path}: {', '.join(unlisted[:5])} {'is' if len(unlisted) == 1 else 'are'} not listed in "
                            f"its manifest, so {'its' if len(unlisted) == 1 else 'their'} sha256 cannot be checked",
                            hint="the artifact was modified after conversion; convert again")


class PluginRegistry:
    """A pluggy PluginManager plus the backends its plugins provided. Build with :func:`registry`."""

    def __init__(self, *, entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("deploykit")
        self.pm.add_hookspecs(hookspecs)
        if os.environ.get(TRACE_ENV, "") not in ("", "0"):
            self.pm.trace.root.setwriter(lambda line: sys.stderr.write(f"[deploykit hook] {line}"))
            self.pm.enable_tracing()
        self._lock = threading.RLock()
        self._errors: list[PluginFailure] = []
        self._sources: dict[str, str] = {}  # plugin name -> "module:attr"
        self._backends: dict[str, Backend] | None = None
        self._owners: dict[str, str] = {}  # backend name -> plugin name
        self.pm.register(_BuiltinLoader(self), name=LOADER_PLUGIN_NAME)
        if entry_points:
            self._load_entry_points()

    # -- registration ------------------------------------------------------------------------
    def _load_entry_points(self) -> None:
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        seen: set[tuple[str, str]] = set()
        # deploykit's own entry points first, so a third party cannot shadow "torch" by load order.
        # One METADATA parse per distribution, not per entry point (each is an email-header parse).
        names: dict[int, str] = {}
        ordered = sorted(eps, key=lambda ep: (_dist_name(ep, names) != "deploykit", ep.name))
        for ep in ordered:
            if (ep.name, ep.value) in seen:  # editable installs can list one entry point twice
                continue
            seen.add((ep.name, ep.value))
            try:
                plugin = ep.load()
            except Exception as e:  # a broken plugin must not take deploykit down with it
                self._fail(ep.name, ep.value, "import", e)
                continue
            self.register(plugin, ep.name, source=ep.value)

    def register(self, plugin: object, name: str, *, source: str | None = None) -> bool:
        """Register a plugin object/module (tests and embedding apps; entry points use this too).

        Returns False (and records the reason in ``plugin_errors()``) if pluggy rejects it.
        """
        source = source or getattr(plugin, "__name__", type(plugin).__name__)
        with self._lock:
            try:
                self.pm.register(plugin, name=name)
            except Exception as e:  # PluginValidationError, or ValueError for a duplicate name
                self._fail(name, source, "register", e)
                return False
            try:
                self.pm.check_pending()  # a deploykit_* function that matches no hookspec is a typo
            except pluggy.PluginValidationError as e:
                self.pm.unregister(name=name)
                self._fail(name, source, "register", e)
                return False
            self._sources[name] = source
            self._backends = None  # recollect on next use
            return True

    def unregister(self, name: str) -> None:
        with self._lock:
            if self.pm.get_plugin(name) is not None:
                self.pm.unregister(name=name)
            self._sources.pop(name, None)
            self._errors = [f for f in self._errors if f.plugin != name]
            self._backends = None

    def _fail(self, name: str, source: str, stage: str, error: BaseException | str) -> None:
        text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
        self._errors.append(PluginFailure(plugin=name, source=source, stage=stage, error=text))

    # -- backends ----------------------------------------------------------------------------
    def _collect(self) -> dict[str, Backend]:
        from .backend import Backend

        self._errors = [f for f in self._errors if f.stage in ("import", "register")]
        backends: dict[str, Backend] = {}
        self._owners = {}
        names = [n for n, _ in self.pm.list_name_plugin() if n != LOADER_PLUGIN_NAME]
        for name in names:
            plugin = self.pm.get_plugin(name)
            source = self._sources.get(name, name)
            # Call each plugin's hook on its own: one raising plugin must not hide the others' backends.
            others = [p for n, p in self.pm.list_name_plugin() if n != name]
            try:
                results = self.pm.subset_hook_caller("deploykit_backends", remove_plugins=others)()
            except Exception as e:
                self._fail(name, source, "deploykit_backends", e)
                continue
            for result in results:
                items = result if isinstance(result, (list, tuple)) else [result]
                for backend in items:
                    problem = _validate(backend, Backend)
                    if problem:
                        self._fail(name, source, "validate", problem)
                    elif backend.name in backends:
                        self._fail(name, source, "validate",
                                   f"backend name {backend.name!r} is already registered by plugin "
                                   f"{self._owners[backend.name]!r}; plugin {name!r} must choose another name")
                    else:
                        backends[backend.name] = backend
                        self._owners[backend.name] = name
            del plugin
        return backends

    def backends(self) -> dict[str, Backend]:
        with self._lock:
            if self._backends is None:
                self._backends = self._collect()
            return dict(self._backends)

    def get_backend(self, name: str) -> Backend:
        found = self.backends()
        if name not in found:
            broken = [f.plugin for f in self.plugin_errors()]
            hint = f"valid backends: {', '.join(sorted(found)) or '(none installed)'}"
            if broken:
                hint += f"; plugins that failed to load: {', '.join(broken)} (see `deploykit backends`)"
            raise BackendError(f"unknown backend {name!r}", hint=hint)
        return found[name]

    def call_isolated(self, hook: str, **kwargs: Any) -> list[tuple[str, Any, Exception | None]]:
        """Call ``hook`` on each implementing plugin separately: (plugin, result, error) per plugin.

        pluggy stops at the first exception; for events (after_convert) one failing observer must not
        keep the others from hearing about it.
        """
        out = []
        everyone = self.pm.list_name_plugin()
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            others = [p for _, p in everyone if p is not impl.plugin]
            try:
                results = self.pm.subset_hook_caller(hook, remove_plugins=others)(**kwargs)
                out.append((impl.plugin_name, results[0] if isinstance(results, list) and results else results, None))
            except Exception as e:
                out.append((impl.plugin_name, None, e))
        return out

    def plugin_of(self, backend_name: str) -> str:
        """The name of the plugin (entry point) that provides ``backend_name``."""
        self.backends()
        return self._owners.get(backend_name, "?")

    def plugin_errors(self) -> list[PluginFailure]:
        self.backends()
        return list(self._errors)


def _validate(backend: Any, base: type) -> str | None:
    """Why ``backend`` cannot be used, or None. Checked once at collection, not on every call."""
    if not isinstance(backend, base):
        return f"deploykit_backends returned {backend!r}, not a deploykit.deploy.backend.Backend instance"
    name = getattr(backend, "name", None)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        return f"backend name {name!r} must be short and lowercase (letters, digits, '-', '_')"
    schemes = getattr(backend, "schemes", ())
    if not schemes:
        return f"backend {name!r} declares no schemes (the first one is its default)"
    scheme_names = [s.name for s in schemes]
    if len(set(scheme_names)) != len(scheme_names):
        return f"backend {name!r} declares a scheme twice: {scheme_names}"
    return None


def _dist_name(ep: importlib.metadata.EntryPoint, cache: dict[int, str] | None = None) -> str:
    """The lower-cased name of the distribution that declares ``ep`` ("" if unknown); ``cache`` (by the
    distribution object's id, shared by its entry points) saves re-parsing its METADATA."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return ""
    if cache is None:
        return (dist.metadata["Name"] or "").lower()
    if id(dist) not in cache:
        cache[id(dist)] = (dist.metadata["Name"] or "").lower()
    return cache[id(dist)]


_REGISTRY: PluginRegistry | None = None
_REGISTRY_LOCK = threading.Lock()


def registry() -> PluginRegistry:
    """The process-wide registry, built on first use (never at import)."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        if _REGISTRY is None:
            _REGISTRY = PluginRegistry()
        return _REGISTRY


def reset() -> None:
    """Forget the registry so the next call rediscovers entry points (after installing a plugin)."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        _REGISTRY = None


def plugin_manager() -> pluggy.PluginManager:
    return registry().pm


def backends() -> dict[str, Backend]:
    """Every usable backend by name."""
    return registry().backends()


def get_backend(name: str) -> Backend:
    """The backend called ``name``; BackendError listing the valid names otherwise."""
    return registry().get_backend(name)


def plugin_errors() -> list[PluginFailure]:
    """Plugins that failed to import, register or provide valid backends, with the reason."""
    return registry().plugin_errors()
