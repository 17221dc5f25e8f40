"""Benchmark shapes with real sizes (CONTRIBUTING.md §5), one place for every kernel benchmark.

Legend: B batch, L student length (one copy; the attention sees 2L tokens), L_t teacher length, K block
size, H query heads, H_kv key/value heads, Dh head dim, D hidden, V vocabulary.

Under ``TIDE_BENCH_DRY_RUN=1`` without a GPU the lists hold tiny shapes instead (a logic check on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tests.benchmarks.harness import DRY_RUN

__all__ = ["BD3LM_ATTENTION_SHAPES", "STUDENT_LOSS_SHAPES", "TEACHER_LOGPROB_SHAPES", "TOKEN_DIVERGENCE_SHAPES",
           "AttentionShape", "DivergenceShape", "HeadShape"]

_TINY = DRY_RUN and not torch.cuda.is_available()


@dataclass(frozen=True)
class AttentionShape:
    """One attention problem: q ``[B, H, 2L, Dh]``, k/v ``[B, H_kv, 2L, Dh]`` (BD3LM layout)."""

    batch: int
    seq_len: int
    block_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def id(self) -> str:
        return (f"B{self.batch}-L{self.seq_len}-K{self.block_size}-h{self.num_heads}kv{self.num_kv_heads}"
                f"-d{self.head_dim}")


@dataclass(frozen=True)
class HeadShape:
    """One LM-head problem: hidden ``[B, L, D]`` (the student: both halves, ``[B, 2L, D]``), weight ``[V, D]``."""

    batch: int
    seq_len: int
    hidden: int
    vocab: int

    @property
    def rows(self) -> int:
        return self.batch * self.seq_len

    @property
    def id(self) -> str:
        return f"B{self.batch}-L{self.seq_len}-D{self.hidden}-V{self.vocab}"


@dataclass(frozen=True)
class DivergenceShape:
    """One pipeline-B token-divergence problem: student rows ``[N, D_s]`` + head ``[V, D_s]``, teacher rows
    ``[N, D_t]`` + head ``[V_t, D_t]``, shared prefix V'."""

    rows: int
    shared: int
    vocab: int
    hidden: int
    teacher_vocab: int
    teacher_hidden: int

    @property
    def id(self) -> str:
        return f"N{self.rows}-V'{self.shared}-Ds{self.hidden}-Dt{self.teacher_hidden}"


# The Qwen3-0.6B student (docs/models.md §7.1: 16 query / 8 KV heads, head dim 128), TIDE's block size 32.
# B x L stays 8 x 512 = 4096 tokens per copy, so longer sequences trade batch for length. L = 1,024 (the
# issue's headline target) comes first, so a run cut by its time limit has measured it.
BD3LM_ATTENTION_SHAPES = [
    AttentionShape(batch=8 * 512 // seq_len, seq_len=seq_len, block_size=32, num_heads=16, num_kv_heads=8, head_dim=128)
    for seq_len in (1024, 512, 2048, 4096)
]
# The student head (Qwen3-0.6B: V = 151,936, D = 1,024), N = 8 x 512 x_t rows (the paper's batch).
STUDENT_LOSS_SHAPES = [HeadShape(batch=8, seq_len=512, hidden=1024, vocab=151_936)]
# The LLaDA2.0-mini teacher head (V = 157,184, D = 2,048), L_t = 1,024.
TEACHER_LOGPROB_SHAPES = [HeadShape(batch=8, seq_len=1024, hidden=2048, vocab=157_184)]
# Pipeline B at the paper's shape: micro-batch 10 x 512 rows, the Qwen3-0.6B student (D_s = 1,024) and the
# WeDLM-8B teacher (D_t = 4,096), both with Qwen's 151,936-row head, shared prefix V' = 151,646.
TOKEN_DIVERGENCE_SHAPES = [DivergenceShape(rows=10 * 512, shared=151_646, vocab=151_936, hidden=1024,
                                           teacher_vocab=151_936, teacher_hidden=4096)]

if _TINY:
    TOKEN_DIVERGENCE_SHAPES = [DivergenceShape(rows=48, shared=900, vocab=1000, hidden=32, teacher_vocab=1000,
                                               teacher_hidden=48)]
    BD3LM_ATTENTION_SHAPES = [AttentionShape(batch=1, seq_len=32, block_size=8, num_heads=4, num_kv_heads=2, head_dim=16)]
    STUDENT_LOSS_SHAPES = [HeadShape(batch=2, seq_len=32, hidden=32, vocab=1000)]
    TEACHER_LOGPROB_SHAPES = [HeadShape(batch=2, seq_len=48, hidden=64, vocab=1200)]
