"""Token-level CompDemo on row logits (docs/method.md §8.1), on a real tiny WeDLM teacher without DeepSpeed."""

import torch

from tide_ds.models.teachers import get_family
from tide_ds.models.wedlm import write_tiny_wedlm_checkpoint
from tide_ds.teacher.engine import TeacherEngine, TeacherModule


def _teacher(tmp_path, vocab_limit):
    fam = get_family("wedlm")
    ckpt = write_tiny_wedlm_checkpoint(tmp_path / "t", seed=3)
    module = TeacherModule(fam.load(ckpt), fam, block_size=8, concat_order="x0_xt", vocab_limit=vocab_limit)
    return TeacherEngine(module, family=fam, mask_token_id=1008, report=None)


def test_comp_demo_rows_come_from_the_pass_that_hid_them(tmp_path):
    teacher = _teacher(tmp_path, vocab_limit=1000)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 1000, (2, 16), generator=g)
    masked = torch.rand(2, 16, generator=g) < 0.6
    a = masked & (torch.rand(2, 16, generator=g) < 0.5)
    b = masked & ~a
    rows = torch.stack([torch.randperm(16, generator=g)[:6] for _ in range(2)])
    in_a = a.gather(1, rows)
    merged = teacher.comp_demo_row_logits(clean, a, b, rows, in_a)
    only_a = teacher.row_logits(clean, a, rows)  # pass 2: A hidden, B revealed
    only_b = teacher.row_logits(clean, b, rows)  # pass 1: B hidden, A revealed
    assert merged.shape == (2, 6, 1000) and merged.dtype == torch.float32
    assert torch.equal(merged[in_a], only_a[in_a]) and torch.equal(merged[~in_a], only_b[~in_a])
    # the demonstration changes what the teacher predicts (otherwise CompDemo would be a no-op)
    single = teacher.row_logits(clean, masked, rows)
    assert (merged[in_a] - single[in_a]).abs().max() > 1e-4


def test_row_logits_are_the_shared_prefix_of_the_full_logits(tmp_path):
    full = _teacher(tmp_path / "full", vocab_limit=None)
    cut = _teacher(tmp_path / "cut", vocab_limit=700)
    clean = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(1))
    masked = torch.zeros(1, 16, dtype=torch.bool)
    masked[0, 3:9] = True
    rows = torch.arange(16)[None]
    torch.testing.assert_close(cut.row_logits(clean, masked, rows), full.row_logits(clean, masked, rows)[..., :700])


def test_pipeline_b_teacher_checks_fail_before_loading(tmp_path):
    import pytest

    ckpt = write_tiny_wedlm_checkpoint(tmp_path / "t", seed=3)  # vocab 1024, mask 1008
    with pytest.raises(ValueError, match=r"shared_vocab_size=2000 exceeds the teacher's vocabulary \(1024 rows"):
        TeacherEngine.build(ckpt, vocab_limit=2000)
    with pytest.raises(ValueError, match=r"mask token id 1008 lies inside the shared vocabulary prefix"):
        TeacherEngine.build(ckpt, vocab_limit=1010)
    with pytest.raises(ValueError, match=r"teacher.mask_token_id=5 but the teacher .* declares mask_token_id=1008"):
        TeacherEngine.build(ckpt, mask_token_id=5)
