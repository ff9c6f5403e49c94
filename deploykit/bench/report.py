"""Bench outputs: results.json, results.csv, report.md (the seed-style table, measured), report.png,
and the rich table printed to the terminal. Everything here reads the results dict; nothing measures.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from .machine import busy_warning, describe, describe_native
from .quiet import load_lines
from .schema import COLUMN_NAMES, COLUMNS

PPL_BUDGET_PCT = 1.0  # "within 1 % Δppl": the accuracy budget most deployments accept
COMPRESSED_RATIO = 0.6  # a row counts as compressed below 0.6x the fp32 size


# -- "best for", derived from the measurements ----------------------------------------------------------
def best_for(rows: list[dict[str, Any]]) -> list[str]:
    """Tags per row: what the measurements of this run make it the best choice for.

    A row whose artifact failed its parity proof at conversion is never recommended: it is tagged
    as failed, and the best-of picks run over the rows that passed (or were not verified).
    """
    tags: list[list[str]] = [[] for _ in rows]
    ok = []
    for i, r in enumerate(rows):
        if r.get("status") != "ok":
            continue
        if r.get("convert_parity_ok") is False:
            tags[i].append("failed its parity proof")
        else:
            ok.append(i)
    if rows and rows[0].get("status") == "ok":
        tags[0].append("reference")

    def pick(candidates: list[int], key: str, largest: bool) -> int | None:
        have = [i for i in candidates if rows[i].get(key) is not None]
        if len(have) < 2:  # "best" of one row says nothing
            return None
        return (max if largest else min)(have, key=lambda i: rows[i][key])

    within = [i for i in ok if rows[i].get("ppl_delta_pct") is not None and abs(rows[i]["ppl_delta_pct"]) <= PPL_BUDGET_PCT]
    for label, candidates, key, largest in (
        ("fastest decode", ok, "decode_tok_s", True),
        ("fastest prefill", ok, "prefill_tok_s", True),
        ("smallest", ok, "size_bytes", False),
        ("least memory", ok, "peak_rss_bytes", False),
        ("fastest load", ok, "load_s", False),
    ):
        i = pick(candidates, key, largest)
        if i is not None:
            tags[i].append(label)
    for label, key, largest in (("fastest decode", "decode_tok_s", True), ("smallest", "size_bytes", False)):
        i = pick(within, key, largest)
        if i is not None and label not in tags[i]:
            tags[i].append(f"{label} within {PPL_BUDGET_PCT:g} % Δppl")
    compressed = [i for i in ok if rows[i].get("size_ratio") is not None and rows[i]["size_ratio"] <= COMPRESSED_RATIO
                  and rows[i].get("ppl_delta_pct") is not None]
    if compressed:
        i = min(compressed, key=lambda i: abs(rows[i]["ppl_delta_pct"]))
        tags[i].append("most accurate compressed")
    for i in ok:
        d = rows[i].get("ppl_delta_pct")
        if not tags[i] and d is not None and d > 5 * PPL_BUDGET_PCT:
            tags[i].append(f"nothing here (Δppl {d:+.1f} %)")
    return [", ".join(t) for t in tags]


# -- formatting ------------------------------------------------------------------------------------------
def _num(v: Any, fmt: str, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:{fmt}}{suffix}"


def _mb(v: Any) -> str:
    return _num(None if v is None else v / 2**20, ".2f", " MiB")


def _method(row: dict[str, Any]) -> str:
    return f"{row['backend']} {row['scheme']}"


FAILED_MARK = "✗ failed parity"


def failed_parity(row: dict[str, Any]) -> bool:
    """The row's artifact broke its declared tolerance at conversion (kept only for measuring)."""
    return row.get("convert_parity_ok") is False


def _marked(row: dict[str, Any], bold: str = "**") -> str:
    """The method, and for a row that failed its proof the mark, in every table."""
    return f"{_method(row)} {bold}{FAILED_MARK}{bold}" if failed_parity(row) else _method(row)


def short_reason(row: dict[str, Any]) -> str:
    """The row's reason without its artifact's path (the artifact column shows it), on one line."""
    reason = str(row.get("reason") or "")
    artifact = f"{row.get('artifact')}: "
    if row.get("artifact") and reason.startswith(artifact):  # the path is in the artifact column already
        reason = reason[len(artifact):]
    return reason.replace("|", "/").replace("\n", " ")


def _reduction(row: dict[str, Any]) -> str:
    """fp32 bytes / artifact bytes: known for every converted artifact, also one that cannot run here."""
    return _num(None if not row.get("size_ratio") else 1.0 / row["size_ratio"], ".2f", "×")


