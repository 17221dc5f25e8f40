"""Peak host memory of a CPU replica load at the real widths of LLaDA2.0-mini and WeDLM-8B.

    flock /tmp/tide-heavy.lock python tests/benchmarks/bench_teacher_load_host.py \
        [--out bench_results/teacher_load_host.json] [--reference]

Each checkpoint has the real config values, key layout and vocabulary of its model (docs/models.md §12:
LLaDA2 hidden 2048, 256 experts x 512, vocabulary 157,184, first layer dense; WeDLM-8B hidden 4096,
intermediate 12,288, vocabulary 151,936) but only its first two layers (LLaDA2: the dense layer 0 and one
MoE layer; WeDLM: two layers), so that it fits a small machine; the data sections are sparse files
(reading them reads zeros). Each load runs in a fresh process: after the imports and the headers-only
plan, its resident set is the baseline (reported apart), the peak is reset (``/proc/self/clear_refs``),
the replica is loaded with ``placement=replicate`` on the CPU, and ``VmHWM - baseline`` is the peak
increase, divided by the teacher's bytes in the run dtype:

* ``load_replica`` in bf16: every tensor read straight into its parameter (no buffer);
* ``load_replica`` in fp32 (the CPU default, teacher.dtype=auto): read through the 64 MiB buffer, converted;
* with ``--reference``, ``materialize`` in bf16: the whole checkpoint, its converted copy and the model at
  once (the load before issue 14), measured in the same run.

Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "plan"))
LAYERS = 2


def worker(family: str, how: str, dtype_name: str, ckpt: str) -> dict:
    import torch

    from tide_ds.models.adapter_glue import materialize
    from tide_ds.models.teachers import get_family
    from tide_ds.teacher.load import current_rss_bytes, peak_rss_bytes, peak_rss_reset
    from tide_ds.teacher.loading import load_replica, teacher_footprint

    dtype = getattr(torch, dtype_name)
    plan = get_family(family).plan(ckpt)
    fp = teacher_footprint(plan, dtype=dtype)
    baseline = current_rss_bytes()
    peak_rss_reset()
    reset_ok = peak_rss_bytes() <= baseline + 2**20
    if how == "materialize":
        model = materialize(plan, attn_implementation="sdpa", dtype=dtype)
    else:
        model = load_replica(plan, attn_implementation="sdpa", dtype=dtype, device=torch.device("cpu"))
    peak, after = peak_rss_bytes(), current_rss_bytes()
    nonzero = sum(int(p.count_nonzero()) for p in model.parameters())  # sparse files: every weight reads as zero
    return {"family": family, "how": how, "dtype": dtype_name, "layers": LAYERS, "vocab": fp.vocab,
            "hidden": fp.hidden, "param_bytes": fp.param_bytes, "stored_bytes": fp.stored_bytes,
            "baseline_rss": baseline, "peak_reset_ok": reset_ok, "peak_increase": peak - baseline,
            "kept_increase": after - baseline, "nonzero_params": nonzero}


def build(root: Path) -> dict[str, Path]:
    from real_size_world import (
        LLADA2_CONFIG,
        WEDLM_CONFIG,
        llada2_shapes,
        qwen3_shapes,
        write_checkpoint,
        write_mask_token,
    )

    llada2 = {**LLADA2_CONFIG, "num_hidden_layers": LAYERS}
    wedlm = {**WEDLM_CONFIG, "num_hidden_layers": LAYERS, "max_window_layers": LAYERS, "mask_token_id": 151665}
    out = {"llada2_moe": write_checkpoint(root / "llada2", llada2, llada2_shapes(llada2), shards=2),
           "wedlm": write_checkpoint(root / "wedlm", wedlm, qwen3_shapes(wedlm))}
    write_mask_token(out["llada2_moe"], 156895)
    return out


def run_case(family: str, how: str, dtype: str, ckpt: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", family, how, dtype, str(ckpt)], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{family} {how} {dtype} failed:\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["ratio"] = r["peak_increase"] / r["param_bytes"]
    return r


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "teacher_load_host.json"))
    parser.add_argument("--reference", action="store_true", help="also measure the whole-checkpoint load (bf16)")
    parser.add_argument("--worker", nargs=4)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    cases = [("load_replica", "bfloat16"), ("load_replica", "float32")]
    if args.reference:
        cases.append(("materialize", "bfloat16"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, ckpt in build(Path(tmp)).items():
            rows += [run_case(family, how, dtype, ckpt) for how, dtype in cases]
    mib = 2**20
    print_table(rows, [("family", 11, lambda r: r["family"]), ("load", 13, lambda r: r["how"]),
                       ("dtype", 9, lambda r: r["dtype"]), ("teacher MiB", 11, lambda r: f"{r['param_bytes'] / mib:.0f}"),
                       ("baseline MiB", 12, lambda r: f"{r['baseline_rss'] / mib:.0f}"),
                       ("peak +MiB", 9, lambda r: f"{r['peak_increase'] / mib:.0f}"),
                       ("kept +MiB", 9, lambda r: f"{r['kept_increase'] / mib:.0f}"),
                       ("ratio", 6, lambda r: f"{r['ratio']:.3f}")])
    write_record(args.out, rows, measure="VmHWM - VmRSS after imports and plan, fresh process per row")


def print_table(rows: list[dict], columns: list[tuple[str, int, Callable[[dict], str]]]) -> None:
    """One fixed-width line per row: ``columns`` are (header, width, cell)."""
    print(" ".join(f"{h:>{w}}" for h, w, _ in columns))
    for r in rows:
        print(" ".join(f"{cell(r):>{w}}" for _, w, cell in columns))


def write_record(out: str, rows: list[dict], **extra: str) -> None:
    """The benchmark's JSON: date, commit, torch, machine, ``extra`` and the rows."""
    import datetime
    import platform

    import torch

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    record = {"date": datetime.date.today().isoformat(), "git": sha, "torch": torch.__version__,
              "machine": platform.machine(), **extra, "rows": rows}
    Path(out).write_text(json.dumps(record, indent=1) + "\n")

if __name__ == "__main__":
    main()
