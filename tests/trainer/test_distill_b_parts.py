"""The pieces of the pipeline-B step: pair propagation, row compaction, CompDemo row merge."""

import torch

from tide_ds.trainer.objectives import _scatter_pairs, compact_rows


def test_scatter_pairs_is_a_masked_scatter():
    flags = torch.tensor([[True, False, True, True], [False, True, False, False]])
    pos = torch.tensor([[3, 5, 6, 0], [2, 4, -1, -1]])
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    out = _scatter_pairs(flags, pos, valid, 8)
    expected = torch.zeros(2, 8, dtype=torch.bool)
    expected[0, 3] = expected[0, 6] = True  # the invalid pair (index 0, flag True) writes nothing
    expected[1, 4] = True
    assert torch.equal(out, expected)


def test_scatter_pairs_invalid_pair_does_not_clear_position_zero():
    # A valid pair at teacher position 0 stays masked although invalid padding pairs also carry index 0
    # (the reference's unmasked scatter could overwrite it, spec §3.3 step 2).
    flags = torch.tensor([[True, False, False]])
    pos = torch.tensor([[0, 0, 0]])
    valid = torch.tensor([[True, False, False]])
    assert _scatter_pairs(flags, pos, valid, 4).tolist() == [[True, False, False, False]]


def test_compact_rows_keeps_selected_rows_in_order():
    rows = torch.arange(12).view(2, 6)
    other = rows + 100
    selected = torch.tensor([[False, True, False, True, True, False], [True, False, False, False, False, False]])
    r, o, sel = compact_rows(rows, other, selected_BN=selected)
    assert r.tolist() == [[1, 3, 4], [6, 7, 8]]
    assert o.tolist() == [[101, 103, 104], [106, 107, 108]]
    assert sel.tolist() == [[True, True, True], [True, False, False]]
    # every selected row survives, each once
    assert sorted(r[sel].tolist()) == sorted(rows[selected].tolist())


def test_compact_rows_with_nothing_selected_keeps_one_unselected_row():
    rows = torch.arange(6).view(2, 3)
    r, sel = compact_rows(rows, selected_BN=torch.zeros(2, 3, dtype=torch.bool))
    assert r.shape == (2, 1) and not sel.any()
