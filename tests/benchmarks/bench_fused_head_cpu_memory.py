"""CPU benchmark: peak memory of the student loss, the authors' path against our row-tiled (chunked) path.

    python tests/benchmarks/bench_fused_head_cpu_memory.py [--points 1x256 2x256] [--out bench_results/...]

The loss is CE + Reverse CALM of pipeline A (``tests/benchmarks/loss_paths.py``) at the Qwen3-0.6B head,
V = 151,936, D = 1,024, forward and backward, in float32 (what the trainer runs on a CPU). N is reduced
from the paper's 8 x 512 to what a shared 2-core machine holds: B x L = 1 x 256 and 2 x 256 by default
(the authors' path computes logits for 2 x B x L rows, both halves).

* ``authors``: full float32 logits of both halves, cross_entropy, gather - logsumexp, a dense alignment
  ``bmm``, clipped probabilities, autograd;
* ``chunked``: :func:`tide_ds.losses.fused_head.fused_head_loss` with ``implementation="pytorch"``, the
  path of ``--model.loss_implementation=auto`` on a CPU (on the CPU it visits only the masked rows).

How memory is measured, and why: each (provider, shape) runs in a fresh subprocess. After building its
inputs and a small warm-up (library initialisation), the worker resets the kernel's peak resident set size
(``/proc/self/clear_refs`` = 5) and reads the current RSS, runs one forward+backward, and reports the peak
RSS (``VmHWM``) minus that baseline. This sees every byte the process touches, ATen's allocations included;
``tracemalloc`` would not (it traces only Python's own allocator, while ATen allocates through c10's CPU
allocator), and the profiler's memory events need a reconstruction of the live set and add overhead. One
process per measurement keeps freed-but-cached memory of one path out of the other's number.

Reported: peak extra RSS, and the "working" memory (peak minus the gradients both paths must return,
dh ``[B, 2L, D]`` and dW ``[V, D]`` in float32), each with the chunked/authors ratio. Both paths are
checked to give the same loss. Writes ``$TIDE_BENCH_DIR/fused_head_cpu_memory.json`` (default bench_results/).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VOCAB, HIDDEN = 151_936, 1_024
PROVIDERS = ("authors", "chunked")


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(provider: str, batch: int, seq_len: int) -> dict:
    """One measurement in this (fresh) process; returns the numbers as a dict."""
    import torch

    from tests.benchmarks.loss_paths import (
        authors_student_loss,
        fused_student_loss,
        student_problem,
    )

    # Warm-up at a tiny size: allocator, BLAS and autograd initialisation stay out of the measurement.
    tiny = student_problem(batch=1, seq_len=16, hidden=HIDDEN, vocab=4096, dtype=torch.float32, device="cpu", seed=1)
    (authors_student_loss(tiny) if provider == "authors" else fused_student_loss(tiny, implementation="pytorch")).backward()
    del tiny
    p = student_problem(batch=batch, seq_len=seq_len, hidden=HIDDEN, vocab=VOCAB, dtype=torch.float32, device="cpu")
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss("VmRSS")
    start = time.perf_counter()
    loss = authors_student_loss(p) if provider == "authors" else fused_student_loss(p, implementation="pytorch")
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _rss("VmHWM") - base
    grads = p.hidden_B2LD.grad.numel() * 4 + p.weight_VD.grad.numel() * 4
    return {
        "provider": provider, "batch": batch, "seq_len": seq_len, "rows_xt": batch * seq_len,
        "masked_rows": int(p.masked_BL.sum()), "vocab": VOCAB, "hidden": HIDDEN, "dtype": "float32",
        "peak_extra_mib": peak / 2**20, "gradients_mib": grads / 2**20, "working_mib": (peak - grads) / 2**20,
        "seconds": seconds, "loss": loss.item(), "torch_threads": torch.get_num_threads(),
    }


def _environment() -> dict:
    import torch
    import triton

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "tide_ds/losses", "tests/benchmarks"],
                           cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "git_sha": sha,
        "git_dirty_paths": dirty.splitlines(), "machine": platform.node(), "cpu": cpu, "cpus": os.cpu_count(),
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
    }


def _measure(provider: str, batch: int, seq_len: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", provider, "--points", f"{batch}x{seq_len}"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {provider} {batch}x{seq_len} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", nargs="+", default=["1x256", "2x256"], help="B x L shapes (x_t half)")
    parser.add_argument("--out", default=None, help="JSON path (default $TIDE_BENCH_DIR/fused_head_cpu_memory.json)")
    parser.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    points = [tuple(int(x) for x in p.split("x")) for p in args.points]
    if args.worker:
        (batch, seq_len), = points
        print(json.dumps(worker(args.worker, batch, seq_len)))
        return
    rows = [_measure(provider, b, l) for b, l in points for provider in PROVIDERS]
    results = {"benchmark": "fused_head_cpu_memory", "environment": _environment(), "method": (
        "fresh subprocess per measurement; peak RSS (VmHWM after clear_refs=5) minus RSS after the inputs are "
        "built; one forward+backward of CE + Reverse CALM (T=5), float32"), "rows": rows, "ratios": []}
    for b, l in points:
        a, c = (next(r for r in rows if r["provider"] == name and (r["batch"], r["seq_len"]) == (b, l))
                for name in PROVIDERS)
        rel = abs(c["loss"] - a["loss"]) / abs(a["loss"])
        if rel > 1e-4:
            raise SystemExit(f"{b}x{l}: the two paths disagree: authors {a['loss']} vs chunked {c['loss']}")
        results["ratios"].append({"batch": b, "seq_len": l, "peak_ratio": c["peak_extra_mib"] / a["peak_extra_mib"],
                                  "working_ratio": c["working_mib"] / a["working_mib"], "loss_rel_diff": rel})
    _print(results)
    out = Path(args.out) if args.out else Path(os.environ.get("TIDE_BENCH_DIR", REPO / "bench_results")) / "fused_head_cpu_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".tmp")
    staging.write_text(json.dumps(results, indent=2) + "\n")
    staging.replace(out)
    print(f"wrote {out}")


def _print(results: dict) -> None:
    env = results["environment"]
    print(f"\nstudent loss CE + Reverse CALM, fwd+bwd, V={VOCAB:,} D={HIDDEN:,} float32; {env['cpu']} x{env['cpus']}, "
          f"torch {env['torch']}, git {env['git_sha'][:10]}")
    print(f"{'B x L':<8}{'provider':<10}{'rows':>6}{'masked':>8}{'peak MiB':>10}{'grads MiB':>11}{'working MiB':>13}"
          f"{'seconds':>9}{'loss':>10}")
    for r in results["rows"]:
        print(f"{r['batch']}x{r['seq_len']:<6}{r['provider']:<10}{r['rows_xt']:>6}{r['masked_rows']:>8}"
              f"{r['peak_extra_mib']:>10.0f}{r['gradients_mib']:>11.0f}{r['working_mib']:>13.0f}{r['seconds']:>9.1f}"
              f"{r['loss']:>10.4f}")
    for r in results["ratios"]:
        print(f"{r['batch']}x{r['seq_len']}: chunked / authors peak {r['peak_ratio']:.3f} (1/{1 / r['peak_ratio']:.1f}), "
              f"working memory {r['working_ratio']:.3f} (1/{1 / r['working_ratio']:.1f})")


if __name__ == "__main__":
    main()
