"""The per-ISA line at the end of a test run (tests/conftest.py: IsaTally) counts what really ran."""
from __future__ import annotations

from types import SimpleNamespace

from conftest import IsaTally


def _report(nodeid: str, when: str, outcome: str) -> SimpleNamespace:
    return SimpleNamespace(nodeid=nodeid, when=when, failed=outcome == "failed", skipped=outcome == "skipped")


def test_isa_tally_counts_passed_skipped_failed_per_variant():
    tally = IsaTally()
    items = [SimpleNamespace(nodeid=f"t.py::k[{isa}-{i}]", callspec=SimpleNamespace(params={"isa": isa, "M": i}))
             for isa in ("scalar", "avx2", "avx512vnni") for i in range(3)]
    items.append(SimpleNamespace(nodeid="t.py::plain"))  # not parametrized by isa: not counted
    tally.pytest_collection_modifyitems(items)
    for i in range(3):
        for phase in ("setup", "call", "teardown"):
            tally.pytest_runtest_logreport(_report(f"t.py::k[scalar-{i}]", phase, "passed"))
        tally.pytest_runtest_logreport(_report(f"t.py::k[avx512vnni-{i}]", "setup", "skipped"))
        tally.pytest_runtest_logreport(_report(f"t.py::k[avx512vnni-{i}]", "teardown", "passed"))
    tally.pytest_runtest_logreport(_report("t.py::k[avx2-0]", "call", "passed"))
    tally.pytest_runtest_logreport(_report("t.py::k[avx2-0]", "teardown", "failed"))  # a teardown error counts
    tally.pytest_runtest_logreport(_report("t.py::k[avx2-1]", "call", "failed"))
    tally.pytest_runtest_logreport(_report("t.py::k[avx2-1]", "teardown", "passed"))  # ...and stays a failure
    tally.pytest_runtest_logreport(_report("t.py::plain", "call", "passed"))
    lines: list[str] = []  # avx2-2 never ran (deselected): not counted
    tally.pytest_terminal_summary(SimpleNamespace(write_line=lines.append))
    (line,) = lines
    assert line.startswith("native ISA variants: scalar 3 passed, avx2 0 passed (2 failed), "
                           "avx512vnni 0 passed (3 skipped) (CPU: "), line
    assert "selected " in line


def test_isa_tally_is_silent_without_isa_tests():
    tally = IsaTally()
    tally.pytest_collection_modifyitems([SimpleNamespace(nodeid="t.py::plain")])
    lines: list[str] = []
    tally.pytest_terminal_summary(SimpleNamespace(write_line=lines.append))
    assert lines == []
