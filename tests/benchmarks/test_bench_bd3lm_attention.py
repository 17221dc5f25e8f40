"""BD3LM attention benchmark (docs/anchors.md §2.3 targets): SDPA with the dense mask, FlexAttention, ours.

Providers:
    sdpa:           the reference model path (transformers' ``sdpa_attention_forward``): repeat K/V over the
                    GQA group, then ``F.scaled_dot_product_attention`` with the dense boolean ``[1, 1, 2L, 2L]`` mask.
    sdpa_compiled:  the same under ``torch.compile``.
    flex:           ``torch.compile(flex_attention)`` with the cached ``BlockMask`` (``enable_gqa=True``).
    triton:         :func:`tide_kernels.bd3lm_attention.bd3lm_attention` (ours).

TFLOP/s counts useful work only: ``4 * B * H * Dh * allowed`` for the forward, with ``allowed`` the number
of True entries of the docs/method.md §2.3 mask (about a quarter of ``(2L)^2``); the backward counts 2.5x that (five
matmuls against the forward's two, FlashAttention's convention; the recomputed ``QK^T`` is not counted),
so forward+backward is 3.5x. Peak memory is the allocator's peak during one call above what was
allocated before it (inputs excluded).

Run: ``python -m pytest -m bench -s tests/benchmarks/test_bench_bd3lm_attention.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from tide_kernels.bd3lm_attention import bd3lm_attention, bd3lm_attention_reference
from torch.nn.attention.flex_attention import flex_attention

from tests.benchmarks.harness import BENCH_MARKS, bench_device, peak_mib, time_ms
from tests.benchmarks.shapes import BD3LM_ATTENTION_SHAPES, AttentionShape
from tests.tolerances import assert_close
from tide_ds.models.block_mask import dense_bd3lm_mask, flex_bd3lm_block_mask

pytestmark = BENCH_MARKS

OP = "bd3lm_attention"
# bf16 on the GPU; the CPU dry run uses float64 (the interpreter mis-multiplies bf16 dots, triton#11584).
DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float64


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    group = shape.num_heads // shape.num_kv_heads
    mask = dense_bd3lm_mask(shape.seq_len, shape.block_size, device=q.device)
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1), attn_mask=mask
    )


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _sdpa_compiled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    return _compiled(_sdpa)(q, k, v, shape)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    block_mask = flex_bd3lm_block_mask(shape.seq_len, shape.block_size, device=q.device)
    return _compiled(flex_attention)(q, k, v, block_mask=block_mask, enable_gqa=True)


def _triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: AttentionShape) -> torch.Tensor:
    return bd3lm_attention(q, k, v, seq_len=shape.seq_len, block_size=shape.block_size)


# Ours first and the compiled providers last: a run cut by its time limit keeps the numbers that matter most.
PROVIDERS = {"triton": _triton, "sdpa": _sdpa, "flex": _flex, "sdpa_compiled": _sdpa_compiled}
if not torch.cuda.is_available():  # the CPU dry run: FlexAttention has no CPU backward; compiling takes minutes
    PROVIDERS = {"triton": _triton, "sdpa": _sdpa}


def _inputs(shape: AttentionShape) -> tuple[torch.Tensor, ...]:
    """q, k, v as the student produces them (``[B, 2L, heads, Dh]`` memory seen as ``[B, heads, 2L, Dh]``), and g."""
    device = bench_device()
    generator = torch.Generator(device=device).manual_seed(0)
    tokens = 2 * shape.seq_len

    def make(heads: int) -> torch.Tensor:
        x = torch.randn(shape.batch, tokens, heads, shape.head_dim, generator=generator, device=device, dtype=DTYPE)
        return x.transpose(1, 2)

    q, k, v, g = make(shape.num_heads), make(shape.num_kv_heads), make(shape.num_kv_heads), make(shape.num_heads)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), g


def _forward_backward(fn, q, k, v, g) -> tuple[torch.Tensor, ...]:
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    out.backward(g)
    return out.detach(), q.grad, k.grad, v.grad


def _call(attention, mode: str, q, k, v, g, shape: AttentionShape):
    if mode == "fwd":
        return lambda: attention(q, k, v, shape)
    return lambda: attention(q, k, v, shape).backward(g)


@pytest.mark.parametrize("shape", BD3LM_ATTENTION_SHAPES, ids=lambda s: s.id)
def test_bench_bd3lm_attention(shape: AttentionShape, bench_recorder) -> None:
    bench_recorder.set_baselines(OP, ("sdpa", "sdpa_compiled", "flex"))
    q, k, v, g = _inputs(shape)
    mask = {"seq_len": shape.seq_len, "block_size": shape.block_size}

    # Correctness at the benchmark shape first: against the reference on the same inputs upcast to fp32
    # (the reference computes in fp32; its own error is far below the bf16 tolerance).
    ref_dtype = torch.float64 if DTYPE == torch.float64 else torch.float32
    tri = _forward_backward(lambda *x: bd3lm_attention(*x, **mask), q, k, v, g)
    ref = _forward_backward(lambda *x: bd3lm_attention_reference(*x, **mask), *(x.detach().to(ref_dtype) for x in (q, k, v, g)))
    for name, r, t in zip(("out", "dq", "dk", "dv"), ref, tri):
        assert_close(name, r, t, op=OP, dtype=DTYPE)
    del tri, ref

    allowed = int(dense_bd3lm_mask(shape.seq_len, shape.block_size, device=q.device).sum())
    fwd_flops = 4 * shape.batch * shape.num_heads * shape.head_dim * allowed
    for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
        for provider, attention in PROVIDERS.items():
            fn = _call(attention, mode, q, k, v, g, shape)
            fn()  # compile / autotune outside the timed region
            ms = time_ms(fn, grad_to_none=[q, k, v])
            bench_recorder.add(
                op=OP, mode=mode, shape=shape.id, provider=provider, ms=ms, peak_mib=peak_mib(fn, (q, k, v)),
                tflops=flops / (ms[0] * 1e-3) / 1e12,
            )
