"""Fused LM-head loss benchmark: dense logits, the plain-PyTorch tiled path, and the Triton op.

Providers (all compute CE of the target log-probs of every row and its gradients w.r.t. hidden and W):
    dense:  full ``[N, V]`` logits in bf16 (``hidden @ W^T``), ``log_softmax`` in fp32, gather, autograd.
    tiled:  :func:`tide_ds.losses.fused_head.fused_head_loss` (row tiles, gradients in the forward).
    triton: :func:`tide_kernels.fused_head.fused_head_loss_triton`.

Shape: the Qwen3-0.6B student head (V = 151,936, D = 1,024), N = 8 x 512 rows of bf16, 50 % of them
needed (rows_N), as in a masked-diffusion batch. Timed: forward+backward (the fused paths do their
gradient work in forward, so forward alone is not comparable). Peak memory is the allocator's peak
during one call above what was allocated before it (inputs excluded).

Run: ``python -m pytest -m bench -s tests/benchmarks/test_bench_fused_head.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import triton
from tide_kernels.fused_head import (
    dense_target_logprobs_reference,
    fused_head_loss_triton,
)

from tide_ds.losses.fused_head import fused_head_loss

pytestmark = [
    pytest.mark.bench,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU"),
]

OP = "fused_head"
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class HeadShape:
    """One LM-head problem: hidden ``[N, D]``, weight ``[V, D]`` (tests/benchmarks/shapes.py is not ours to edit)."""

    rows: int
    hidden: int
    vocab: int

    @property
    def id(self) -> str:
        return f"N{self.rows}-D{self.hidden}-V{self.vocab}"


FUSED_HEAD_SHAPES = [HeadShape(rows=8 * 512, hidden=1024, vocab=151_936)]


def _ce(rows_N: torch.Tensor):
    count = rows_N.sum().clamp_min(1)

    def loss_fn(lp):
        ce = -(lp * rows_N).sum() / count
        return ce, {"ce": ce}

    return loss_fn


def _dense(h, w, y, rows):
    # The usual model path: logits in the input dtype, log-softmax in fp32.
    logits = (h @ w.t()).float()
    lp = torch.log_softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1) * rows
    return _ce(rows)(lp)[0]


def _tiled(h, w, y, rows):
    return fused_head_loss(h, w, y, rows, _ce(rows))[0]


def _triton(h, w, y, rows):
    return fused_head_loss_triton(h, w, y, rows, _ce(rows))[0]


PROVIDERS = {"dense": _dense, "tiled": _tiled, "triton": _triton}


def _inputs(shape: HeadShape) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(shape.rows, shape.hidden, generator=generator, device="cuda", dtype=DTYPE)
    w = (torch.randn(shape.vocab, shape.hidden, generator=generator, device="cuda", dtype=DTYPE) * 0.05)
    y = torch.randint(0, shape.vocab, (shape.rows,), generator=generator, device="cuda")
    rows = torch.rand(shape.rows, generator=generator, device="cuda") < 0.5
    return h.requires_grad_(), w.requires_grad_(), y, rows


def _peak_mib(fn, inputs: tuple[torch.Tensor, ...]) -> float:
    for x in inputs:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@pytest.mark.parametrize("shape", FUSED_HEAD_SHAPES, ids=lambda s: s.id)
def test_bench_fused_head(shape: HeadShape, bench_recorder) -> None:
    bench_recorder.set_baselines(OP, ("dense",))
    h, w, y, rows = _inputs(shape)

    # Correctness at the benchmark shape: Triton against the fp32 dense reference on the same inputs.
    def grads(fn, *args):
        a, b = (x.detach().clone().requires_grad_() for x in args[:2])
        loss = fn(a, b, *args[2:])
        loss.backward()
        return loss.detach().float(), a.grad.float(), b.grad.float()

    ref = grads(lambda a, b, yy, rr: _ce(rr)(dense_target_logprobs_reference(a, b, yy, rr))[0], h.float(), w.float(), y, rows)
    tri = grads(_triton, h, w, y, rows)
    for name, r, t in zip(("loss", "dh", "dw"), ref, tri):
        rel = ((t - r).norm() / r.norm().clamp_min(1e-30)).item()
        assert rel < 2e-2, f"{name}: relative error {rel:.2e} at the benchmark shape"
    del ref, tri

    # Useful work: logits (2NVD) forward, dh and dW (4NVD) backward.
    flops = 6 * shape.rows * shape.vocab * shape.hidden
    for provider, head in PROVIDERS.items():
        fn = lambda head=head: head(h, w, y, rows).backward()
        fn()  # autotune / warm up outside the timed region
        ms = triton.testing.do_bench(fn, warmup=10, rep=50, grad_to_none=[h, w], quantiles=[0.5, 0.2, 0.8])
        bench_recorder.add(
            op=OP, mode="fwd+bwd", shape=shape.id, provider=provider, ms=tuple(ms), peak_mib=_peak_mib(fn, (h, w)),
            tflops=flops / (ms[0] * 1e-3) / 1e12,
        )
