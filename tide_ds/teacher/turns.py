"""The ranks of a node read the teacher's checkpoint in turns: ``teacher.load_concurrency`` at a time.

Node-local rank ``LOCAL_RANK`` reads in wave ``LOCAL_RANK // concurrency``; every rank of the job runs the
same number of waves (the largest over nodes) and, after each, one all-reduce that says whether some rank
failed. A failure ends every rank in that same wave with the failing rank's own error (type kept for
``ValueError``/``ConfigError``), so no rank is left waiting and failfast reports it once. A wave waits in a
collective of the default group, so one wave's reads must finish within ``train.dist_timeout_minutes``.
``concurrency <= 0`` (the default) or at least the node's rank count reads all at once, with no collective.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

import torch

from tide_ds import dist
from tide_ds.errors import ConfigError

logger = logging.getLogger(__name__)
T = TypeVar("T")


def local_rank_and_size() -> tuple[int, int]:
    """``(LOCAL_RANK, ranks on this node)``: ``LOCAL_WORLD_SIZE`` (torchrun, srun env) or ``LOCAL_SIZE`` (DeepSpeed)."""
    size = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"
    return dist.local_rank(), int(size)


def _device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def in_turns(read: Callable[[], T], *, concurrency: int) -> T:
    """``read()`` in this rank's turn (see the module docstring); every rank returns or raises in the same wave."""
    if concurrency <= 0 or not dist.is_initialized() or dist.world_size() == 1:
        return read()
    local_rank, local_size = local_rank_and_size()
    waves = torch.tensor([-(-local_size // concurrency)], dtype=torch.int64, device=_device())
    torch.distributed.all_reduce(waves, op=torch.distributed.ReduceOp.MAX)
    if int(waves.item()) == 1:
        return read()
    mine = local_rank // concurrency
    result: T | None = None
    error: BaseException | None = None
    for wave in range(int(waves.item())):
        if wave == mine:
            logger.info("reading the teacher checkpoint: wave %d of %d (%d rank(s) of a node at a time)", wave + 1,
                        int(waves.item()), concurrency)
            try:
                result = read()
            except Exception as err:  # noqa: BLE001 -- re-raised below, on every rank, after the wave's all-reduce
                error = err
        failed = torch.tensor([dist.rank() + 1 if error is not None else 0], dtype=torch.int64, device=_device())
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
        if int(failed.item()):
            src = int(failed.item()) - 1
            kind, text = dist.broadcast_object(
                (type(error).__name__, str(error)) if error is not None else None, src=src)
            if error is not None and dist.rank() == src:
                raise error
            cls = {"ConfigError": ConfigError, "ValueError": ValueError}.get(kind, RuntimeError)
            raise cls(text)
    return result  # type: ignore[return-value]
