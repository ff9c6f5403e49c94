"""Entry point of the ``deploykit`` command (also ``python -m deploykit``, so ``torchrun -m deploykit`` works).

Every subcommand module defines ``register(subparsers) -> argparse.ArgumentParser`` (cheap: no heavy
imports) and ``run(args) -> int``. Errors derived from DeploykitError print one line plus a HINT and
exit with the error's code; ``--debug`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import NoReturn

from ..errors import ConfigError, DeploykitError
from ..fsutil import filesystem_error

# Order here is the order in `deploykit --help`.
COMMANDS = ("train", "plan", "sft", "reward", "rlhf", "generate", "convert", "eval", "backends", "bench")

EPILOG = """\
examples:
  deploykit train --preset micro --data embedded --steps 2000 --out runs/micro
  deploykit generate runs/micro --prompt "Once upon a time" --max-new-tokens 64
  deploykit convert runs/micro --backend onnx --quant int8-dynamic --out artifacts/micro-onnx-int8
  deploykit backends --json
  deploykit bench runs/micro --backends all

Run `deploykit COMMAND --help` for each command's options and examples."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deploykit", description="Train a small decoder-only LLM and ship it to every runtime, "
        "proving each conversion against the fp32 model.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from .. import __version__
    parser.add_argument("--version", action="version", version=f"deploykit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"{__package__}.{name}")
        p = module.register(sub)
        p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
        p.set_defaults(func=module.run)
    add_plugin_commands(sub, set(COMMANDS))
    return parser


def add_plugin_commands(sub: argparse._SubParsersAction, taken: set[str]) -> None:
    """Subcommands plugins contribute (the ``deploykit_cli_commands`` hook), after the built-in ones.

    The CLI imports no plugin: they come through the registry. A plugin whose hook or ``register``
    raises, or a name already taken, is skipped with a warning, so one broken plugin cannot take the
    command line down.
    """
    from ..deploy.registry import registry

    for plugin, commands, error in registry().call_isolated("deploykit_cli_commands"):
        if error is not None:
            print(f"warning: plugin {plugin!r}: deploykit_cli_commands failed ({type(error).__name__}: {error}); "
                  "its commands are missing", file=sys.stderr)
            continue
        for command in commands or []:
            name = getattr(command, "name", None)
            if not isinstance(name, str) or name in taken:
                print(f"warning: plugin {plugin!r}: command {name!r} skipped (the name is taken or not a string)",
                      file=sys.stderr)
                continue
            try:
                p = command.register(sub)
            except Exception as e:
                print(f"warning: plugin {plugin!r}: command {name!r} skipped ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
            p.set_defaults(func=command.run)
            taken.add(name)


class _UsageError(Exception):
    """argparse's complaint about the command line, raised instead of argparse's own exit."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors come back to :func:`main`, so that they too can be JSON."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self, message)


class Interrupted(DeploykitError):
    """Ctrl-C: reported like any error, with the shell's conventional exit code."""

    exit_code = 130


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 ok, 1 failed run (e.g. bench's fp32 row), 2 bad input, 3 parity past
    tolerance, 4 unavailable here (package, plugin, GPU), 5 environment (disk full, permission), 75 busy
    machine for benchmarks/results, 130 interrupted. Under --json, an error is a JSON object on stdout too."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as e:
        e.parser.print_usage(sys.stderr)
        return _report(ConfigError(f"{e.parser.prog}: {e}", hint=f"see `{e.parser.prog} --help`"),
                       as_json="--json" in argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    as_json = bool(getattr(args, "json", False))
    try:
        return int(args.func(args) or 0)
    except DeploykitError as e:
        if args.debug:
            raise
        return _report(e, as_json=as_json)
    except OSError as e:  # one no writer translated at its source: still the machine's, not the user's
        if args.debug:
            raise
        return _report(filesystem_error(e, e.filename or "?", "read or write"), as_json=as_json)
    except KeyboardInterrupt:
        return _report(Interrupted("interrupted", hint="nothing half-written was left behind"), as_json=as_json)


def _report(error: DeploykitError, *, as_json: bool) -> int:
    """One error on stderr ("error: ..." and a HINT line); under --json also a JSON object on stdout."""
    print(f"error: {error}", file=sys.stderr)
    if as_json:
        message = str(error.args[0]) if error.args else type(error).__name__
        print(json.dumps({"error": message, "hint": error.hint, "exit": error.exit_code,
                          "type": type(error).__name__}))
    return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
