"""Teacher engine on two CPU ranks (gloo) beside a ZeRO-3 student; placement and CompDemo units."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tide_ds.teacher.forward import chunks_to_tokens, complementary_split, merge_passes, row_logits, target_logprobs
from tide_ds.teacher.placement import decide_placement, teacher_ds_config

ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from tide_ds.models.llada2_moe import write_tiny_llada2_moe_checkpoint
    from tide_ds.models.wedlm import write_tiny_wedlm_checkpoint

    root = tmp_path_factory.mktemp("teachers")
    return {
        "llada2_moe": write_tiny_llada2_moe_checkpoint(root / "llada2", seed=0, shard=True),
        "wedlm": write_tiny_wedlm_checkpoint(root / "wedlm", seed=1),
    }


@pytest.mark.slow
@pytest.mark.parametrize("family,placement", [("llada2_moe", "zero3"), ("wedlm", "zero3"), ("llada2_moe", "replicate")])
def test_two_ranks_match_unsharded_teacher_without_hang(checkpoints, tmp_path, family, placement):
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tide_ds" / "torch_extensions"))
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_port()),
           str(ROOT / "tests" / "teacher" / "teacher_worker.py"), str(checkpoints[family]), family, placement, str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["placement"] == placement and r["finite"]
        assert r["local_rank_and_size"] == [r["rank"], 2]  # the launcher's node-local rank and size, for the turns
        assert r["lp_max_diff"] <= 1e-6 and r["demo_max_diff"] <= 1e-6, r
    assert ranks[0]["masked"] > 0 and ranks[0]["lp_nonzero_rows"] == ranks[0]["masked"]
    assert ranks[1]["masked"] == 0 and ranks[1]["lp_nonzero_rows"] == 0  # no masked token, same passes, no hang
    assert ranks[0]["student_losses"][-1] < ranks[0]["student_losses"][0]


def test_auto_placement_decides_from_bytes_world_and_memory():
    small = decide_placement("auto", param_bytes=2 * GiB, world_size=8, free_bytes=80 * GiB)
    assert small.kind == "replicate" and "fits" in small.reason
    big = decide_placement("auto", param_bytes=60 * GiB, world_size=8, free_bytes=80 * GiB, largest_group_bytes=2 * GiB)
    assert big.kind == "zero3" and "9.50 GiB per rank" in big.reason
    huge = decide_placement("auto", param_bytes=900 * GiB, world_size=8, free_bytes=80 * GiB)
    assert huge.kind == "zero3_offload"
    assert decide_placement("auto", param_bytes=60 * GiB, world_size=1, free_bytes=80 * GiB).kind == "zero3_offload"
    assert decide_placement("zero3", param_bytes=1, world_size=1, free_bytes=GiB).reason.startswith("teacher.placement=zero3")
    with pytest.raises(ValueError, match="teacher.placement='zero' is not one of .* did you mean 'zero3'"):
        decide_placement("zero", param_bytes=1, world_size=1, free_bytes=1)


def test_teacher_ds_config_has_no_optimizer_and_offloads():
    assert teacher_ds_config("replicate", hidden_size=64, bf16=False)["zero_optimization"] == {"stage": 0}
    z3 = teacher_ds_config("zero3_offload", hidden_size=2048, bf16=True)
    assert z3["zero_optimization"]["stage"] == 3 and z3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert z3["zero_optimization"]["stage3_param_persistence_threshold"] == 20480
    assert "optimizer" not in z3 and z3["bf16"]["enabled"]


def test_complementary_split_is_a_partition_and_deterministic():
    masked = torch.rand(4, 300, generator=torch.Generator().manual_seed(0)) < 0.6
    a, b = complementary_split(masked, demo_ratio=0.3, generator=torch.Generator().manual_seed(5))
    a2, b2 = complementary_split(masked, demo_ratio=0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert not (a & b).any() and torch.equal(a | b, masked)
    assert abs(a.sum().item() / masked.sum().item() - 0.3) < 0.06
    with pytest.raises(ValueError, match="distill.demo_ratio=1.0 must lie in"):
        complementary_split(masked, demo_ratio=1.0, generator=torch.Generator())


def test_chunk_level_split_maps_to_teacher_tokens_and_merges():
    chunk_ids = torch.tensor([[0, 0, 1, 2, 2, -1], [0, 1, 1, -1, -1, -1]])
    a_chunks = torch.tensor([[True, False, True], [False, True, False]])
    assert chunks_to_tokens(a_chunks, chunk_ids).tolist() == [
        [True, True, False, True, True, False], [False, True, True, False, False, False]]
    first, second = torch.zeros(2, 6), torch.ones(2, 6)
    merged = merge_passes(first, second, chunks_to_tokens(a_chunks, chunk_ids))
    assert merged.tolist()[0] == [1, 1, 0, 1, 1, 0]


def test_target_logprobs_and_row_logits_only_on_needed_rows():
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(2, 5, 4, generator=g, dtype=torch.float64), torch.randn(11, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (2, 5), generator=g)
    rows = torch.tensor([[True, False, True, True, False], [False] * 5])
    lp = target_logprobs(h.flatten(0, 1), w, y.flatten(), rows.flatten(), chunk_rows=2).view(2, 5)
    full = torch.log_softmax(h @ w.t(), -1).gather(-1, y[..., None])[..., 0]
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, (full * rows).float())
    logits = row_logits(h, w, torch.tensor([[4, 0], [2, 9]]), vocab_limit=7)
    assert logits.shape == (2, 2, 7)
    torch.testing.assert_close(logits[1, 1], (h[1, 4] @ w[:7].t()).float())  # index 9 clamps to L - 1


@pytest.mark.slow
def test_zero3_comp_demo_gathers_the_teacher_once_per_micro_step(checkpoints, tmp_path):
    """Per micro-step with CompDemo, a rank receives at most 1.05 x teacher bytes x (world - 1) / world (one
    gather; two passes used to gather twice), and building the partitioned teacher broadcasts nothing."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "tide_ds" / "torch_extensions"))
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_port()),
           str(ROOT / "tests" / "teacher" / "traffic_worker.py"), str(checkpoints["llada2_moe"]), "llada2_moe",
           str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        one_gather = r["param_bytes"] * (r["world"] - 1) / r["world"]
        assert r["build"]["broadcast"] == 0, r["build"]
        for step in r["steps"]:
            assert 0.5 * one_gather < step["allgather"] <= 1.05 * one_gather, (step, one_gather)
            assert step["broadcast"] <= 4096  # DeepSpeed's small control messages, no parameter


def test_auto_placement_counts_host_memory_of_the_load():
    # a CPU replica keeps the teacher in host memory: the load needs replica + one group read and converted
    kw = dict(param_bytes=30 * GiB, world_size=8, free_bytes=80 * GiB, largest_group_bytes=2 * GiB,
              read_buffer_bytes=3 * GiB)
    assert decide_placement("auto", host_free_bytes=40 * GiB, **kw).kind == "replicate"  # on a GPU: 3 GiB
    on_cpu = decide_placement("auto", host_free_bytes=32 * GiB, on_cpu=True, **kw)
    assert on_cpu.kind == "zero3" and "a replica's load needs 33.00 GiB of host memory" in on_cpu.reason
    with pytest.raises(ValueError, match="fits no placement"):
        decide_placement("auto", host_free_bytes=2 * GiB, **kw)
    with pytest.raises(ValueError, match="teacher.placement=replicate needs 33.00 GiB of host memory"):
        decide_placement("replicate", host_free_bytes=32 * GiB, on_cpu=True, **kw)
