"""Benchmark bookkeeping shared by every ``test_bench_<op>.py`` (CONTRIBUTING.md §5).

* :class:`BenchRecorder` collects rows (median/p20/p80 ms, peak MiB, TFLOP/s, speed-ups against each op's
  baselines) and rewrites ``$TIDE_BENCH_DIR/<op>.json`` after every row (atomically), so a run cut short by
  a timeout keeps what it measured. The JSON holds the environment: GPU, torch/triton/CUDA versions, git
  sha (and whether the benchmarked paths had uncommitted changes), date.
* :func:`time_ms` and :func:`peak_mib` time and measure one call.
* ``python -m tests.benchmarks.harness [DIR]`` prints one table of every ``<op>.json`` in DIR, and the
  issue's targets with the measured ratios (used by ``run_gpu_checks.sh``).

Dry run: ``TIDE_BENCH_DRY_RUN=1`` runs the benchmarks on the CPU with tiny shapes (Triton in its
interpreter, a wall-clock timer, no memory numbers, GPU-only providers skipped) to check their logic
on a machine without a GPU; results go to ``$TIDE_BENCH_DIR`` or, by default, a temporary directory,
never into ``bench_results/``.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest
import torch
import triton

REPO = Path(__file__).resolve().parents[2]
DRY_RUN = os.environ.get("TIDE_BENCH_DRY_RUN", "0") not in ("", "0")

#: Marks of every benchmark module: opt-in (``-m bench``), and a GPU unless dry-running.
BENCH_MARKS = [
    pytest.mark.bench,
    pytest.mark.skipif(not torch.cuda.is_available() and not DRY_RUN,
                       reason="benchmarks need a CUDA GPU (TIDE_BENCH_DRY_RUN=1 checks their logic on the CPU)"),
]


def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def bench_dir() -> Path:
    default = Path(tempfile.gettempdir()) / "tide_bench_dry_run" if DRY_RUN else REPO / "bench_results"
    return Path(os.environ.get("TIDE_BENCH_DIR", default))


def time_ms(fn: Callable[[], object], *, grad_to_none: list[torch.Tensor] | None = None) -> tuple[float, float, float]:
    """(p50, p20, p80) milliseconds of ``fn()``: ``triton.testing.do_bench`` on a GPU, 3 wall-clock runs on the CPU."""
    if torch.cuda.is_available():
        return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8]))
    times = []
    for _ in range(3):
        for x in grad_to_none or []:
            x.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return statistics.median(times), times[0], times[-1]


def peak_mib(fn: Callable[[], object], inputs: tuple[torch.Tensor, ...]) -> float | None:
    """Allocator peak during one ``fn()`` above what was allocated before it (inputs excluded); None on the CPU."""
    if not torch.cuda.is_available():
        return None
    for x in inputs:
        x.grad = None  # as in the timed calls: backward allocates the gradients
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


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
    peak_mib: float | None
    tflops: float | None = None
    gbps: float | None = None
    speedups: dict[str, float] = field(default_factory=dict)
    memory_ratios: dict[str, float] = field(default_factory=dict)


class BenchRecorder:
    """Collects :class:`BenchRow` s; speed-ups are p50 ratios (and memory ratios peak ratios) against each
    op's baseline providers, same mode and shape. Rewrites the op's JSON after every row."""

    def __init__(self, directory: Path | None = None) -> None:
        self.rows: list[BenchRow] = []
        self.baselines: dict[str, tuple[str, ...]] = {}
        self.directory = directory
        self.environment: dict[str, object] = {}

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
        peak_mib: float | None,
        tflops: float | None = None,
        gbps: float | None = None,
    ) -> BenchRow:
        row = BenchRow(op, mode, shape, provider, *ms, peak_mib=peak_mib, tflops=tflops, gbps=gbps)
        self.rows.append(row)
        if self.directory is not None:
            self.write_json(self.directory, ops=(op,))
        return row

    def _fill_ratios(self) -> None:
        by_key = {(r.op, r.mode, r.shape, r.provider): r for r in self.rows}
        for r in self.rows:
            for base in self.baselines.get(r.op, ()):
                ref = by_key.get((r.op, r.mode, r.shape, base))
                if ref is None or base == r.provider:
                    continue
                r.speedups[base] = ref.ms_p50 / r.ms_p50
                if r.peak_mib is not None and ref.peak_mib:
                    r.memory_ratios[base] = r.peak_mib / ref.peak_mib

    def table(self) -> str:
        self._fill_ratios()
        head = (f"{'op':<17} {'mode':<8} {'shape':<30} {'provider':<17} {'p50 ms':>9} {'p20 ms':>9} {'p80 ms':>9} "
                f"{'TFLOP/s':>8} {'peak MiB':>9}  speed-up (memory) vs baselines")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            fmt = lambda x, spec: format(x, spec) if x is not None else "-"
            speed = ", ".join(
                f"{v:.2f}x" + (f" ({r.memory_ratios[k]:.3f} mem)" if k in r.memory_ratios else "") + f" vs {k}"
                for k, v in r.speedups.items()
            )
            lines.append(
                f"{r.op:<17} {r.mode:<8} {r.shape:<30} {r.provider:<17} {r.ms_p50:>9.3f} {r.ms_p20:>9.3f} "
                f"{r.ms_p80:>9.3f} {fmt(r.tflops, '.1f'):>8} {fmt(r.peak_mib, '.1f'):>9}  {speed}"
            )
        return "\n".join(lines)

    def write_json(self, directory: Path, *, ops: tuple[str, ...] | None = None) -> list[Path]:
        self._fill_ratios()
        directory.mkdir(parents=True, exist_ok=True)
        env = environment()
        paths = []
        for op in ops or sorted({r.op for r in self.rows}):
            path = directory / f"{op}.json"
            rows = [asdict(r) for r in self.rows if r.op == op]
            staging = path.with_name(path.name + ".tmp")
            staging.write_text(json.dumps({"op": op, "environment": env, "baselines": list(self.baselines.get(op, ())),
                                           "rows": rows}, indent=2) + "\n")
            staging.replace(path)
            paths.append(path)
        return paths

    @classmethod
    def from_json(cls, directory: Path) -> BenchRecorder:
        """Every ``<op>.json`` of a benchmark directory (files without kernel-benchmark rows are skipped)."""
        recorder = cls()
        fields = set(BenchRow.__dataclass_fields__)
        for path in sorted(directory.glob("*.json")):
            data = json.loads(path.read_text())
            # Other benchmarks (preprocessing, teacher memory, deployment) write their own formats: skip them.
            if not isinstance(data, dict) or "op" not in data or not isinstance(data.get("rows"), list):
                continue
            if not all(isinstance(row, dict) and {"op", "mode", "shape", "provider"} <= set(row) <= fields
                       for row in data["rows"]):
                continue
            recorder.baselines[data["op"]] = tuple(data.get("baselines", ()))
            recorder.environment = data.get("environment", {})
            for row in data["rows"]:
                row = {k: v for k, v in row.items() if k not in ("speedups", "memory_ratios")}
                recorder.rows.append(BenchRow(**row))
        return recorder


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=REPO)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict[str, object]:
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "dry_run_on_cpu": DRY_RUN and not torch.cuda.is_available(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty_paths": _git("status", "--porcelain", "--", "kernels", "tide_ds", "tests/benchmarks").splitlines(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


# The issue's targets (#6, item 6): (description, op, mode, shape or None for any, provider, baseline, kind, bound).
TARGETS = [
    ("fused loss fwd+bwd >= 2.5x faster than the authors' path", "student_loss", "fwd+bwd", None, "triton", "authors",
     "speedup", 2.5),
    ("fused loss peak memory <= 1/20 of the authors' path", "student_loss", "fwd+bwd", None, "triton", "authors",
     "memory", 1 / 20),
    ("attention fwd+bwd >= FlexAttention (aim 1.2x)", "bd3lm_attention", "fwd+bwd", None, "triton", "flex",
     "speedup", 1.0),
    ("attention fwd+bwd >= 2.5x SDPA dense mask at L=1024", "bd3lm_attention", "fwd+bwd", "-L1024-", "triton", "sdpa",
     "speedup", 2.5),
    # Issue 17: against the libraries users would pick instead; the best peer sets the bar (>= each, no more memory).
    ("CE fwd+bwd >= Liger fused linear CE", "student_ce", "fwd+bwd", None, "triton", "liger_flce", "speedup", 1.0),
    ("CE peak memory <= Liger fused linear CE", "student_ce", "fwd+bwd", None, "triton", "liger_flce", "memory", 1.0),
    ("CE fwd+bwd >= Cut Cross-Entropy", "student_ce", "fwd+bwd", None, "triton", "cce", "speedup", 1.0),
    ("CE peak memory <= Cut Cross-Entropy", "student_ce", "fwd+bwd", None, "triton", "cce", "memory", 1.0),
    ("token divergences fwd+bwd >= Liger fused linear JSD", "token_divergence", "fwd+bwd", None, "triton", "liger_jsd",
     "speedup", 1.0),
    ("token divergences peak memory <= Liger fused linear JSD", "token_divergence", "fwd+bwd", None, "triton",
     "liger_jsd", "memory", 1.0),
]


def targets_report(recorder: BenchRecorder) -> str:
    recorder._fill_ratios()
    lines = ["targets (issues #6, #17):"]
    for text, op, mode, shape, provider, base, kind, bound in TARGETS:
        rows = [r for r in recorder.rows if r.op == op and r.mode == mode and r.provider == provider
                and (shape is None or shape in f"-{r.shape}-")]
        values = [(r.shape, (r.speedups if kind == "speedup" else r.memory_ratios).get(base)) for r in rows]
        values = [(s, v) for s, v in values if v is not None]
        if not values:
            lines.append(f"  [ n/a ] {text}: not measured")
            continue
        ok = all(v >= bound if kind == "speedup" else v <= bound for _, v in values)
        measured = ", ".join(f"{s}: {v:.3g}" for s, v in values)
        lines.append(f"  [{'pass' if ok else 'FAIL':^5}] {text}: {measured}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    directory = Path(argv[0]) if argv else bench_dir()
    recorder = BenchRecorder.from_json(directory)
    if not recorder.rows:
        raise SystemExit(f"no benchmark results in {directory}")
    env = recorder.environment
    print(f"GPU {env.get('gpu')} | torch {env.get('torch')} | triton {env.get('triton')} | CUDA {env.get('cuda')} | "
          f"git {str(env.get('git_sha'))[:10]} | {env.get('date')}")
    print(recorder.table())
    if env.get("dry_run_on_cpu"):
        print("dry run on the CPU (tiny shapes, Triton's interpreter): the timings check the logic, not the speed")
    print(targets_report(recorder))


if __name__ == "__main__":
    main(sys.argv[1:])
