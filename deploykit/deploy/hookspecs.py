"""deploykit's plugin hooks (pluggy). Every hook is prefixed ``deploykit_``, grouped by lifecycle stage.

A plugin is a module (or object) with functions marked ``@deploykit.hookimpl``, exposed through the
``deploykit.backends`` entry-point group. deploykit's own backends use exactly that mechanism.
docs/plugins.md documents each hook; tests/test_plugins.py checks every hook is documented and tested.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pluggy

if TYPE_CHECKING:
    import argparse

    from .backend import Backend, Runner

hookspec = pluggy.HookspecMarker("deploykit")
hookimpl = pluggy.HookimplMarker("deploykit")


# -- registration ----------------------------------------------------------------------------------
@hookspec
def deploykit_backends() -> list[Backend]:
    """Return the backends this plugin provides.

    Results of all plugins are concatenated. A backend name may be registered only once; a plugin
    that raises here is reported by ``deploykit backends`` and the others stay usable.
    """


# -- loading ---------------------------------------------------------------------------------------
@hookspec(firstresult=True)
def deploykit_load_artifact(path: Path, manifest: dict[str, Any], options: dict[str, Any]) -> Runner | None:
    """Open an artifact folder as a Runner, or return None to let the next plugin try.

    Stops at the first non-None result. deploykit's built-in implementation (tried last) dispatches
    on ``manifest["backend"]``; a plugin can take over loading, e.g. to serve an artifact remotely.
    """


# -- after conversion ------------------------------------------------------------------------------
@hookspec
def deploykit_after_convert(artifact: Path, manifest: dict[str, Any]) -> None:
    """Called after an artifact was written, verified and renamed into place.

    ``manifest`` is the saved ``deploykit.json`` (parity report included). Return values are ignored;
    an exception here is reported as a warning and does not undo the conversion.
    """


# -- benchmarking ----------------------------------------------------------------------------------
@hookspec
def deploykit_bench_metrics(runner: Runner, row: dict[str, Any]) -> dict[str, float] | None:
    """Extra metric columns for one bench row, measured on the loaded ``runner``.

    ``row`` holds the row's measurements so far (read-only). The dicts of all plugins are merged into
    the row, later plugins winning on equal keys; None adds nothing.
    """


# -- command line ----------------------------------------------------------------------------------
class CliCommand(Protocol):
    """A subcommand a plugin adds to the ``deploykit`` command line (``deploykit NAME ...``)."""

    name: str  # the subcommand, e.g. "import-gguf"

    def register(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """Add the parser called ``name`` to ``subparsers`` and return it (cheap: no heavy imports)."""
        ...

    def run(self, args: argparse.Namespace) -> int:
        """Run the command; return its exit code. A DeploykitError is reported like a built-in command's."""
        ...


@hookspec
def deploykit_cli_commands() -> list[CliCommand]:
    """Return the subcommands this plugin adds to ``deploykit`` (after the built-in ones).

    Results of all plugins are concatenated. deploykit adds ``--debug`` to each parser and calls
    ``run(args)``; its errors are reported like a built-in command's (one line, HINT, exit code). A name
    already taken (a built-in command or an earlier plugin's) is skipped with a warning on stderr, and
    so is every command of a plugin whose hook raises: the rest of the command line stays usable.
    """
