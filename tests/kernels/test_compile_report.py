"""The sm_90 compile report of every Triton kernel (tests/kernels/compile_report.py, no GPU needed).

* The committed table (bench_results/triton_compile_report.json) must cover exactly the autotune configs the
  kernels declare, and every config in it must be free of register spills and fit one block's shared memory
  on an H100/H200 (227 KiB). Changing a config list without regenerating the table fails here.
* The slow test recompiles every config and checks the same, in a fresh interpreter without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels.compile_report import SMEM_LIMIT, config_label, kernel_specs

REPO = Path(__file__).resolve().parents[2]
REPORT = REPO / "bench_results" / "triton_compile_report.json"


def test_committed_report_covers_every_config_without_spills() -> None:
    data = json.loads(REPORT.read_text())
    recorded = {(c["kernel"], c["variant"], c["config"]): c for c in data["configs"]}
    declared = {(name, variant, config_label(config))
                for name, variant, _, configs, *_ in kernel_specs() for config in configs}
    assert set(recorded) == declared, (
        "the compile report is stale: regenerate it with `python -m tests.kernels.compile_report` (interpreter off); "
        f"missing {sorted(declared - set(recorded))}, extra {sorted(set(recorded) - declared)}"
    )
    bad = [key for key, c in recorded.items()
           if c["spill_stores"] or c["spill_loads"] or c["shared_bytes"] > SMEM_LIMIT]
    assert not bad, f"configs that spill or exceed {SMEM_LIMIT} B of shared memory: {bad}"
    kernels = {row["kernel"] for row in data["roofline_h200"]["kernels"]}
    assert {"fused_head.grad", "fused_divergence.stats", "fused_divergence.grad"} <= kernels


@pytest.mark.slow
def test_every_config_compiles_for_sm90_without_spills(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.compile_report", "--out-dir", str(tmp_path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1800, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
