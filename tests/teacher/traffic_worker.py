"""Worker of the 2-rank traffic test: bytes a ZeRO-3 teacher receives per CompDemo micro-step (and at build).

Wraps DeepSpeed's communication backend (``deepspeed.comm.comm.cdb``, below every ZeRO-3 gather) and counts
what this rank receives: ``output - input`` bytes of every all-gather, the whole tensor of every broadcast.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch

from tide_ds import dist
from tide_ds.models.teachers import get_family
from tide_ds.teacher.engine import TeacherEngine
from tide_ds.teacher.forward import complementary_split

RECEIVED = {"allgather": 0, "broadcast": 0}


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def count_backend() -> None:
    from deepspeed.comm import comm

    cdb = comm.cdb
    into, gather, base, coalesced, bcast = (cdb.all_gather_into_tensor, cdb.all_gather, cdb.all_gather_base,
                                            cdb.all_gather_coalesced, cdb.broadcast)

    def all_gather_into_tensor(output_tensor, input_tensor, *a, **kw):
        RECEIVED["allgather"] += _nbytes(output_tensor) - _nbytes(input_tensor)
        return into(output_tensor, input_tensor, *a, **kw)

    def all_gather(tensor_list, tensor, *a, **kw):
        RECEIVED["allgather"] += sum(_nbytes(t) for t in tensor_list) - _nbytes(tensor)
        return gather(tensor_list, tensor, *a, **kw)

    def all_gather_base(output_tensor, input_tensor, *a, **kw):
        RECEIVED["allgather"] += _nbytes(output_tensor) - _nbytes(input_tensor)
        return base(output_tensor, input_tensor, *a, **kw)

    def all_gather_coalesced(output_tensors, input_tensors, *a, **kw):
        RECEIVED["allgather"] += sum(_nbytes(o) - _nbytes(i) for o, i in zip(output_tensors, input_tensors))
        return coalesced(output_tensors, input_tensors, *a, **kw)

    def broadcast(tensor, *a, **kw):
        RECEIVED["broadcast"] += _nbytes(tensor)
        return bcast(tensor, *a, **kw)

    cdb.all_gather_into_tensor, cdb.all_gather, cdb.all_gather_base = all_gather_into_tensor, all_gather, all_gather_base
    cdb.all_gather_coalesced, cdb.broadcast = all_gather_coalesced, broadcast


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    ckpt, family, out = Path(args[0]), args[1], Path(args[2])
    deepspeed.init_distributed(dist_backend="gloo")
    count_backend()
    rank = dist.rank()
    vocab = get_family(family).plan(ckpt).config.vocab_size
    g = torch.Generator().manual_seed(100 + rank)
    clean = torch.randint(0, vocab - 100, (2, 32), generator=g)
    masked = torch.rand(2, 32, generator=g) < (0.5 if rank == 0 else 0.0)  # rank 1: nothing masked, same passes

    teacher = TeacherEngine.build(ckpt, family=family, placement="zero3", block_size=8)
    build = dict(RECEIVED)
    steps = []
    for step in range(3):
        before = dict(RECEIVED)
        a, b = complementary_split(masked, demo_ratio=0.5, generator=torch.Generator().manual_seed(step + rank))
        lp = teacher.comp_demo_target_logprobs(clean, a, b)
        assert torch.isfinite(lp).all()
        steps.append({k: RECEIVED[k] - before[k] for k in RECEIVED})
    (out / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "world": dist.world_size(), "param_bytes": teacher.report.param_bytes, "build": build,
        "steps": steps}))
    dist.destroy()


if __name__ == "__main__":
    main()
