"""Cost of the per-step preemption check: PreemptionGuard.should_stop() on 2 gloo ranks (CPU).

    python tests/slurm/bench_preempt_check.py            # starts 2 ranks itself, prints one line

Reference measured in the same run: a bare all_reduce of one int32 (the collective the check is built
on), and dist.barrier(). The check adds a flag fill and one .item() on a CPU tensor.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time


def worker() -> None:
    import torch
    import torch.distributed as tdist

    from tide_ds.trainer.preemption import PreemptionGuard

    tdist.init_process_group("gloo")
    guard = PreemptionGuard([signal.SIGUSR1]).install()
    flag = torch.zeros(1, dtype=torch.int32)
    n = 2000

    def timed(fn) -> float:
        for _ in range(50):
            fn()
        tdist.barrier()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e6

    results = {
        "should_stop": timed(guard.should_stop),
        "all_reduce(int32[1])": timed(lambda: tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)),
        "barrier": timed(tdist.barrier),
    }
    if tdist.get_rank() == 0:
        ref = results["all_reduce(int32[1])"]
        print(" | ".join(f"{k} {v:.1f} us" for k, v in results.items()) + f" | should_stop / all_reduce = {results['should_stop'] / ref:.2f}")
    guard.uninstall()
    tdist.destroy_process_group()


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen([sys.executable, __file__, "--worker"], env={
            **os.environ, "RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        for r in range(2)
    ]
    sys.exit(max(p.wait() for p in procs))


if __name__ == "__main__":
    worker() if "--worker" in sys.argv else main()
