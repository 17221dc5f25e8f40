"""Student batch layout for BD3LM (docs/method.md §2.1–§2.2).

Per example: EOS block padding (labelled, hence maskable), then fixed-length padding (labels -100).
Per batch: the model input is ``[x_t ; x_0]`` with positions ``[0..L-1 ; 0..L-1]``.

Legend: B batch, L student length (one copy), K block size.
"""

from __future__ import annotations

import functools

import torch

from tide_ds.diffusion.masking import IGNORE_INDEX

__all__ = ["bd3lm_position_ids", "check_block_multiple", "concat_xt_x0", "eos_block_pad", "pad_to_length"]


def _check_same_length(input_ids: list[int], labels: list[int], where: str) -> None:
    if len(input_ids) != len(labels):
        raise ValueError(f"{where}: input_ids has {len(input_ids)} tokens but labels has {len(labels)}")


def eos_block_pad(
    input_ids: list[int], labels: list[int], *, block_size: int, eos_id: int
) -> tuple[list[int], list[int]]:
    """Append ceil(n/K) K - n copies of ``eos_id`` to both lists (n = current length, K = ``block_size``).

    The labels get the EOS id too, so the padding is maskable and trained: the model learns to emit EOS
    until the block ends. Returns new lists; the inputs are not modified.
    """
    _check_same_length(input_ids, labels, "eos_block_pad")
    if block_size <= 0:
        raise ValueError(f"diffusion.block_size={block_size} must be a positive integer")
    pad = [eos_id] * (-len(input_ids) % block_size)
    return list(input_ids) + pad, list(labels) + pad


def pad_to_length(
    input_ids: list[int], labels: list[int], *, length: int, pad_id: int
) -> tuple[list[int], list[int]]:
    """Right-pad to exactly ``length`` tokens: ids with ``pad_id``, labels with -100 (never masked).

    Returns new lists. Raises ``ValueError`` if the example is already longer than ``length``.
    """
    _check_same_length(input_ids, labels, "pad_to_length")
    n = len(input_ids)
    if n > length:
        raise ValueError(
            f"Sequence length {n} exceeds pad_to_length {length}; raise data.seq_len or truncate the example"
        )
    pad = length - n
    return list(input_ids) + [pad_id] * pad, list(labels) + [IGNORE_INDEX] * pad


def check_block_multiple(length: int, block_size: int, *, option: str) -> None:
    """Raise ``ValueError`` unless ``block_size`` > 0 divides ``length`` (the value of config ``option``)."""
    if block_size <= 0:
        raise ValueError(f"diffusion.block_size={block_size} must be a positive integer")
    if length % block_size:
        nearest = -(-length // block_size) * block_size
        raise ValueError(
            f"{option}={length} is not a multiple of diffusion.block_size={block_size}; BD3LM blocks must "
            f"tile the sequence: use e.g. {option}={nearest}"
        )


def concat_xt_x0(x_t_BL: torch.Tensor, x_0_BL: torch.Tensor) -> torch.Tensor:
    """The student input ``[x_t ; x_0]`` (noisy copy first). [B, 2L], dtype of the inputs."""
    if x_t_BL.dim() != 2 or x_t_BL.shape != x_0_BL.shape:
        raise ValueError(
            f"concat_xt_x0 expects x_t and x_0 of the same shape [B, L]; got {tuple(x_t_BL.shape)} and "
            f"{tuple(x_0_BL.shape)}"
        )
    return torch.cat([x_t_BL, x_0_BL], dim=1)


@functools.lru_cache(maxsize=16)
def _position_ids(seq_len: int, device: torch.device) -> torch.Tensor:
    half = torch.arange(seq_len, dtype=torch.long, device=device)
    return torch.cat([half, half])[None, :]


def bd3lm_position_ids(seq_len: int, *, device: torch.device | str) -> torch.Tensor:
    """Positions ``[0..L-1 ; 0..L-1]`` of the concatenated input, the same for every row. int64 [1, 2L].

    Cached per (L, device) because L is fixed for a run: the returned tensor is shared, do not modify it
    in place.
    """
    if seq_len <= 0:
        raise ValueError(f"data.seq_len={seq_len} must be a positive integer")
    return _position_ids(seq_len, torch.device(device))
