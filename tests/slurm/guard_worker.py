"""One rank of the PreemptionGuard consistency test (run by test_preemption.py, never collected by pytest).

usage: RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python guard_worker.py OUT SIGNAL_RANK SIGNAL_STEP STEPS

Every rank runs STEPS "steps" (a little compute on rank-specific data), asks should_stop() after each
one and records the answers; rank SIGNAL_RANK sends itself SIGUSR1 while in step SIGNAL_STEP. Writes
``{"stops": [...], "received": name-or-null, "agreed": name}`` to OUT.<rank>.json.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import torch
import torch.distributed as tdist

from tide_ds.trainer.preemption import PreemptionGuard


def main() -> None:
    out, signal_rank, signal_step, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    guard = PreemptionGuard([signal.SIGUSR1, signal.SIGTERM]).install()  # before the process group, as in train()
    tdist.init_process_group("gloo")
    rank = tdist.get_rank()
    x = torch.arange(1000, dtype=torch.float64) * (rank + 1)  # ranks' data differ
    stops = []
    for step in range(1, steps + 1):
        x = torch.sin(x) + 1.0
        if rank == signal_rank and step == signal_step:
            os.kill(os.getpid(), signal.SIGUSR1)
        stops.append(guard.should_stop())
    result = {"stops": stops, "received": guard.received.name if guard.received else None,
              "agreed": guard.agreed_signal_name() if any(stops) else None}
    guard.uninstall()
    result["handler_restored"] = signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
    with open(f"{out}.{rank}.json", "w") as fh:
        json.dump(result, fh)
    from tide_ds import dist

    dist.destroy()


if __name__ == "__main__":
    main()
