"""CPU benchmark: working memory of pipeline B's token terms, today's path against the fused op.

    python tests/benchmarks/bench_token_divergence_cpu_memory.py [--rows 2048] [--out bench_results/...]

Shape: the paper's pipeline-B shape scaled to this machine: N = 2,048 rows (all selected), V' = 151,646
(the shared Qwen prefix), student head V = 151,936 x D_s = 1,024 (Qwen3-0.6B), teacher head
V_t = 151,936 x D_t = 4,096 (WeDLM-8B), float32 (what the trainer runs on a CPU). Terms: TIDAL (weight 1,
lambda and omega per row) + forward KL (weight 0.5), T = 2 (the ``taid+kl`` mode). Forward and backward.

* ``today``: the teacher's row logits ``[N, V']`` in float32 (:func:`tide_ds.teacher.forward.row_logits`),
  then the LM-head-fused student divergence (:func:`tide_ds.losses.fused_divergence.fused_head_divergence`);
* ``fused``: :func:`tide_ds.losses.token_divergence.token_divergences` with ``implementation="pytorch"``
  (the tiled PyTorch path that ``--model.loss_implementation=auto`` takes on a CPU): teacher rows and head
  in, no ``[N, V']`` tensor.

Measured as in ``bench_fused_head_cpu_memory.py``: a fresh subprocess per provider; after the inputs are
built and a tiny warm-up has run, the peak RSS is reset (``/proc/self/clear_refs`` = 5) and the RSS read;
one forward+backward; peak RSS (``VmHWM``) minus that baseline. The inputs are outside the baseline;
"working" memory is that peak minus the gradients both paths must return (dh ``[N, D_s]`` and dW ``[V, D_s]``,
float32). Both paths must agree on the loss. Writes ``$TIDE_BENCH_DIR/token_divergence_cpu_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fused_head_cpu_memory import _environment, _rss  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SHARED, VOCAB, D_S, VOCAB_T, D_T = 151_646, 151_936, 1_024, 151_936, 4_096
PROVIDERS = ("today", "fused")
TEMPERATURE = 2.0


def _problem(rows: int, shared: int, vocab: int, d_s: int, vocab_t: int, d_t: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(rows, d_s, generator=g).requires_grad_()
    sw = (torch.randn(vocab, d_s, generator=g) / d_s**0.5).requires_grad_()
    th = torch.randn(rows, d_t, generator=g)
    tw = torch.randn(vocab_t, d_t, generator=g) / d_t**0.5
    lam = torch.rand(rows, generator=g)
    omega = torch.rand(rows, generator=g) + 0.5
    selected = torch.ones(rows, dtype=torch.bool)
    return sh, sw, th, tw, selected, lam, omega


def _loss(provider: str, sh, sw, th, tw, selected, lam, omega, shared: int):
    from tide_ds.losses.fused_divergence import DivergenceTerm, fused_head_divergence
    from tide_ds.losses.token_divergence import token_divergences
    from tide_ds.teacher.forward import row_logits

    terms = (DivergenceTerm("tidal", "tidal", 1.0), DivergenceTerm("kl", "forward", 0.5))
    if provider == "today":
        import torch

        logits = row_logits(th[None], tw, torch.arange(th.shape[0])[None], vocab_limit=shared)[0]  # [N, V'] float32
        total, _ = fused_head_divergence(sh, sw, logits, selected, terms, temperature=TEMPERATURE, lam_N=lam, omega_N=omega)
        return total
    total, _ = token_divergences(sh, sw, th, tw, selected, terms, temperature=TEMPERATURE, shared_vocab_size=shared,
                                 lam_N=lam, omega_N=omega, implementation="pytorch")
    return total


def worker(provider: str, rows: int) -> dict:
    import time

    import torch

    tiny = _problem(16, 900, 1000, 64, 1000, 128, seed=1)
    _loss(provider, *tiny, shared=900).backward()
    del tiny
    p = _problem(rows, SHARED, VOCAB, D_S, VOCAB_T, D_T)
    Path("/proc/self/clear_refs").write_text("5")
    base = _rss("VmRSS")
    start = time.perf_counter()
    loss = _loss(provider, *p, shared=SHARED)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _rss("VmHWM") - base
    grads = (p[0].grad.numel() + p[1].grad.numel()) * 4
    return {
        "provider": provider, "rows": rows, "shared_vocab": SHARED, "student_vocab": VOCAB, "student_hidden": D_S,
        "teacher_vocab": VOCAB_T, "teacher_hidden": D_T, "dtype": "float32", "peak_extra_mib": peak / 2**20,
        "gradients_mib": grads / 2**20, "working_mib": (peak - grads) / 2**20, "seconds": seconds,
        "loss": loss.item(), "torch_threads": torch.get_num_threads(),
    }


def _measure(provider: str, rows: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", provider, "--rows", str(rows)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {provider} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2048, help="N, the selected rows")
    parser.add_argument("--out", default=None, help="JSON path (default $TIDE_BENCH_DIR/token_divergence_cpu_memory.json)")
    parser.add_argument("--worker", choices=PROVIDERS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.rows)))
        return
    rows = [_measure(provider, args.rows) for provider in PROVIDERS]
    today, fused = rows
    rel = abs(fused["loss"] - today["loss"]) / abs(today["loss"])
    if rel > 1e-4:
        raise SystemExit(f"the two paths disagree: today {today['loss']} vs fused {fused['loss']}")
    results = {
        "benchmark": "token_divergence_cpu_memory", "environment": _environment(),
        "method": ("fresh subprocess per provider; peak RSS (VmHWM after clear_refs=5) minus RSS after the inputs are "
                   "built; one forward+backward of TIDAL + 0.5 forward KL (T=2), float32; working = peak - gradients"),
        "rows": rows,
        "ratio": {"working_ratio": fused["working_mib"] / today["working_mib"],
                  "peak_ratio": fused["peak_extra_mib"] / today["peak_extra_mib"],
                  "seconds_ratio": fused["seconds"] / today["seconds"], "loss_rel_diff": rel, "target_working_ratio": 0.1},
    }
    print(json.dumps(results["ratio"], indent=2))
    for r in rows:
        print(f"{r['provider']:<6} peak {r['peak_extra_mib']:8.0f} MiB  grads {r['gradients_mib']:6.0f} MiB  "
              f"working {r['working_mib']:8.0f} MiB  {r['seconds']:6.1f} s  loss {r['loss']:.6f}")
    out = Path(args.out) if args.out else Path(os.environ.get("TIDE_BENCH_DIR", REPO / "bench_results")) / "token_divergence_cpu_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + ".tmp")
    staging.write_text(json.dumps(results, indent=2) + "\n")
    staging.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
