"""Chunk-consistent masking for cross-tokenizer distillation (docs/method.md §4.4).

Alignment is a chunk id per token on each side (docs/design.md decision 4; -1 = no chunk), so every step
below is a scatter or a gather on ``[B, L]`` / ``[B, L_t]`` / ``[B, C]`` tensors; no dense token x chunk
matrix exists. All of it is sync-free.

Legend: B batch, L student length, L_t teacher length, C chunks (max over the batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ChunkMasks:
    """Shapes: [B, L] student, [B, L_t] teacher, [B, C] chunks."""

    student_masked: torch.Tensor  # m': the base mask widened to whole chunks (replaces m everywhere)
    teacher_masked: torch.Tensor  # tau: teacher tokens of chunks with a masked student token
    chunk_masked: torch.Tensor  # h
    chunk_active: torch.Tensor  # chi = h and not a prompt chunk


def chunk_any(flags_BX: torch.Tensor, chunk_ids_BX: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """``[B, C]``: chunk ``c`` has at least one flagged token (tokens with id -1 are ignored)."""
    b = flags_BX.shape[0]
    idx = torch.where(chunk_ids_BX >= 0, chunk_ids_BX.long(), num_chunks)  # -1 -> a dropped extra column
    out = torch.zeros(b, num_chunks + 1, dtype=torch.int32, device=flags_BX.device)
    out.scatter_reduce_(1, idx, flags_BX.to(torch.int32), reduce="amax")
    return out[:, :num_chunks].bool()


def gather_chunks(chunk_flags_BC: torch.Tensor, chunk_ids_BX: torch.Tensor) -> torch.Tensor:
    """Token flags ``[B, X]``: the flag of each token's chunk (False for tokens without a chunk)."""
    idx = chunk_ids_BX.long().clamp_min(0)
    return chunk_flags_BC.gather(1, idx) & (chunk_ids_BX >= 0)


def chunk_consistent_masks(
    masked_BL: torch.Tensor,
    labels_BL: torch.Tensor,
    student_chunks_BL: torch.Tensor,
    teacher_chunks_BLt: torch.Tensor,
    num_chunks: int,
) -> ChunkMasks:
    """Widen the student mask to whole chunks and mirror it onto the teacher (docs/method.md §4.4 steps 1–4).

    A chunk is then either fully masked on both sides or fully visible on both sides; teacher tokens
    outside every chunk are never masked; chunks that touch a prompt token (label -100) are inactive.
    """
    maskable = labels_BL != -100
    h = chunk_any(masked_BL, student_chunks_BL, num_chunks)
    widened = masked_BL | (maskable & gather_chunks(h, student_chunks_BL))
    prompt = chunk_any(~maskable, student_chunks_BL, num_chunks)
    return ChunkMasks(
        student_masked=widened,
        teacher_masked=gather_chunks(h, teacher_chunks_BLt),
        chunk_masked=h,
        chunk_active=h & ~prompt,
    )
