"""``teacher.load_concurrency``: two gloo ranks of one node read in turns, and fail together without a hang."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WORKER = textwrap.dedent("""
    import json, sys, time
    import torch
    from tide_ds import dist
    from tide_ds.teacher.turns import in_turns

    concurrency, fail_rank, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.distributed.init_process_group("gloo")
    rank, calls = dist.rank(), []

    def read():
        calls.append(time.time())
        time.sleep(0.4)
        if rank == fail_rank:
            raise ValueError(f"teacher checkpoint unreadable on rank {rank}")
        calls.append(time.time())
        return 10 + rank

    try:
        record = {"result": in_turns(read, concurrency=concurrency)}
    except Exception as err:
        record = {"error": f"{type(err).__name__}: {err}"}
    record.update(rank=rank, calls=calls)
    json.dump(record, open(f"{out}/rank{rank}.json", "w"))
    torch.distributed.destroy_process_group()
""")


def _run(tmp_path: Path, *, concurrency: int, fail_rank: int = -1) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(
        [sys.executable, "-c", WORKER, str(concurrency), str(fail_rank), str(tmp_path)], cwd=ROOT,
        env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)), stderr=subprocess.PIPE, text=True)
        for r in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("concurrency", [0, 1])
def test_ranks_of_a_node_read_in_turns(tmp_path, concurrency):
    r0, r1 = _run(tmp_path, concurrency=concurrency)
    assert (r0["result"], r1["result"]) == (10, 11)
    if concurrency == 1:
        assert r1["calls"][0] >= r0["calls"][1]  # rank 1 starts after rank 0 has finished
    else:
        assert r1["calls"][0] < r0["calls"][1] and r0["calls"][0] < r1["calls"][1]  # both read at once


def test_a_failed_read_ends_every_rank_in_the_same_wave(tmp_path):
    r0, r1 = _run(tmp_path, concurrency=1, fail_rank=0)
    assert r0["error"] == r1["error"] == "ValueError: teacher checkpoint unreadable on rank 0"
    assert len(r0["calls"]) == 1 and r1["calls"] == []  # rank 1 never started its own read
