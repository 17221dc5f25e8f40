"""Benchmark bookkeeping shared by every ``test_bench_<op>.py`` (STYLE.md §5).

Benchmarks add rows to the session's :class:`BenchRecorder` (fixture ``bench_recorder``); at the end of
the session it writes ``$TIDE_BENCH_DIR/<op>.json`` (default ``bench_results/``) per op, with the
environment (GPU, torch/triton/CUDA versions, git sha, date), and pytest prints one fixed-width table.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch
import triton

_TABLE_KEY = pytest.StashKey[str]()


@dataclass
class BenchRow:
    """One timing: milliseconds at quantiles 0.5/0.2/0.8, peak extra memory, optional throughput."""

    op: str
    mode: str
    shape: str
    provider: str
    ms_p50: float
    ms_p20: float
    ms_p80: float
    peak_mib: float
    tflops: float | None = None
    gbps: float | None = None
    speedups: dict[str, float] = field(default_factory=dict)


class BenchRecorder:
    """Collects :class:`BenchRow` s; speed-ups are p50 ratios against each op's baseline providers."""

    def __init__(self) -> None:
        self.rows: list[BenchRow] = []
        self.baselines: dict[str, tuple[str, ...]] = {}

    def set_baselines(self, op: str, providers: tuple[str, ...]) -> None:
        """Report every row of ``op`` as a speed-up over each of ``providers`` (same mode and shape)."""
        self.baselines[op] = providers

    def add(
        self,
        *,
        op: str,
        mode: str,
        shape: str,
        provider: str,
        ms: tuple[float, float, float],
        peak_mib: float,
        tflops: float | None = None,
        gbps: float | None = None,
    ) -> BenchRow:
        row = BenchRow(op, mode, shape, provider, *ms, peak_mib=peak_mib, tflops=tflops, gbps=gbps)
        self.rows.append(row)
        return row

    def _fill_speedups(self) -> None:
        p50 = {(r.op, r.mode, r.shape, r.provider): r.ms_p50 for r in self.rows}
        for r in self.rows:
            for base in self.baselines.get(r.op, ()):
                ref = p50.get((r.op, r.mode, r.shape, base))
                if ref is not None and base != r.provider:
                    r.speedups[base] = ref / r.ms_p50

    def table(self) -> str:
        self._fill_speedups()
        head = f"{'op':<16} {'mode':<8} {'shape':<30} {'provider':<9} {'p50 ms':>9} {'p20 ms':>9} {'p80 ms':>9} " \
               f"{'TFLOP/s':>8} {'GB/s':>7} {'peak MiB':>9}  speed-up"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            fmt = lambda x, spec: format(x, spec) if x is not None else "-"
            speed = ", ".join(f"{v:.2f}x vs {k}" for k, v in r.speedups.items())
            lines.append(
                f"{r.op:<16} {r.mode:<8} {r.shape:<30} {r.provider:<9} {r.ms_p50:>9.3f} {r.ms_p20:>9.3f} {r.ms_p80:>9.3f} "
                f"{fmt(r.tflops, '.1f'):>8} {fmt(r.gbps, '.0f'):>7} {r.peak_mib:>9.1f}  {speed}"
            )
        return "\n".join(lines)

    def write_json(self, directory: Path) -> list[Path]:
        self._fill_speedups()
        directory.mkdir(parents=True, exist_ok=True)
        env = _environment()
        paths = []
        for op in sorted({r.op for r in self.rows}):
            path = directory / f"{op}.json"
            rows = [asdict(r) for r in self.rows if r.op == op]
            path.write_text(json.dumps({"op": op, "environment": env, "rows": rows}, indent=2) + "\n")
            paths.append(path)
        return paths


def _git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _environment() -> dict[str, str | None]:
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_sha": _git_sha(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


@pytest.fixture(scope="session")
def bench_recorder(request: pytest.FixtureRequest):
    """The session's recorder; on teardown writes the JSON files and hands the table to the summary."""
    recorder = BenchRecorder()
    yield recorder
    if recorder.rows:
        paths = recorder.write_json(Path(os.environ.get("TIDE_BENCH_DIR", "bench_results")))
        written = "\n".join(f"wrote {p}" for p in paths)
        request.config.stash[_TABLE_KEY] = f"{recorder.table()}\n{written}"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    table = config.stash.get(_TABLE_KEY, None)
    if table:
        terminalreporter.section("benchmarks")
        terminalreporter.write_line(table)
