"""``deploykit convert``: checkpoint -> artifact folder, with the parity proof printed as a table."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  deploykit convert runs/nano --backend torch --out artifacts/nano-torch            # fp32, the default
  deploykit convert runs/nano --backend torch --quant int8-dynamic --out artifacts/nano-int8
  deploykit convert runs/nano --backend torch --quant prune-l1 --option sparsity=0.5 --out artifacts/nano-p50
  deploykit convert runs/nano --backend onnx --quant fp16 --out artifacts/nano-onnx --force --json
  deploykit convert runs/nano --backend torch --quant int8-static --out a/x --allow-mismatch   # keep a failing artifact

Every conversion is loaded back and compared with the fp32 torch model (max |Δlogit|, KL, top-1,
greedy decoding); past the scheme's tolerance convert exits with code 3 and writes nothing.
See `deploykit backends` for backends, schemes and their tolerances.

--out is never the checkpoint, inside it or around it; an existing --out is replaced only with --force and
only if it is an artifact. The artifact is written beside --out and renamed onto it when complete.

exit codes: 0 ok, 2 bad input (unknown backend/scheme, bad checkpoint, --out exists or is not replaceable),
            3 parity past tolerance, 4 backend unavailable here (the message gives the pip command),
            5 environment (--out not writable, disk full). With --json, errors are JSON on stdout too."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="convert a checkpoint to a deployment artifact, with a parity proof",
                       description="Convert MODEL (a deploykit or transformers checkpoint folder) into an artifact "
                       "folder for --backend, prove it against the fp32 model and write deploykit.json.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="checkpoint folder (config.json + model.safetensors)")
    p.add_argument("--backend", required=True, help="backend name, e.g. torch or onnx (see `deploykit backends`)")
    p.add_argument("--quant", default=None, help="scheme, e.g. fp32, bf16, int8-dynamic (default: the backend's first)")
    p.add_argument("--out", required=True, type=Path, help="artifact folder to create")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--no-verify", action="store_true", help="skip the parity proof (recorded in the manifest)")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="keep the artifact even if parity is past tolerance (recorded in the manifest)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for converting and verifying")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="backend/scheme option, repeatable (e.g. sparsity=0.5)")
    p.add_argument("--json", action="store_true", help="print a JSON summary of the manifest instead of a table")
    return p


def _options(pairs: list[str]) -> dict[str, str]:
    from ..errors import ConfigError

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--option {pair!r} must look like KEY=VALUE", hint="e.g. --option sparsity=0.5")
        out[key.strip()] = value.strip()
    return out


def summary(manifest: dict) -> dict:
    """The manifest's scalar facts plus the parity summary (files and per-probe rows left out)."""
    parity = manifest.get("parity") or {}
    return {
        "path": manifest.get("path"), "backend": manifest["backend"], "quant": manifest["quant"],
        "verified": manifest["verified"], "allow_mismatch": manifest["allow_mismatch"],
        "parity_passed": manifest["parity_passed"], "parity": parity.get("summary"),
        "tolerance": manifest["scheme"]["tolerance"], "violations": parity.get("violations", []),
        "total_bytes": manifest["total_bytes"], "files": sorted(manifest["files"]),
        "source_sha256": manifest["source"]["sha256"], "created_utc": manifest["created_utc"],
        "backend_info": manifest.get("backend_info", {}), "tokenizer": manifest.get("tokenizer"),
    }


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..deploy.convert import convert

    err = Console(stderr=True)
    options = _options(args.option)
    quiet = args.json or not sys.stderr.isatty()
    with err.status("converting", spinner="dots") if not quiet else _Null() as status:
        def progress(message: str) -> None:
            if quiet:
                return
            status.update(f"{args.backend}: {message}")
            err.log(message)

        result = convert(args.model, args.backend, args.quant, args.out, force=args.force, verify=not args.no_verify,
                         allow_mismatch=args.allow_mismatch, threads=args.threads, options=options, progress=progress)
    if args.json:
        print(json.dumps({**summary(result.manifest), "path": str(result.path)}, indent=2))
        return 0
    out = Console()
    if result.report is not None:
        out.print(result.report.table())
        for note in result.report.notes:  # the backend's own proofs and caveats (e.g. gguf's tokenizer proof)
            out.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
        if not result.report.passed():
            out.print(f"[yellow]kept despite: {'; '.join(result.report.violations())} (--allow-mismatch)[/]")
    else:
        out.print("[yellow]parity not verified (--no-verify); the manifest records it[/]")
    if not result.manifest["tokenizer"]:
        out.print(f"[yellow]note: {args.model} has no tokenizer.json, so neither has the artifact: it takes token ids "
                  "(Python API), not text (`deploykit generate --prompt`). Convert from a folder with its tokenizer.[/]",
                  soft_wrap=True)
    size = result.manifest["total_bytes"]
    out.print(f"wrote {result.path} ({size / 1e6:.2f} MB, {result.backend}/{result.quant})")
    return 0


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *a, **k):
        pass
