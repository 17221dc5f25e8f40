"""Which layout changes a resume converts, and which it refuses (tide_ds.trainer.universal, no DeepSpeed run)."""

from __future__ import annotations

import pytest
import torch

from tide_ds.trainer import universal


def test_world_size_change_is_converted_and_stage_change_refused(tmp_path):
    saved = {"world_size": 2, "zero_stage": 2}
    assert universal.layout_change(saved, world_size=2, zero_stage=2) is None
    assert universal.layout_change(saved, world_size=1, zero_stage=2) == "world size 2 -> 1"
    with pytest.raises(ValueError, match="written under ZeRO stage 2, this run uses stage 3"):
        universal.layout_change(saved, world_size=2, zero_stage=3, ckpt_dir=tmp_path)
    # checkpoints from before the stage was recorded: only the world size is known
    assert universal.layout_change({"world_size": 4, "zero_stage": None}, world_size=4, zero_stage=3) is None


def test_saved_layout_falls_back_to_counting_partition_files(tmp_path):
    for r in range(3):
        (tmp_path / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").touch()
    assert universal.saved_layout(tmp_path, {"step": 5}) == {"world_size": 3, "zero_stage": None}
    assert universal.saved_layout(tmp_path, {"world_size": 8, "zero_stage": 2}) == {"world_size": 8, "zero_stage": 2}


def test_source_checksums_do_not_depend_on_the_partitioning(tmp_path):
    gen = torch.Generator().manual_seed(0)
    full = {k: torch.randn(1000, generator=gen) for k in ("fp32", "exp_avg", "exp_avg_sq")}
    for world, folder in ((2, tmp_path / "two"), (3, tmp_path / "three")):
        folder.mkdir()
        for r, idx in enumerate(torch.arange(1000).tensor_split(world)):
            part = {k: v[idx] for k, v in full.items()}
            sd = {"optimizer_state_dict": {
                "single_partition_of_fp32_groups": [part["fp32"]],
                "base_optimizer_state": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": part["exp_avg"],
                                                       "exp_avg_sq": part["exp_avg_sq"]}}},
            }}
            torch.save(sd, folder / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    (two, steps2), (three, steps3) = universal.source_checksums(tmp_path / "two"), universal.source_checksums(tmp_path / "three")
    assert steps2 == steps3 == {7.0}
    for kind, t in full.items():
        assert universal._close(two[kind], three[kind])
        assert universal._close(two[kind], universal._stats(t))
    tampered = universal._stats(full["exp_avg"] + torch.nn.functional.one_hot(torch.tensor(3), 1000) * 1e-3)
    assert not universal._close(tampered, two["exp_avg"])
