"""Student batch layout (docs/method.md §2.1–§2.2)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tide_ds.diffusion.layout import (
    bd3lm_position_ids,
    check_block_multiple,
    concat_xt_x0,
    eos_block_pad,
    pad_to_length,
)

EOS, PAD = 2, 0


@pytest.mark.parametrize(
    "n, block, n_eos",
    [(5, 4, 3), (8, 4, 0), (9, 4, 3), (1, 32, 31), (0, 4, 0), (7, 1, 0)],
)
def test_eos_block_pad(n: int, block: int, n_eos: int) -> None:
    ids = list(range(10, 10 + n))
    labels = [-100] * min(n, 2) + ids[2:]
    new_ids, new_labels = eos_block_pad(ids, labels, block_size=block, eos_id=EOS)
    assert new_ids == ids + [EOS] * n_eos
    assert new_labels == labels + [EOS] * n_eos  # labelled with EOS, so maskable
    assert len(ids) == n  # inputs untouched


def test_eos_block_pad_errors() -> None:
    with pytest.raises(ValueError, match="diffusion.block_size=0"):
        eos_block_pad([1], [1], block_size=0, eos_id=EOS)
    with pytest.raises(ValueError, match="input_ids has 2 tokens but labels has 1"):
        eos_block_pad([1, 2], [1], block_size=4, eos_id=EOS)


def test_pad_to_length() -> None:
    ids, labels = pad_to_length([5, 6, 7], [-100, 6, 7], length=6, pad_id=PAD)
    assert ids == [5, 6, 7, PAD, PAD, PAD]
    assert labels == [-100, 6, 7, -100, -100, -100]
    assert pad_to_length([5, 6], [5, 6], length=2, pad_id=PAD) == ([5, 6], [5, 6])


def test_pad_to_length_too_long() -> None:
    with pytest.raises(ValueError, match=r"Sequence length 7 exceeds pad_to_length 6; raise data\.seq_len"):
        pad_to_length(list(range(7)), list(range(7)), length=6, pad_id=PAD)


@given(n=st.integers(0, 40), block=st.integers(1, 8), extra_blocks=st.integers(0, 3))
def test_padded_sample_ends_content_on_a_block_boundary(n: int, block: int, extra_blocks: int) -> None:
    ids = list(range(3, 3 + n))
    ids, labels = eos_block_pad(ids, ids, block_size=block, eos_id=EOS)
    length = len(ids) + extra_blocks * block
    ids, labels = pad_to_length(ids, labels, length=length, pad_id=PAD)
    assert len(ids) == len(labels) == length and length % block == 0
    first_pad = next((i for i, y in enumerate(labels) if y == -100), length)
    assert first_pad % block == 0
    assert all(y == -100 for y in labels[first_pad:])


def test_check_block_multiple() -> None:
    check_block_multiple(512, 32, option="data.seq_len")
    msg = r"data\.seq_len=500 is not a multiple of diffusion\.block_size=32.*data\.seq_len=512"
    with pytest.raises(ValueError, match=msg):
        check_block_multiple(500, 32, option="data.seq_len")
    with pytest.raises(ValueError, match=r"diffusion\.block_size=-4"):
        check_block_multiple(8, -4, option="data.seq_len")


def test_concat_xt_x0() -> None:
    x_t = torch.tensor([[9, 2, 9], [4, 9, 6]])
    x_0 = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert torch.equal(concat_xt_x0(x_t, x_0), torch.tensor([[9, 2, 9, 1, 2, 3], [4, 9, 6, 4, 5, 6]]))
    with pytest.raises(ValueError, match=r"same shape \[B, L\]"):
        concat_xt_x0(x_t, x_0[:, :2])


def test_bd3lm_position_ids() -> None:
    pos = bd3lm_position_ids(3, device="cpu")
    assert pos.dtype == torch.long
    assert torch.equal(pos, torch.tensor([[0, 1, 2, 0, 1, 2]]))
    assert bd3lm_position_ids(3, device=torch.device("cpu")) is pos  # cached
    assert bd3lm_position_ids(4, device="cpu").shape == (1, 8)
    with pytest.raises(ValueError, match="data.seq_len=0"):
        bd3lm_position_ids(0, device="cpu")
