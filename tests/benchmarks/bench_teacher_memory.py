"""Peak memory per rank while loading a teacher: ``replicate`` against ``zero3`` (2 ranks).

    python tests/benchmarks/bench_teacher_memory.py [--out bench_results/teacher_memory.json]

Writes a tiny-layout LLaDA2 MoE checkpoint wide enough for the difference to show (~100 MiB fp32),
loads it with each placement under ``deepspeed --num_gpus 2`` and prints, per rank, the peak memory
increase during the load (device memory on GPUs, resident set size on the CPU) against the teacher's
bytes and bytes / world size. Not a timed test; run it by hand or from the GPU script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WIDE = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_experts=32, n_group=4,
            topk_group=2, num_experts_per_tok=4, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64)


def worker(ckpt: str, placement: str, out: str) -> None:
    import deepspeed
    import torch

    from tide_ds import dist
    from tide_ds.teacher.engine import TeacherEngine

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", dist.local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    teacher = TeacherEngine.build(ckpt, family="llada2_moe", placement=placement, device=device)
    r = teacher.report
    Path(out, f"{placement}-rank{dist.rank()}.json").write_text(json.dumps(
        {"placement": placement, "rank": dist.rank(), "world": dist.world_size(), "param_bytes": r.param_bytes,
         "peak_increase": r.peak_rss_increase, "device": str(device)}))
    dist.destroy()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench_results" / "teacher_memory.json"))
    parser.add_argument("--worker", nargs=3)
    args, _ = parser.parse_known_args()
    if args.worker:
        worker(*args.worker)
        return
    from tide_ds.models.llada2_moe import write_tiny_llada2_moe_checkpoint

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_llada2_moe_checkpoint(Path(tmp) / "wide", seed=0, shard=True, **WIDE)
        env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
        for placement in ("replicate", "zero3"):
            # The launcher as a module: also where DeepSpeed was installed with --target (no script on PATH).
            subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", __file__, "--worker",
                            str(ckpt), placement, tmp], check=True, env=env, cwd=ROOT, capture_output=True)
            for rank in (0, 1):
                rows.append(json.loads(Path(tmp, f"{placement}-rank{rank}.json").read_text()))
    mib = 2**20
    print(f"{'placement':<10} {'rank':>4} {'teacher MiB':>12} {'/ world MiB':>12} {'peak load MiB':>14}")
    for r in rows:
        print(f"{r['placement']:<10} {r['rank']:>4} {r['param_bytes'] / mib:>12.1f} "
              f"{r['param_bytes'] / r['world'] / mib:>12.1f} {r['peak_increase'] / mib:>14.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
