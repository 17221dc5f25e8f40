"""Peak host memory of a CPU replica load at the real layer widths of LLaDA2.0-mini and WeDLM-8B.

    flock /tmp/tide-heavy.lock python tests/benchmarks/bench_teacher_load_host.py \
        [--out bench_results/teacher_load_host.json]

Each checkpoint has the real widths and key layout of its model (docs/models.md §12) but only the first
layers (LLaDA2: the dense layer 0 and one MoE layer of 256 experts; WeDLM: one layer) and a 16,384-row
vocabulary, so that it fits a small machine; its data sections are sparse files (zeros). Each load runs in
a fresh process, which reports its peak resident set increase (``VmHWM`` after a reset) against the
teacher's bytes in the run dtype (bf16):

* ``materialize``: the whole-checkpoint path (checkpoint + converted copy + model at once);
* ``load_replica``: group by group (``tide_ds.teacher.loading``).

The whole-checkpoint peak scales with the model, so its ratio holds at full size; the group-by-group
overhead above the replica is bounded by one group read plus its converted copy, so the full-size ratio
is extrapolated as ``(full teacher bytes + measured overhead) / full teacher bytes`` and reported next to
the overhead in units of the largest layer. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "plan"))
VOCAB = 16384
#: Full-size bf16 parameter bytes (routers of LLaDA2 in fp32), from tests/plan/test_plan.py's real-size checks.
FULL_BYTES = {"llada2_moe": 2 * 16_255_638_528 + 2 * 19 * 256 * 2048, "wedlm": 2 * 8_190_735_360}


def worker(family: str, how: str, ckpt: str) -> dict:
    import torch

    from tide_ds.models.adapter_glue import materialize
    from tide_ds.models.teachers import get_family
    from tide_ds.teacher.load import current_rss_bytes, peak_rss_bytes, peak_rss_reset
    from tide_ds.teacher.loading import load_replica, teacher_footprint

    plan = get_family(family).plan(ckpt)
    fp = teacher_footprint(plan, dtype=torch.bfloat16)
    peak_rss_reset()
    before = current_rss_bytes()
    if how == "materialize":
        model = materialize(plan, attn_implementation="sdpa", dtype=torch.bfloat16)
    else:
        model = load_replica(plan, attn_implementation="sdpa", dtype=torch.bfloat16, device=torch.device("cpu"))
    peak = peak_rss_bytes() - before
    del model
    return {"family": family, "how": how, "param_bytes": fp.param_bytes, "largest_layer_bytes": fp.largest_layer_bytes,
            "load_buffer_bytes": fp.load_buffer_bytes, "peak_increase": peak}


def build(root: Path) -> dict[str, Path]:
    from real_size_world import (
        LLADA2_CONFIG,
        WEDLM_CONFIG,
        llada2_shapes,
        qwen3_shapes,
        write_checkpoint,
        write_mask_token,
    )

    llada2 = {**LLADA2_CONFIG, "num_hidden_layers": 2, "vocab_size": VOCAB, "pad_token_id": 0, "eos_token_id": 0}
    wedlm = {**WEDLM_CONFIG, "num_hidden_layers": 1, "vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 0,
             "pad_token_id": 0, "mask_token_id": 1}
    out = {"llada2_moe": write_checkpoint(root / "llada2", llada2, llada2_shapes(llada2), shards=2),
           "wedlm": write_checkpoint(root / "wedlm", wedlm, qwen3_shapes(wedlm))}
    write_mask_token(out["llada2_moe"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "teacher_load_host.json"))
    parser.add_argument("--worker", nargs=3)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, ckpt in build(Path(tmp)).items():
            for how in ("materialize", "load_replica"):
                proc = subprocess.run([sys.executable, __file__, "--worker", family, how, str(ckpt)], check=True,
                                      capture_output=True, text=True, cwd=ROOT)
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                over = r["peak_increase"] - r["param_bytes"]
                r["ratio"] = r["peak_increase"] / r["param_bytes"]
                r["overhead_in_layers"] = over / r["largest_layer_bytes"]
                full = FULL_BYTES[family]
                r["full_size_ratio"] = r["ratio"] if how == "materialize" else (full + over) / full
                rows.append(r)
    mib = 2**20
    print(f"{'family':<11} {'load':<13} {'teacher MiB':>11} {'peak MiB':>9} {'ratio':>6} {'over/layer':>10} "
          f"{'full-size ratio':>15}")
    for r in rows:
        print(f"{r['family']:<11} {r['how']:<13} {r['param_bytes'] / mib:>11.0f} {r['peak_increase'] / mib:>9.0f} "
              f"{r['ratio']:>6.2f} {r['overhead_in_layers']:>10.2f} {r['full_size_ratio']:>15.3f}")
    import datetime
    import platform

    import torch

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    record = {"date": datetime.date.today().isoformat(), "git": sha, "torch": torch.__version__,
              "machine": platform.machine(), "rows": rows}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
