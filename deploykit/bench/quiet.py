"""The quiet-machine rule: the project's committed numbers (``benchmarks/results/``) come from an idle machine.

Why: on 2 cores shared by several processes every timing is noise; committed results once showed torch
decoding at 10 tok/s where a quiet run gives 450. So every writer of benchmark results (``deploykit
bench`` through ``run_bench``, and each script in benchmarks/) asks this module twice:

- before any work, ``QuietGuard.begin``: a 1-minute load average over ``LOAD_PER_CPU`` x the CPUs this
  process may use (1.5 on 2) refuses a run into benchmarks/results/ at once, before minutes of
  training or measuring;
- at the end, ``QuietGuard.finish``: by then the run's own threads are in the load (a quiet 2-thread
  run ends near 2.0), so they are discounted; what is left over the threshold is other processes'
  load during the run. Those reports are written to a temporary folder instead and
  ``QuietVerdict.raise_if_diverted`` names it: the minutes of work stay available for a look, but the
  numbers never land silently in the committed tree. (Refusing to write at all would throw them away.)

``--allow-busy`` overrides both checks, and then the reports say so: ``QuietVerdict.stamp()`` goes into
the JSON, ``load_lines()`` gives the markdown a visible "measured on a busy machine" line.
Writing anywhere else is never refused: the rule is about what gets committed as the project's
numbers, and the reports record the load averages and the busy stamp wherever they are written.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DeploykitError
from .machine import available_cpus

# 0.75 runnable tasks per CPU: 1.5 on the 2-CPU machines this project runs on. Above it another process
# holds a core most of the time, and single-thread decode speeds already drop by large factors.
LOAD_PER_CPU = 0.75
# Any folder named results inside one named benchmarks: this checkout's, another clone's, or a copy.
RESULTS_PARTS = ("benchmarks", "results")
ALLOW_BUSY_FLAG = "--allow-busy"
ALLOW_BUSY_HELP = ("write into benchmarks/results/ even when the machine is busy (1-minute load average over "
                   f"{LOAD_PER_CPU:g} per CPU, before or during the run); the reports are then stamped "
                   "'measured on a busy machine' with the load averages. Other output folders are never refused")


class BusyMachineError(DeploykitError):
    """Numbers for benchmarks/results/ would be (or were) measured on a busy machine."""

    exit_code = 75  # EX_TEMPFAIL (sysexits.h): the same command succeeds later, on an idle machine


def add_allow_busy_flag(parser: argparse.ArgumentParser) -> None:
    """The one ``--allow-busy`` flag, spelt and explained the same in the CLI and every script."""
    parser.add_argument(ALLOW_BUSY_FLAG, action="store_true", dest="allow_busy", help=ALLOW_BUSY_HELP)


def quiet_threshold(cpus: int) -> float:
    """The highest 1-minute load average (of other processes) that still counts as quiet."""
    return LOAD_PER_CPU * cpus


def is_committed_results(path: Path | str) -> bool:
    """Whether ``path`` lies in a ``benchmarks/results`` folder, i.e. would be committed as the project's numbers."""
    parts = Path(path).expanduser().resolve().parts
    return any(parts[i:i + 2] == RESULTS_PARTS for i in range(len(parts) - 1))


def load_averages() -> tuple[float, float, float] | None:
    """The 1, 5 and 15-minute load averages, or None where the OS has none (Windows)."""
    try:
        one, five, fifteen = os.getloadavg()
    except (AttributeError, OSError):
        return None
    return round(one, 2), round(five, 2), round(fifteen, 2)


@dataclass(frozen=True)
class LoadReading:
    """The load averages at one moment and what they say about the machine."""

    averages: tuple[float, float, float] | None  # 1, 5, 15 min; None: not measurable here
    cpus: int  # CPUs this process may run on: the threshold scales with them
    own_threads: int = 0  # threads of this run counted in the load (0 before it starts)

    def __post_init__(self) -> None:
        if not isinstance(self.cpus, int) or self.cpus < 1:
            raise ConfigError(f"LoadReading: cpus={self.cpus!r} must be an integer >= 1")
        if not isinstance(self.own_threads, int) or self.own_threads < 0:
            raise ConfigError(f"LoadReading: own_threads={self.own_threads!r} must be an integer >= 0")
        if self.averages is not None and (len(self.averages) != 3 or
                                          not all(math.isfinite(x) and x >= 0 for x in self.averages)):
            raise ConfigError(f"LoadReading: averages={self.averages!r} must be three finite loads >= 0, or None")

    @property
    def threshold(self) -> float:
        return quiet_threshold(self.cpus)

    @property
    def others(self) -> float | None:
        """The 1-minute load less this run's own threads: what other processes put on the cores."""
        return None if self.averages is None else max(0.0, self.averages[0] - self.own_threads)

    @property
    def busy(self) -> bool:
        others = self.others
        return others is not None and others > self.threshold


def read_load(own_threads: int = 0) -> LoadReading:
    return LoadReading(load_averages(), available_cpus(), own_threads)


def _threads(n: int) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def _busy_message(out: Path, reading: LoadReading, when: str) -> str:
    one = reading.averages[0] if reading.averages else float("nan")
    own = f" ({reading.others:.2f} after discounting this run's {_threads(reading.own_threads)})" \
        if reading.own_threads else ""
    return (f"{out}: the 1-minute load average {when} is {one:.2f}{own} on {reading.cpus} CPUs, "
            f"over the quiet-machine threshold {reading.threshold:.2f} ({LOAD_PER_CPU:g} per CPU); "
            "benchmarks/results/ takes numbers from an idle machine only")


