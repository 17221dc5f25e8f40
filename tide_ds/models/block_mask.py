"""The BD3LM block-diffusion attention mask (docs/method.md §2.3): one predicate, two consumers.

The student sees ``[x_t ; x_0]`` (order ``xt_x0``); the teacher option ``x0_xt`` puts the clean copy first.
Indices run over the concatenation, ``0 <= q, kv < 2L``. For an index ``r``: segment ``g = r >= L``, local
index ``r - L*g``, block ``beta = local // K``; ``c`` ("is clean copy") is ``g`` for ``xt_x0`` and ``not g``
for ``x0_xt``. ``(q, kv)`` may attend when any of

* block-diagonal:        ``beta(q) == beta(kv)`` and ``c(q) == c(kv)``
* offset block-causal:   ``beta(q) >  beta(kv)`` and ``c(kv)`` and not ``c(q)``
* block-causal:          ``beta(q) >= beta(kv)`` and ``c(kv)`` and ``c(q)``

holds. ``bd3lm_allowed`` (defined in ``tide_kernels.bd3lm_attention.mask``, the one copy of the predicate,
shared with the attention kernel's reference) evaluates it elementwise; the dense boolean mask (SDPA), the additive mask
(eager attention) and the FlexAttention ``BlockMask`` are all built from it and cached per
``(L, K, order, device)`` because L and K are fixed for a run (the reference rebuilt them every step).

Legend: L student length (one copy), K block size.
"""

from __future__ import annotations

import functools

import torch
from tide_kernels.bd3lm_attention.mask import bd3lm_allowed, bd3lm_dense_mask
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

__all__ = [
    "additive_bd3lm_mask",
    "bd3lm_allowed",
    "check_mask_args",
    "dense_bd3lm_mask",
    "flex_bd3lm_block_mask",
]

_CACHE_SIZE = 32


def check_mask_args(seq_len: int, block_size: int) -> None:
    """Raise ``ValueError`` unless ``seq_len`` and ``block_size`` are positive and K divides L."""
    if seq_len <= 0:
        raise ValueError(f"data.seq_len={seq_len} must be > 0")
    if block_size <= 0:
        raise ValueError(f"diffusion.block_size={block_size} must be > 0")
    if seq_len % block_size:
        raise ValueError(
            f"data.seq_len={seq_len} is not a multiple of diffusion.block_size={block_size}; "
            "BD3LM blocks must tile the sequence: change one of them"
        )


def _canonical(device: torch.device | str) -> torch.device:
    """One cache key per physical device: ``"cuda"`` and ``"cuda:0"`` (when current) are the same."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        module = getattr(torch, device.type, None)
        if module is not None and hasattr(module, "current_device"):
            device = torch.device(device.type, module.current_device())
    return device


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _dense(seq_len: int, block_size: int, clean_first: bool, device: torch.device) -> torch.Tensor:
    check_mask_args(seq_len, block_size)
    return bd3lm_dense_mask(seq_len, block_size, clean_first=clean_first, device=device)


def dense_bd3lm_mask(
    seq_len: int, block_size: int, *, clean_first: bool = False, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The BD3LM mask as a dense boolean tensor ``[1, 1, 2L, 2L]`` (True = may attend), for SDPA.

    Cached per (L, K, order, device): the same tensor object is returned on every call, so callers must
    not modify it in place.
    """
    return _dense(seq_len, block_size, bool(clean_first), _canonical(device))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _additive(
    seq_len: int, block_size: int, clean_first: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    allowed = _dense(seq_len, block_size, clean_first, device)
    # finfo.min rather than -inf: a fully masked row then stays finite (docs/models.md §2.4); BD3LM has none.
    blocked = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=device)
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=device), blocked)


def additive_bd3lm_mask(
    seq_len: int,
    block_size: int,
    *,
    clean_first: bool = False,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The BD3LM mask as an additive float tensor ``[1, 1, 2L, 2L]``: 0 where allowed, ``finfo(dtype).min`` elsewhere.

    For eager attention, which adds the mask to the scores (a boolean mask would be silently wrong
    there). ``dtype`` must be a floating dtype, normally the activation dtype. Cached per
    (L, K, order, dtype, device); callers must not modify the returned tensor in place.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"additive_bd3lm_mask: dtype={dtype} is not a floating dtype; pass the activation dtype")
    return _additive(seq_len, block_size, bool(clean_first), dtype, _canonical(device))


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _flex(seq_len: int, block_size: int, clean_first: bool, device: torch.device) -> BlockMask:
    check_mask_args(seq_len, block_size)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return bd3lm_allowed(q_idx, kv_idx, seq_len=seq_len, block_size=block_size, clean_first=clean_first)

    total = 2 * seq_len
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device)


def flex_bd3lm_block_mask(
    seq_len: int, block_size: int, *, clean_first: bool = False, device: torch.device | str = "cpu"
) -> BlockMask:
    """The BD3LM mask as a FlexAttention ``BlockMask`` over ``2L x 2L`` (broadcast over batch and heads).

    Its ``mask_mod`` is :func:`bd3lm_allowed`. Cached per (L, K, order, device); do not modify it.
    """
    return _flex(seq_len, block_size, bool(clean_first), _canonical(device))
