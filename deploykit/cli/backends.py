"""``deploykit backends``: every backend with its schemes, tolerances and availability, and broken plugins."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict

EXAMPLES = """\
examples:
  deploykit backends                 # table: backend, schemes (default first), availability
  deploykit backends --json          # for scripts: schemes with tolerances, missing requirements, plugin errors
  DEPLOYKIT_TRACE_HOOKS=1 deploykit backends    # print every plugin hook call

Backends come from plugins registered in the `deploykit.backends` entry-point group (deploykit's own
torch and onnx backends included); install a plugin package and it appears here. See docs/plugins.md."""


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("backends", help="list backends, their schemes and whether they can run here",
                       description="List every installed backend: schemes (the first is the default), each "
                       "scheme's parity tolerance, platforms, availability with the reason when unavailable, "
                       "and plugins that failed to load.", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def describe() -> dict:
    from ..deploy.registry import plugin_errors, registry

    reg = registry()
    rows = []
    for name, be in sorted(reg.backends().items()):
        try:
            missing = list(be.missing_requirements())
        except Exception as e:  # a requirement probe that crashes makes the backend unavailable, not the command
            missing = [f"missing_requirements() raised {type(e).__name__}: {e}"]
        rows.append({
            "name": name, "description": be.description, "plugin": reg.plugin_of(name), "platforms": be.platforms,
            "default_scheme": be.default_scheme, "available": not missing, "missing": missing,
            "artifact_files": list(be.artifact_files),
            "schemes": [{"name": s.name, "description": s.description, "tolerance": asdict(s.tolerance),
                         "options": s.options.describe()} for s in be.schemes],
        })
    errors = [asdict(f) for f in plugin_errors()]
    return {"backends": rows, "plugin_errors": errors}


def run(args: argparse.Namespace) -> int:
    data = describe()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    # Plugin text is data, not markup: "pip install 'deploykit[tensorrt]'" must keep its brackets.
    table = Table(title="deploykit backends", title_justify="left")
    for col in ("backend", "schemes (default first)", "platforms", "available", "plugin"):
        table.add_column(col)
    for row in data["backends"]:
        avail = "[green]yes[/]" if row["available"] else "[red]no[/]: " + escape("; ".join(row["missing"]))
        table.add_row(escape(row["name"]), escape(", ".join(s["name"] for s in row["schemes"])),
                      escape(row["platforms"]), avail, escape(row["plugin"]))
    console = Console()
    console.print(table)
    tol = Table(title="parity tolerances (vs fp32 torch) and options (--option key=value)", title_justify="left")
    numeric = ("Δppl", "max |Δlogit|", "/ logit range", "mean KL", "top-1", "greedy match")
    for col in ("backend/scheme", *numeric, "options (default)"):
        tol.add_column(col, justify="right" if col in numeric else "left")

    def bound(value: float | None, spec: str = "g") -> str:
        return "—" if value is None else f"≤ {format(value, spec)}"

    for row in data["backends"]:
        for s in row["schemes"]:
            t = s["tolerance"]
            opts = ", ".join(f"{o['name']} ({str(o['default']).lower() if isinstance(o['default'], bool) else o['default']})"
                             for o in s["options"])
            tol.add_row(f"{row['name']}/{s['name']}", bound(t.get("max_delta_ppl"), ".2%"), bound(t["max_abs_logit"]),
                        bound(t.get("max_rel_logit")), f"≤ {t['max_kl']:g}",
                        f"≥ {t['min_top1']:g}", f"≥ {t['min_greedy_match']:g}", opts or "—")
    console.print(tol)
    for e in data["plugin_errors"]:
        console.print(f"[red]broken plugin[/] {escape(str(e['plugin']))} ({escape(str(e['source']))}), "
                      f"at {escape(str(e['stage']))}: {escape(str(e['error']))}")
    return 0
