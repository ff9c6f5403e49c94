"""Entry point of the ``deploykit`` command (also ``python -m deploykit``, so ``torchrun -m deploykit`` works).

Every subcommand module defines ``register(subparsers) -> argparse.ArgumentParser`` (cheap: no heavy
imports) and ``run(args) -> int``. Errors derived from DeploykitError print one line plus a HINT and
exit with the error's code; ``--debug`` shows the full traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import DeploykitError

# Order here is the order in `deploykit --help`.
COMMANDS = ("train", "generate", "convert", "backends", "bench")

EPILOG = """\
examples:
  deploykit train --preset micro --data embedded --steps 2000 --out runs/micro
  deploykit generate runs/micro --prompt "Once upon a time" --max-new-tokens 64
  deploykit convert runs/micro --backend onnx --quant int8-dynamic --out artifacts/micro-onnx-int8
  deploykit backends --json
  deploykit bench runs/micro --backends all

Run `deploykit COMMAND --help` for each command's options and examples."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DeploykitError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