def _routing(row: dict[str, Any]) -> str:
    if row.get("moe_routing_agreement") is not None:
        return f"{100 * row['moe_routing_agreement']:.1f} %"
    note = str(row.get("moe_routing_note") or "n/a")
    return "dense" if note.endswith("dense model") else "n/a"


def _speed(row: dict[str, Any], key: str, ratio: str) -> str:
    if row.get(key) is None:
        return "n/a"
    return f"{row[key]:,.0f} ({_num(row.get(ratio), '.2f', '×')})"


def seed_table(results: dict[str, Any]) -> str:
    """Method | Speedup | Size reduction | Δ perplexity | Platform | Best for — every cell measured."""
    lines = ["| Method | Speedup (decode) | Size reduction | Δ perplexity | Platform | Best for |",
             "|---|---:|---:|---:|---|---|"]
    for r in results["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {_marked(r)} | n/a | {_reduction(r)} | n/a | {r.get('platform') or 'n/a'} | "
                         f"{r['status']}: {short_reason(r)} |")
            continue
        lines.append(f"| {_marked(r)} | {_num(r.get('decode_speedup'), '.2f', '×')} | {_reduction(r)} | "
                     f"{_num(r.get('ppl_delta_pct'), '+.2f', ' %')} | {r.get('platform') or 'n/a'} | "
                     f"{r.get('best_for') or '—'} |")
    return "\n".join(lines)


