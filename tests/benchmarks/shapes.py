"""Benchmark shapes with real sizes (STYLE.md §5), one place for every kernel benchmark.

Legend: B batch, L student length (one copy; the attention sees 2L tokens), K block size, H query heads,
H_kv key/value heads, Dh head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BD3LM_ATTENTION_SHAPES", "AttentionShape"]


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


# The Qwen3-0.6B student (MODELS.md §7.1: 16 query / 8 KV heads, head dim 128), TIDE's block size 32.
# B x L stays 8 x 512 = 4096 tokens per copy, so longer sequences trade batch for length.
BD3LM_ATTENTION_SHAPES = [
    AttentionShape(batch=8 * 512 // seq_len, seq_len=seq_len, block_size=32, num_heads=16, num_kv_heads=8, head_dim=128)
    for seq_len in (512, 1024, 2048, 4096)
]
