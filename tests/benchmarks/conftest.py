"""The ``bench_recorder`` fixture of every ``test_bench_<op>.py`` (CONTRIBUTING.md §5; machinery in ``harness.py``).

Benchmarks add rows to the session's :class:`~tests.benchmarks.harness.BenchRecorder`; each row rewrites
``$TIDE_BENCH_DIR/<op>.json`` (default ``bench_results/``), and at the end pytest prints one fixed-width
table of the session.
"""

from __future__ import annotations

import pytest

from tests.benchmarks.harness import BenchRecorder, bench_dir

_TABLE_KEY = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def bench_recorder(request: pytest.FixtureRequest):
    """The session's recorder; on teardown hands the table to the terminal summary."""
    recorder = BenchRecorder(bench_dir())
    yield recorder
    if recorder.rows:
        written = "\n".join(f"wrote {recorder.directory / op}.json" for op in sorted({r.op for r in recorder.rows}))
        request.config.stash[_TABLE_KEY] = f"{recorder.table()}\n{written}"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    table = config.stash.get(_TABLE_KEY, None)
    if table:
        terminalreporter.section("benchmarks")
        terminalreporter.write_line(table)
