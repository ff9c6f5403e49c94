"""Progress of a bench run drawn with rich: what the CLI, ``make demo`` and benchmark scripts show.

Public, so that every caller of ``run_bench`` draws the same thing without reaching into the CLI.
"""
from __future__ import annotations

from typing import Any


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
        self.progress.update(self.task, description=f"{label}: {stage}")

    def done(self, index: int, row: dict[str, Any]) -> None:
        self.progress.advance(self.task)
        status = row["status"]
        detail = "cached" if row.get("cached") else ("converted" if status == "ok" else row.get("reason", ""))
        mark = {"ok": "[green]ok[/green]", "unavailable": "[yellow]unavailable[/yellow]"}.get(status, "[red]error[/red]")
        self.console.print(f"  {row['backend']}/{row['scheme']}: {mark} {detail if status != 'ok' else ''}".rstrip())

    def stop(self) -> None:
        self.progress.stop()
