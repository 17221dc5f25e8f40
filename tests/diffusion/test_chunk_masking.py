import torch

from tide_ds.diffusion.chunk_masking import chunk_any, chunk_consistent_masks, gather_chunks


def test_chunk_consistent_masks_hand_example():
    # student: 2 prompt tokens (chunk 0), then chunks 1,1,2,3,3 and one EOS pad token without a chunk
    labels = torch.tensor([[-100, -100, 5, 6, 7, 8, 9, 2]])
    s_chunks = torch.tensor([[0, 0, 1, 1, 2, 3, 3, -1]])
    t_chunks = torch.tensor([[0, 1, 1, 1, 2, 2, 3, -1, -1]])  # teacher tokenizes differently; 2 pads
    masked = torch.tensor([[False, False, True, False, False, False, True, True]])
    m = chunk_consistent_masks(masked, labels, s_chunks, t_chunks, num_chunks=4)
    assert m.chunk_masked.tolist() == [[False, True, False, True]]
    assert m.student_masked.tolist() == [[False, False, True, True, False, True, True, True]]
    assert m.teacher_masked.tolist() == [[False, True, True, True, False, False, True, False, False]]
    assert m.chunk_active.tolist() == [[False, True, False, True]]


def test_prompt_chunks_are_never_active_and_minus_one_ignored():
    labels = torch.tensor([[-100, 4, 4, 4]])
    s_chunks = torch.tensor([[0, 0, -1, 1]])  # chunk 0 straddles the prompt boundary
    masked = torch.tensor([[False, True, True, False]])
    m = chunk_consistent_masks(masked, labels, s_chunks, torch.tensor([[0, 1]]), num_chunks=2)
    assert m.chunk_masked.tolist() == [[True, False]]
    assert m.chunk_active.tolist() == [[False, False]]
    assert m.student_masked.tolist() == [[False, True, True, False]]  # the prompt token stays visible


def test_chunk_any_and_gather_random_against_loops():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 6, (3, 40), generator=g)
    flags = torch.rand(3, 40, generator=g) < 0.2
    got = chunk_any(flags, ids, 6)
    for b in range(3):
        for c in range(6):
            assert got[b, c].item() == any(flags[b, i] and ids[b, i] == c for i in range(40))
    back = gather_chunks(got, ids)
    assert back.tolist() == [[bool(ids[b, i] >= 0 and got[b, ids[b, i]]) for i in range(40)] for b in range(3)]
