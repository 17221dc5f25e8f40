"""The planner on header-only checkpoints of the real sizes (sparse files: no disk, no weights read)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from real_size_world import build_world  # noqa: E402

from tide_ds.config import build_config  # noqa: E402
from tide_ds.plan.__main__ import main as plan_main  # noqa: E402
from tide_ds.plan.memory import GIB, Cluster  # noqa: E402
from tide_ds.plan.planner import make_plan  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RECIPE_A = ROOT / "launch/recipes/paper_pipeline_a.yaml"
RECIPE_B = ROOT / "launch/recipes/paper_pipeline_b.yaml"
LLADA2_PARAMS, WEDLM_PARAMS, STUDENT_PARAMS = 16_255_638_528, 8_190_735_360, 596_049_920
LLADA2_ROUTER_PARAMS = 19 * 256 * 2048  # kept in fp32 (docs/models.md §3.3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("real_size"))


def _overrides(world, pipeline: str, *extra: str) -> list[str]:
    teacher, data = ("llada2", "data_a") if pipeline == "A" else ("wedlm", "data_b")
    return [f"--model.path={world['student']}", "--model.tokenizer=qwen3", f"--teacher.path={world[teacher]}",
            f"--data.dataset={world[data]}", *extra]


def _plan(world, pipeline: str, *, ranks: int, gib: float, extra: tuple[str, ...] = ()):
    cfg = build_config(recipe=RECIPE_A if pipeline == "A" else RECIPE_B, overrides=_overrides(world, pipeline, *extra))
    return make_plan(cfg, Cluster(world_size=ranks, gpus_per_node=min(8, ranks), gpu_bytes=int(gib * GIB),
                                  host_bytes_per_node=1024 * GIB))


def test_real_parameter_counts_from_headers(world):
    a = _plan(world, "A", ranks=8, gib=80)
    b = _plan(world, "B", ranks=8, gib=80)
    assert a.facts.teacher.footprint.params == LLADA2_PARAMS
    assert b.facts.teacher.footprint.params == WEDLM_PARAMS
    assert a.facts.student.params == b.facts.student.params == STUDENT_PARAMS
    fp = a.facts.teacher.footprint
    assert fp.largest_layer_params == 819_466_496  # one MoE layer: 256 experts + shared + router + attention
    assert fp.param_bytes == 2 * LLADA2_PARAMS + 2 * LLADA2_ROUTER_PARAMS
    assert fp.stored_bytes == 2 * (LLADA2_PARAMS + 19 * 256)  # bf16 on disk, expert_bias buffers included
    assert b.facts.teacher.footprint.largest_unit_bytes == 151936 * 4096 * 2  # the embedding outweighs a layer


def test_per_rank_numbers_match_hand_arithmetic(world):
    plan = _plan(world, "A", ranks=8, gib=24)
    assert plan.placement == "zero3"
    fp = plan.facts.teacher.footprint
    rows = {r.kind: r for r in plan.teacher_rows}
    assert rows["zero3"].gpu_resident == math.ceil(fp.param_bytes / 8)
    assert rows["zero3"].gathered_unit == fp.largest_layer_bytes == 819_466_496 * 2 + 256 * 2048 * 2
    assert rows["zero3"].allgather_per_step == fp.param_bytes * 7 // 8  # one pass, accumulation 1
    assert rows["replicate"].allgather_per_step == 0 and rows["replicate"].gpu_resident == fp.param_bytes
    parts = {name: b for name, b, _ in plan.gpu_parts}
    p = STUDENT_PARAMS
    assert parts["student model states (ZeRO-2)"] == 2 * p + int(18 * p / 8)
    per_token = 5 * 1024 + 4 * 16 * 128 + 4 * 8 * 128 + 5 * 3072
    assert parts["student activations"] == 8 * 1024 * 28 * per_token * 2
    # host while loading onto a GPU: each tensor is read through one 64 MiB buffer, nothing else is staged;
    # an offloaded partition stays on the host as well; a node's 8 ranks read at once (load_concurrency=0)
    buffer = 64 * 2**20
    assert fp.load_buffer_bytes == buffer
    assert rows["zero3"].host_load_rank == rows["replicate"].host_load_rank == buffer
    assert rows["replicate"].host_load_node == 8 * buffer
    assert rows["zero3_offload"].host_load_rank == math.ceil(fp.param_bytes / 8) + buffer
    assert rows["zero3_offload"].host_load_node == 8 * math.ceil(fp.param_bytes / 8) + 8 * buffer
    turns = _plan(world, "A", ranks=8, gib=24, extra=("--teacher.load_concurrency=2",))
    offload = next(r for r in turns.teacher_rows if r.kind == "zero3_offload")
    assert offload.host_load_node == 8 * math.ceil(fp.param_bytes / 8) + 2 * buffer  # two buffers live at once


@pytest.mark.parametrize("ranks,gib,kind,fits", [
    (8, 80, "replicate", True), (8, 141, "replicate", True), (8, 22.35, "zero3", False), (16, 40, "zero3", True),
])
def test_placement_decisions_on_paper_clusters(world, ranks, gib, kind, fits):
    extra = ("--train.micro_batch_size=4",) if ranks == 16 else ()
    plan = _plan(world, "A", ranks=ranks, gib=gib, extra=extra)
    assert plan.placement == kind and plan.fits is fits, plan.problems
    if not fits:  # 8 x 24 GB: the reason names the GPU total, and a smaller micro-batch fits at the same global batch
        assert "GPU memory" in plan.problems[0] and "train.micro_batch_size" in plan.problems[0]
        smaller = _plan(world, "A", ranks=ranks, gib=gib, extra=("--train.micro_batch_size=4",))
        assert smaller.fits and smaller.facts.gradient_accumulation_steps == 2 and smaller.facts.global_batch_size == 64


def test_pipeline_b_comp_demo_gathers_once_and_counts_its_logits(world):
    plan = _plan(world, "B", ranks=8, gib=80, extra=("--teacher.placement=zero3", "--train.global_batch_size=160"))
    fp = plan.facts.teacher.footprint
    z3 = next(r for r in plan.teacher_rows if r.kind == "zero3")
    # CompDemo's two passes are one forward: one gather per micro-step, two micro-steps per optimizer step
    assert plan.facts.gradient_accumulation_steps == 2
    assert z3.allgather_per_step == 2 * (fp.param_bytes * 7 // 8)
    parts = {name: b for name, b, _ in plan.gpu_parts}
    tokens = 2 * 10 * 2 * 768  # [2B, 2 L_t]: both passes, WeDLM's [x_0 ; x_t]
    assert parts["teacher forward working memory"] == tokens * (4 * 4096 + 2 * 12288) * 2 + 2 * 256 * 2**20
    assert parts["teacher row logits (pipeline B)"] == 10 * 512 * 151646 * 4 * 3


def test_epochs_and_global_batch_give_the_steps(world):
    plan = _plan(world, "B", ranks=16, gib=80, extra=("--train.micro_batch_size=5",))
    assert plan.facts.global_batch_size == 80 and plan.facts.gradient_accumulation_steps == 1
    assert plan.facts.max_steps == math.ceil(3 * 16 / 80)


def test_cli_exit_codes_and_reasons(world, capsys, tmp_path):
    before = sorted(os.listdir(tmp_path))
    assert plan_main(["--recipe", str(RECIPE_A), "--world-size", "8", *_overrides(world, "A")]) == 0
    out = capsys.readouterr().out
    assert "auto -> replicate" in out and "FITS: replicate" in out and "| zero3 " in out
    assert plan_main(["--recipe", str(RECIPE_A), "--world-size", "8", "--gpu-mem-gib", "22.35",
                      *_overrides(world, "A")]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert plan_main(["--recipe", str(RECIPE_A), "--world-size", "16", *_overrides(world, "A")]) == 2
    assert "train.global_batch_size=64 is not divisible by train.micro_batch_size * world size = 8 * 16" in (
        capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("override,message", [
    ("--teacher.mask_token_id=156000", "teacher.mask_token_id=156000 but the teacher at .* declares mask_token_id=156895"),
    ("--data.teacher_seq_len=768", "data.teacher_seq_len=768 but data.dataset=.* teacher sequences of length 1024"),
    ("--data.seq_len=256", "data.seq_len=256 but split 'train' of data.dataset holds sequences of length 512"),
    ("--teacher.family=wedlm", "teacher.family='wedlm' but .* model_type='llada2_moe'"),
])
def test_bad_ids_and_lengths_fail_before_any_weight(world, override, message):
    with pytest.raises(ValueError, match=message):
        _plan(world, "A", ranks=8, gib=80, extra=(override,))


def test_wedlm_without_a_mask_id_is_refused_before_loading(world):
    with pytest.raises(ValueError, match="declares no mask token .* set --teacher.mask_token_id"):
        _plan(world, "B", ranks=8, gib=80, extra=("--teacher.mask_token_id=-1",))


def test_non_aligned_pipeline_b_needs_no_teacher_columns(world, tmp_path):
    import datasets

    plain = tmp_path / "plain"
    ds = datasets.load_from_disk(str(world["data_b"]))
    datasets.DatasetDict({k: v.select_columns(["input_ids", "labels"]) for k, v in ds.items()}).save_to_disk(str(plain))
    plan = _plan(world, "B", ranks=8, gib=80, extra=(f"--data.dataset={plain}", "--distill.mode=kl"))
    assert plan.fits and plan.facts.data.teacher_seq_len == 0
    with pytest.raises(ValueError, match="lacks the column"):
        _plan(world, "B", ranks=8, gib=80, extra=(f"--data.dataset={plain}",))


def test_submit_plans_before_queueing(world, capsys):
    sys.path.insert(0, str(ROOT / "launch" / "slurm"))
    from submit import main as submit

    train = ["--recipe", str(RECIPE_A), *_overrides(world, "A")]
    assert submit(["--nodes", "1", "--gpu-mem-gib", "80", "--dry-run", "--", *train]) == 0
    captured = capsys.readouterr()
    assert "auto -> replicate" in captured.err and "sbatch" in captured.out
    assert submit(["--nodes", "1", "--gpu-mem-gib", "22.35", "--dry-run", "--", *train]) == 2
    assert "the run does not fit" in capsys.readouterr().err
    assert submit(["--nodes", "2", "--dry-run", "--", *train]) == 2  # the launch's checks: 64 over 2 x 8 x 8
    assert "train.global_batch_size=64 is not divisible" in capsys.readouterr().err
