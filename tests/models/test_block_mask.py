"""BD3LM attention mask (docs/method.md §2.3): worked example, brute force, FlexAttention agreement, caching."""

from __future__ import annotations

import random

import pytest
import torch

from tide_ds.models.block_mask import (
    additive_bd3lm_mask,
    bd3lm_allowed,
    check_mask_args,
    dense_bd3lm_mask,
    flex_bd3lm_block_mask,
)

# The worked example of docs/method.md §2.3 (L=4, K=2), rows = queries, columns = keys.
XT_X0 = """
11000000
11000000
00111100
00111100
00001100
00001100
00001111
00001111
"""
X0_XT = """
11000000
11000000
11110000
11110000
00001100
00001100
11000011
11000011
"""


def _parse(text: str) -> torch.Tensor:
    return torch.tensor([[c == "1" for c in row] for row in text.split()])


def brute_force(seq_len: int, block_size: int, clean_first: bool) -> torch.Tensor:
    """The three-term table of docs/method.md §2.3, one (q, k) pair at a time."""
    n = 2 * seq_len
    out = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            gq, gk = int(q >= seq_len), int(k >= seq_len)
            bq, bk = (q - seq_len * gq) // block_size, (k - seq_len * gk) // block_size
            cq, ck = (1 - gq, 1 - gk) if clean_first else (gq, gk)
            m_bd = bq == bk and cq == ck
            m_obc = bq > bk and ck == 1 and cq == 0
            m_bc = bq >= bk and ck == 1 and cq == 1
            out[q, k] = m_bd or m_obc or m_bc
    return out


def _random_cases(n: int = 20, seed: int = 0) -> list[tuple[int, int, bool]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        block_size = rng.randint(1, 8)
        seq_len = block_size * rng.randint(1, 6)
        cases.append((seq_len, block_size, rng.random() < 0.5))
    return cases


@pytest.mark.parametrize("clean_first,expected", [(False, XT_X0), (True, X0_XT)], ids=["xt_x0", "x0_xt"])
def test_dense_bd3lm_mask_worked_example(clean_first: bool, expected: str) -> None:
    mask = dense_bd3lm_mask(4, 2, clean_first=clean_first)
    assert mask.shape == (1, 1, 8, 8) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], _parse(expected))
    assert torch.equal(brute_force(4, 2, clean_first), _parse(expected))


@pytest.mark.parametrize("seq_len,block_size,clean_first", _random_cases(), ids=lambda v: str(v))
def test_dense_bd3lm_mask_matches_brute_force(seq_len: int, block_size: int, clean_first: bool) -> None:
    mask = dense_bd3lm_mask(seq_len, block_size, clean_first=clean_first)
    assert torch.equal(mask[0, 0], brute_force(seq_len, block_size, clean_first))


def test_bd3lm_allowed_broadcasts_and_orders_are_mirror_images() -> None:
    seq_len, block_size = 12, 3
    q = torch.arange(2 * seq_len)[:, None]
    kv = torch.arange(2 * seq_len)[None, :]
    a = bd3lm_allowed(q, kv, seq_len=seq_len, block_size=block_size, clean_first=False)
    b = bd3lm_allowed(q, kv, seq_len=seq_len, block_size=block_size, clean_first=True)
    assert a.shape == (2 * seq_len, 2 * seq_len)
    # x0_xt is xt_x0 with the two halves swapped (same permutation on queries and keys).
    perm = torch.cat([torch.arange(seq_len, 2 * seq_len), torch.arange(seq_len)])
    assert torch.equal(b, a[perm][:, perm])
    # Scalars work too (as inside a FlexAttention mask_mod).
    assert bd3lm_allowed(torch.tensor(0), torch.tensor(0), seq_len=4, block_size=2, clean_first=False).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_additive_bd3lm_mask_values(dtype: torch.dtype) -> None:
    allowed = dense_bd3lm_mask(8, 4)
    add = additive_bd3lm_mask(8, 4, dtype=dtype)
    assert add.shape == (1, 1, 16, 16) and add.dtype == dtype
    assert torch.all(add[allowed] == 0)
    assert torch.all(add[~allowed] == torch.finfo(dtype).min)
    with pytest.raises(ValueError, match="floating"):
        additive_bd3lm_mask(8, 4, dtype=torch.int32)


@pytest.mark.parametrize(
    "seq_len,block_size", [(4, 2), (128, 32), (192, 64), (256, 128), (256, 8)], ids=lambda v: str(v)
)
@pytest.mark.parametrize("clean_first", [False, True], ids=["xt_x0", "x0_xt"])
def test_flex_bd3lm_block_mask_agrees_with_dense(seq_len: int, block_size: int, clean_first: bool) -> None:
    bm = flex_bd3lm_block_mask(seq_len, block_size, clean_first=clean_first)
    dense = dense_bd3lm_mask(seq_len, block_size, clean_first=clean_first)[0, 0]
    n = 2 * seq_len
    assert bm.shape == (1, 1, n, n)
    # Element level: the BlockMask's mask_mod is the same predicate.
    idx = torch.arange(n)
    zero = torch.zeros((), dtype=torch.long)
    assert torch.equal(bm.mask_mod(zero, zero, idx[:, None], idx[None, :]), dense)
    # Tile level: a tile is listed iff some pair in it may attend; "full" iff every pair may.
    qb, kb = bm.BLOCK_SIZE
    tiles_q, tiles_k = -(-n // qb), -(-n // kb)
    padded = torch.zeros(tiles_q * qb, tiles_k * kb, dtype=torch.bool)
    padded[:n, :n] = dense
    tiles = padded.view(tiles_q, qb, tiles_k, kb)
    any_allowed = tiles.any(dim=(1, 3))
    assert torch.equal(bm.to_dense()[0, 0].bool(), any_allowed)
    full = torch.ones_like(padded)
    full[:n, :n] = dense
    all_allowed = full.view(tiles_q, qb, tiles_k, kb).all(dim=(1, 3)) & any_allowed
    if n % qb == 0 and n % kb == 0:
        assert torch.equal(bm.full_kv_num_blocks[0, 0], all_allowed.sum(dim=1).to(bm.full_kv_num_blocks.dtype))


def test_masks_are_cached() -> None:
    assert dense_bd3lm_mask(16, 4) is dense_bd3lm_mask(16, 4, clean_first=False, device=torch.device("cpu"))
    assert dense_bd3lm_mask(16, 4) is not dense_bd3lm_mask(16, 4, clean_first=True)
    assert additive_bd3lm_mask(16, 4, dtype=torch.float32) is additive_bd3lm_mask(16, 4, dtype=torch.float32)
    assert additive_bd3lm_mask(16, 4, dtype=torch.float32) is not additive_bd3lm_mask(16, 4, dtype=torch.bfloat16)
    assert flex_bd3lm_block_mask(16, 4) is flex_bd3lm_block_mask(16, 4, device="cpu")


@pytest.mark.parametrize(
    "seq_len,block_size,match",
    [(10, 4, "data.seq_len=10 is not a multiple of diffusion.block_size=4"), (0, 4, "data.seq_len=0"),
     (8, 0, "diffusion.block_size=0"), (8, -2, "diffusion.block_size=-2")],
)
def test_check_mask_args_rejects(seq_len: int, block_size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_mask_args(seq_len, block_size)
    with pytest.raises(ValueError, match=match):
        dense_bd3lm_mask(seq_len, block_size)


def test_check_mask_args_accepts() -> None:
    check_mask_args(8, 8)
    check_mask_args(512, 32)
