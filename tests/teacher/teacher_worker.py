"""Worker for the 2-rank teacher tests (run by ``deepspeed --num_gpus 2``; see test_teacher_engine.py).

Each rank gets different data (rank 1 has no masked token at all), builds the teacher engine with the
requested placement beside a ZeRO-3 student engine, and writes its outputs next to those of an
unsharded single-process replica of the same checkpoint.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch

from tide_ds import dist
from tide_ds.models.teachers import get_family
from tide_ds.teacher.engine import TeacherEngine, TeacherModule
from tide_ds.teacher.forward import complementary_split
from tide_ds.teacher.turns import local_rank_and_size


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    ckpt, family, placement, out = Path(args[0]), args[1], args[2], Path(args[3])
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.rank()
    fam = get_family(family)
    vocab = fam.plan(ckpt).config.vocab_size
    g = torch.Generator().manual_seed(100 + rank)
    clean = torch.randint(0, vocab - 100, (2, 32), generator=g)
    masked = torch.rand(2, 32, generator=g) < 0.5
    if rank == 1:
        masked[:] = False  # this rank has nothing to predict, yet runs the same passes
    attention = torch.ones(2, 32, dtype=torch.long)
    attention[1, 24:] = 0

    # the replica is read in turns (teacher.load_concurrency=1: rank 1 after rank 0), the partitions at once
    teacher = TeacherEngine.build(ckpt, family=family, placement=placement, block_size=8,
                                  load_concurrency=1 if placement == "replicate" else 0)
    lp = teacher.target_logprobs(clean, masked, attention_mask=attention)
    a, b = complementary_split(masked, demo_ratio=0.5, generator=torch.Generator().manual_seed(7 + rank))
    lp_demo = teacher.comp_demo_target_logprobs(clean, a, b, attention_mask=attention)

    # a ZeRO-3 student trains beside the teacher: teacher forward, student step, three times
    from tide_ds.config import build_config
    from tide_ds.models.qwen3 import BD3LMStudent, build_student, tiny_student_config
    from tide_ds.trainer.engine import initialize_engine
    from tide_ds.trainer.student import CETargets, DiffusionCEModule

    torch.manual_seed(0)
    student = BD3LMStudent(build_student(tiny_student_config()), block_size=8)
    cfg = build_config(overrides=["--train.ds_config=ds_configs/zero3.json", "--train.micro_batch_size=2"])
    engine, _ = initialize_engine(cfg, DiffusionCEModule(student), world_size=dist.world_size())
    student_losses = []
    for _ in range(3):
        teacher.target_logprobs(clean, masked, attention_mask=attention)
        x0 = clean % 1000
        loss, _, _ = engine(targets=CETargets(x_t=torch.where(masked, 1010, x0), x_0=x0, coeff=masked.float() / 64))
        engine.backward(loss)
        engine.step()
        student_losses.append(loss.item())

    # the unsharded single-process reference
    replica = TeacherModule(fam.load(ckpt), fam, block_size=8, concat_order="x0_xt", vocab_limit=None)
    ref_lp, _ = replica(teacher.noised(clean, masked), attention, clean, masked, clean)
    ref_a, _ = replica(teacher.noised(clean, a), attention, clean, a, clean)
    ref_b, _ = replica(teacher.noised(clean, b), attention, clean, b, clean)
    ref_demo = torch.where(a, ref_a, ref_b)
    result = {
        "rank": rank,
        "placement": teacher.report.placement.kind,
        "lp_max_diff": (lp - ref_lp).abs().max().item(),
        "demo_max_diff": (lp_demo - ref_demo).abs().max().item(),
        "lp_nonzero_rows": int((lp != 0).sum()),
        "masked": int(masked.sum()),
        "demo_rows_from_both": bool((a.any() and b.any()) or not masked.any()),
        "finite": bool(torch.isfinite(lp).all() and torch.isfinite(lp_demo).all()),
        "student_losses": student_losses,
        "param_bytes": teacher.report.param_bytes,
        "peak_rss_increase": teacher.report.peak_rss_increase,
        "local_rank_and_size": list(local_rank_and_size()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy()


if __name__ == "__main__":
    main()