@dataclass(frozen=True)
class QuietGuard:
    """The load check of one run: ``begin`` before any work, ``finish`` before writing the reports."""

    allow_busy: bool
    threads: int  # threads the run keeps busy: discounted from the load at the end
    start: LoadReading

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(f"QuietGuard: threads={self.threads!r} must be an integer >= 0")
        if not isinstance(self.allow_busy, bool):
            raise ConfigError(f"QuietGuard: allow_busy={self.allow_busy!r} must be True or False")

    @classmethod
    def begin(cls, out: Path | str, *, allow_busy: bool, threads: int) -> QuietGuard:
        """Read the load now; refuse a busy start (BusyMachineError) when ``out`` is committed results."""
        start = read_load()
        if start.busy and not allow_busy and is_committed_results(out):
            raise BusyMachineError(
                _busy_message(Path(out), start, "before the run"),
                hint=f"wait for an idle machine (watch `uptime`), or pass {ALLOW_BUSY_FLAG} to write anyway with a "
                     "'measured on a busy machine' stamp; writing the reports outside benchmarks/results/ is never refused")
        return cls(allow_busy=allow_busy, threads=threads, start=start)

    def finish(self, out: Path | str) -> QuietVerdict:
        """Read the load again and decide where the reports go: ``out``, or a temporary folder when the
        machine turned busy during a run into committed results without ``--allow-busy``."""
        out = Path(out)
        end = read_load(own_threads=self.threads)
        committed = is_committed_results(out)
        diverted = end.busy and committed and not self.allow_busy
        write_to = Path(tempfile.mkdtemp(prefix=f"deploykit-busy-{out.name}-")) if diverted else out
        return QuietVerdict(requested=out, write_to=write_to, start=self.start, end=end,
                            allow_busy=self.allow_busy, committed=committed)


@dataclass(frozen=True)
class QuietVerdict:
    """How quiet a finished run was, where its reports go, and the stamp they carry."""

    requested: Path  # the output folder asked for
    write_to: Path  # where the reports go: ``requested``, or a temporary folder (diverted)
    start: LoadReading
    end: LoadReading
    allow_busy: bool
    committed: bool  # ``requested`` lies in benchmarks/results/

    @property
    def diverted(self) -> bool:
        return self.write_to != self.requested

    @property
    def busy(self) -> bool:
        return self.start.busy or self.end.busy

    def stamp(self) -> dict[str, Any]:
        """The ``quiet`` block of a results JSON (``load_lines`` renders it)."""
        return {
            "measured_on_busy_machine": self.busy,
            "busy_at_start": self.start.busy, "busy_at_end": self.end.busy,
            "allow_busy": self.allow_busy,
            "committed_results": self.committed,
            "diverted_from": str(self.requested) if self.diverted else None,
            "load_average_start": None if self.start.averages is None else list(self.start.averages),
            "load_average_end": None if self.end.averages is None else list(self.end.averages),
            "own_threads_discounted_at_end": self.end.own_threads,
            "cpus": self.start.cpus,
            "threshold": self.start.threshold,
            "load_per_cpu": LOAD_PER_CPU,
        }

    def raise_if_diverted(self) -> None:
        """After the reports are written: a diverted run is an error that names where they went."""
        if self.diverted:
            raise BusyMachineError(
                f"{_busy_message(self.requested, self.end, 'at the end of the run')}; the reports were written "
                f"to {self.write_to} instead",
                hint=f"rerun on an idle machine (watch `uptime`), or pass {ALLOW_BUSY_FLAG} to keep busy-machine "
                     "numbers in benchmarks/results/ (they are stamped as such)")


def _loads(values: list[float] | None) -> str:
    return "n/a" if not values else "/".join(f"{x:.2f}" for x in values)


def load_lines(stamp: dict[str, Any] | None) -> list[str]:
    """Markdown lines for a report: the load averages always, plus a warning line on a busy machine.

    Reads the JSON stamp (not a verdict) so reports rebuilt from an old results.json render too;
    results written before the rule have no stamp and get no lines.
    """
    if not stamp:
        return []
    own = stamp.get("own_threads_discounted_at_end") or 0
    discount = f", less the run's own {_threads(own)} at the end" if own else ""
    lines = [f"Load average (1/5/15 min) on {stamp['cpus']} CPUs: {_loads(stamp.get('load_average_start'))} at the "
             f"start, {_loads(stamp.get('load_average_end'))} at the end; quiet below {stamp['threshold']:.2f} "
             f"({stamp['load_per_cpu']:g} per CPU{discount})."]
    if stamp.get("measured_on_busy_machine"):
        if stamp.get("allow_busy"):
            why = f"written with {ALLOW_BUSY_FLAG}"
        elif stamp.get("diverted_from"):
            why = f"kept out of {stamp['diverted_from']}"
        else:
            why = "written outside benchmarks/results/"
        when = " and ".join(w for w, key in (("before", "busy_at_start"), ("during", "busy_at_end")) if stamp.get(key))
        lines.append(f"> **Measured on a busy machine** ({why}): the 1-minute load average was over "
                     f"{stamp['threshold']:.2f} {when} the run (start {_loads(stamp.get('load_average_start'))}, "
                     f"end {_loads(stamp.get('load_average_end'))}). Other processes shared the cores: these "
                     "timings are not the project's reference numbers; rerun on an idle machine.")
    return lines


__all__ = ["ALLOW_BUSY_FLAG", "LOAD_PER_CPU", "BusyMachineError", "LoadReading", "QuietGuard", "QuietVerdict",
           "add_allow_busy_flag", "is_committed_results", "load_averages", "load_lines", "quiet_threshold",
           "read_load"]