def full_table(results: dict[str, Any]) -> str:
    header = ("| Method | Size | bits/w | Load | Prefill tok/s (×) | Prefill ms (min–max) | Decode tok/s (×) | "
              "Decode min–max | KV | Peak RSS | max abs Δlogit | Top-1 | KL | PPL (Δ %) | Task acc (Δ pp) | MoE same top-k |")
    n_cols = header.count("|") - 1
    lines = [header, "|" + "---|" * n_cols]
    for r in results["rows"]:
        if r["status"] != "ok":
            cells = [_marked(r)] + ["n/a"] * (n_cols - 1)
            cells[1] = f"{r['status']}: {short_reason(r)}"
            if r.get("size_bytes"):  # converted (and proven) here, only not runnable
                cells[1] = f"{_mb(r['size_bytes'])}; {cells[1]}"
                cells[2] = _num(r.get("bits_per_weight"), ".2f")
            lines.append("| " + " | ".join(cells) + " |")
            continue
        kv = "yes" if r.get("kv_cache") else "recompute"
        ppl = f"{_num(r.get('perplexity'), '.3f')} ({_num(r.get('ppl_delta_pct'), '+.2f')})"
        acc = f"{_num(None if r.get('task_accuracy') is None else 100 * r['task_accuracy'], '.1f', ' %')} " \
              f"({_num(r.get('task_accuracy_delta'), '+.1f')})"
        cells = [_marked(r), _mb(r.get("size_bytes")), _num(r.get("bits_per_weight"), ".2f"),
                 _num(r.get("load_s"), ".2f", " s"), _speed(r, "prefill_tok_s", "prefill_speedup"),
                 f"{_num(r.get('prefill_ms'), '.2f')} ({_num(r.get('prefill_ms_min'), '.2f')}–{_num(r.get('prefill_ms_max'), '.2f')})",
                 _speed(r, "decode_tok_s", "decode_speedup"),
                 f"{_num(r.get('decode_tok_s_min'), ',.0f')}–{_num(r.get('decode_tok_s_max'), ',.0f')}",
                 kv, _mb(r.get("peak_rss_bytes")), _num(r.get("parity_max_abs_logit"), ".2e"),
                 _num(None if r.get("parity_top1") is None else 100 * r["parity_top1"], ".1f", " %"),
                 _num(r.get("parity_kl"), ".2e"), ppl, acc, _routing(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _convert_jobs(settings: dict[str, Any]) -> str:
    jobs = settings.get("convert_jobs") or 1
    if jobs <= 1:
        return ""
    each = max(1, settings["threads"] // jobs)
    return (f"; conversions ran {jobs} at a time with {each} thread{'' if each == 1 else 's'} each, before the "
            "measurements (so convert times are not a lone conversion's)")


def markdown(results: dict[str, Any]) -> str:
    m, s, model = results["machine"], results["settings"], results["model"]
    moe = f", MoE {model['n_experts']} experts top-{model['top_k']}" if model.get("variant") == "moe" else ""
    lines = [
        f"# deploykit bench: `{model['name']}`",
        "",
        f"Model: {model['params']:,} parameters ({model['variant']}{moe}), source sha256 `{model['sha256'][:16]}…`.  ",
        f"Machine: {describe(m)}; {m.get('os')}, Python {m.get('python')}; "
        f"{describe_native(m.get('native_cpu_features'))}.  ",
        f"Settings: prompt {s['prompt_len']} tokens × batch {s['batch']}, decode {s['gen_len']} tokens, "
        f"{s['warmup']} warm-up + {s['repeat']} timed runs (median, min–max), {s['threads']} "
        f"thread{'' if s['threads'] == 1 else 's'}, "
        f"perplexity on {model['ppl_tokens']:,} held-out tokens, {model['n_tasks']} exact-match tasks"
        f"{_convert_jobs(s)}.  ",
        f"Run {results['created']}, {results.get('wall_s') or 0:.0f} s.",
        "",
        *[line + "\n" for line in load_lines(results.get("quiet"))],
        *([f"> **Warning:** {busy_warning(m)}.", ""] if busy_warning(m) else []),
        "## Summary",
        "",
        seed_table(results),
        "",
        "Speedup is decode tokens/s relative to fp32 torch in the same run; size reduction is fp32 bytes / "
        "artifact bytes; Δ perplexity is relative to fp32 torch on the same held-out text. "
        f"\"Best for\" is derived from this table (Δppl budget {PPL_BUDGET_PCT:g} %).",
        "",
        "## Measurements",
        "",
        full_table(results),
        "",
        "Prefill: one forward over the prompt (median, min–max over the timed runs). Decode: the prompt is "
        "fed once (untimed), then the same held-out tokens one at a time through the runner's session; "
        "`recompute` means the runner has no KV cache and re-runs the whole sequence per token. Peak RSS is "
        "the worker process's (load + timing), each row in its own process with the same allocator settings "
        f"({', '.join(f'{k}={v}' for k, v in m.get('allocator_env', {}).items())}). Parity is against the fp32 torch "
        f"model on {len(model['probe_lengths'])} probes of lengths {', '.join(map(str, model['probe_lengths']))}.",
    ]
    problems = [r for r in results["rows"] if r["status"] != "ok"]
    failed = [r for r in results["rows"] if failed_parity(r)]
    plugin_failed = [r for r in results["rows"] if r.get("plugin_metric_errors")]
    if problems or failed or plugin_failed:
        lines += ["", "## Not measured / notes", ""]
        lines += [f"- **{_method(r)}** — {r['status']}: {short_reason(r)}" for r in problems]
        lines += [f"- **{_method(r)}**: deploykit_bench_metrics of plugin {name!r} failed ({error}); "
                  "its columns are missing from this row" for r in plugin_failed
                  for name, error in sorted(r["plugin_metric_errors"].items())]
        lines += [f"- **{_method(r)}** {FAILED_MARK}: at conversion it broke its declared tolerance "
                  f"({r.get('parity_violations') or 'see convert_parity in results.json'}); measured for the "
                  "record, never recommended, and `deploykit convert` refuses it (exit 3)." for r in failed]
    lines += ["", "Files: `results.json` (all numbers, raw timings, machine and versions), `results.csv`, "
              "`report.png` (decode tokens/s vs size, coloured by Δ perplexity).", ""]
    return "\n".join(lines)


# -- files ------------------------------------------------------------------------------------------------
def csv_columns(results: dict[str, Any]) -> list[str]:
    extra = sorted({k for r in results["rows"] for k in r.get("extra_columns", [])})
    return list(COLUMN_NAMES) + extra


def write_csv(results: dict[str, Any], path: Path) -> None:
    cols = csv_columns(results)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in results["rows"]:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


def write_png(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["status"] == "ok" and r.get("decode_tok_s") and r.get("size_bytes")]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    if rows:
        x = [r["size_bytes"] / 2**20 for r in rows]
        y = [r["decode_tok_s"] for r in rows]
        d = [r.get("ppl_delta_pct") if r.get("ppl_delta_pct") is not None else float("nan") for r in rows]
        finite = [abs(v) for v in d if math.isfinite(v)]
        lim = max([1.0] + finite)
        # Diverging colours centred on 0: white-ish is "as accurate as fp32", red worse, blue better.
        sc = ax.scatter(x, y, c=d, cmap="coolwarm", vmin=-lim, vmax=lim, s=70, edgecolors="black", linewidths=0.6)
        bad = [(xi, yi) for r, xi, yi in zip(rows, x, y) if failed_parity(r)]
        if bad:  # a red cross over each row whose artifact failed its proof
            ax.scatter(*zip(*bad), marker="x", s=160, c="red", linewidths=2, label=FAILED_MARK, zorder=3)
            ax.legend(loc="best", fontsize=8)
        for r, xi, yi in zip(rows, x, y):
            ax.annotate(_marked(r, bold=""), (xi, yi), textcoords="offset points", xytext=(5, 4), fontsize=8,
                        color="red" if failed_parity(r) else "black")
        fig.colorbar(sc, ax=ax, label="Δ perplexity vs fp32 torch (%)")
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no measured rows", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("artifact size (MiB, log scale)")
    ax.set_ylabel("decode tokens/s (median)")
    m = results["machine"]
    ax.set_title(f"{results['model']['name']}: decode speed vs size\n{describe(m)}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


REPORT_FILES = {"json": "results.json", "csv": "results.csv", "md": "report.md", "png": "report.png"}


def write_reports(results: dict[str, Any], out: Path, *, named: Path | None = None) -> dict[str, Path]:
    """The four reports into ``out``; ``results["outputs"]`` names them under ``named`` (default ``out``):
    the folder they will be in once a staged folder is renamed onto it."""
    paths = {kind: out / name for kind, name in REPORT_FILES.items()}
    results["outputs"] = {kind: str((named or out) / name) for kind, name in REPORT_FILES.items()}
    paths["json"].write_text(json.dumps(results, indent=2, default=str) + "\n")
    write_csv(results, paths["csv"])
    paths["md"].write_text(markdown(results))
    write_png(results, paths["png"])
    return paths


# -- terminal ----------------------------------------------------------------------------------------------
def rich_table(results: dict[str, Any]) -> Any:
    """The terminal summary: the columns that decide a choice; report.md and results.json hold the rest."""
    from rich.table import Table

    t = Table(title=f"deploykit bench: {results['model']['name']}", caption=describe(results["machine"]),
              title_style="bold", header_style="bold")
    for name, justify in (("method", "left"), ("size (×fp32)", "right"), ("decode tok/s (×)", "right"),
                          ("prefill tok/s (×)", "right"), ("peak RSS", "right"), ("top-1", "right"),
                          ("Δppl", "right"), ("task acc (Δpp)", "right"), ("MoE top-k", "right"),
                          ("best for", "left")):
        t.add_column(name, justify=justify)
    for r in results["rows"]:
        if r["status"] != "ok":
            style = "yellow" if r["status"] == "unavailable" else "red"
            size = f" {_mb(r['size_bytes'])} ({_num(r.get('size_ratio'), '.2f')})" if r.get("size_bytes") else ""
            method = f"{_method(r)} [bold red]{FAILED_MARK}[/]" if failed_parity(r) else _method(r)
            t.add_row(method, f"[{style}]{r['status']}[/{style}]{size}", *[""] * 8)
            continue
        acc = "n/a" if r.get("task_accuracy") is None else \
            f"{100 * r['task_accuracy']:.0f} % ({_num(r.get('task_accuracy_delta'), '+.0f')})"
        kv = "" if r.get("kv_cache") else " [dim]recompute[/dim]"
        method = f"{_method(r)} [bold red]{FAILED_MARK}[/]" if failed_parity(r) else _method(r)
        t.add_row(method, f"{_mb(r.get('size_bytes'))} ({_num(r.get('size_ratio'), '.2f')})",
                  _speed(r, "decode_tok_s", "decode_speedup") + kv, _speed(r, "prefill_tok_s", "prefill_speedup"),
                  _mb(r.get("peak_rss_bytes")),
                  _num(None if r.get("parity_top1") is None else 100 * r["parity_top1"], ".1f", " %"),
                  _num(r.get("ppl_delta_pct"), "+.2f", " %"), acc, _routing(r), r.get("best_for") or "")
    return t


def notes(results: dict[str, Any]) -> list[str]:
    """One line per row that was not measured, with its reason (printed under the terminal table)."""
    lines = [f"{_method(r)}: {r['status']}: {short_reason(r)}" for r in results["rows"] if r["status"] != "ok"]
    lines += [f"{_method(r)}: {FAILED_MARK} at conversion ({r.get('parity_violations') or 'see results.json'}): "
              "never recommended; `deploykit convert` refuses it" for r in results["rows"] if failed_parity(r)]
    warning = busy_warning(results["machine"])
    stamp = results.get("quiet") or {}
    if stamp.get("measured_on_busy_machine"):  # the stamp's line, without its markdown
        lines.append("warning: " + load_lines(stamp)[-1].removeprefix("> ").replace("**", ""))
    return lines + ([f"warning: {warning}"] if warning else [])


__all__ = ["COLUMNS", "FAILED_MARK", "best_for", "failed_parity", "markdown", "notes", "rich_table", "seed_table", "write_reports"]
