"""Shared inputs are built on rank 0 while the other ranks wait longer than the default group's timeout."""

import datetime
import os
import socket
import time

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # two processes, one of which waits 6 s on purpose


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=3))
    from tide_ds.builders import rank0_first

    def build():
        if dist.get_rank() == 0:
            time.sleep(6)  # twice the default group's timeout
        return f"built by {dist.get_rank()}"

    result = rank0_first(build)
    with open(f"{out}/{rank}", "w") as fh:
        fh.write(result)
    from tide_ds import dist as tide_dist

    tide_dist.destroy()


def testrank0_first_outlasts_the_default_timeout(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert (tmp_path / "0").read_text() == "built by 0"
    assert (tmp_path / "1").read_text() == "built by 1"
