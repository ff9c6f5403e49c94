"""Progress of a bench run drawn with rich: what the CLI, ``make demo`` and benchmark scripts show.

Public, so that every caller of ``run_bench`` draws the same thing without reaching into the CLI:
``run_bench_with_progress(cfg)`` is ``run_bench`` with the bar on stderr (so ``--json > file`` stays clean).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .harness import BenchConfig
    from .quiet import QuietGuard


class RichReporter:
    """A progress bar over rows with the current row and stage (converting / measuring), and one line
    per finished row. Implements ``deploykit.bench.harness.Reporter``; call ``stop()`` when done."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
        self.task: Any = None
        self.console = console

    def start(self, total: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("starting", total=total)

    def stage(self, index: int, label: str, stage: str) -> None:
        from rich.markup import escape

        self.progress.update(self.task, description=escape(f"{label}: {stage}"))

    def done(self, index: int, row: dict[str, Any]) -> None:
        self.progress.advance(self.task)
        status = row["status"]
        from .report import short_reason

        detail = "cached" if row.get("cached") else ("converted" if status == "ok" else short_reason(row))
        mark = {"ok": "[green]ok[/green]", "unavailable": "[yellow]unavailable[/yellow]"}.get(status, "[red]error[/red]")
        # Reasons are plugin text: "pip install 'deploykit[tensorrt]'" must not be read as markup.
        from rich.markup import escape

        text = escape(f"{row['backend']}/{row['scheme']}: ") + mark + escape(f" {detail if status != 'ok' else ''}")
        self.console.print(f"  {text}".rstrip())

    def stop(self) -> None:
        self.progress.stop()


def run_bench_with_progress(cfg: BenchConfig, *, guard: QuietGuard | None = None) -> dict[str, Any]:
    """``run_bench(cfg, guard=guard)`` drawing a RichReporter on stderr, stopped however the run ends."""
    from rich.console import Console

    from .harness import run_bench

    reporter = RichReporter(Console(stderr=True))
    try:
        return run_bench(cfg, reporter, guard=guard)
    finally:
        if reporter.task is not None:
            reporter.stop()
