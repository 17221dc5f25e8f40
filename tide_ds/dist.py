"""Process-group helpers. Every collective here is called by all ranks in the same order."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    """A TCP port free on localhost now (for MASTER_PORT of a local job)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def single_rank_env() -> dict[str, str]:
    """The rendezvous variables of a one-rank job on localhost (no launcher), on a free port."""
    return {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (identity without a process group) and return it."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: object, src: int = 0, group=None) -> object:
    """Broadcast a picklable object from ``src`` to every rank (of ``group``, default the world)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


_PATIENT_GROUP = None


def patient_group(hours: float = 12.0):
    """A gloo group over all ranks with a long timeout, for waits on slow one-rank work (building shared
    inputs: a demo world, a dataset, a tokenizer) that the default group's timeout (10 min under gloo, 30
    under NCCL) would turn into a crash. Created once (a collective: every rank must call it)."""
    global _PATIENT_GROUP
    if _PATIENT_GROUP is None and is_initialized():
        import datetime

        _PATIENT_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=hours))
    return _PATIENT_GROUP


def shm_buffer_path() -> str:
    """This rank's DeepSpeed CPU all-reduce buffer: ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``.

    DeepSpeed's shm comm op (CPU accelerator) creates it at ``init_distributed`` and never unlinks it (its
    ``shared_close`` is not called), so every CPU run would leave about 66 MiB in ``/dev/shm`` per rank.
    """
    return (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank()}")


_FAILED = False


def mark_failed() -> None:
    """This rank is leaving after an error: :func:`destroy` must not wait in a barrier for the others."""
    global _FAILED
    _FAILED = True


def unlink_shm_buffer() -> None:
    try:
        os.unlink(shm_buffer_path())
    except FileNotFoundError:
        pass  # GPU runs, or a backend without the shm op


def destroy() -> None:
    """Barrier, unlink this rank's shm all-reduce buffer, destroy the process group (no-op if not initialised).

    After the barrier no rank opens a peer's buffer any more (they do so only while initialising), and the
    mappings stay valid until each process exits, so unlinking the name is safe. After an error (an
    exception in flight, or :func:`mark_failed`) there is no barrier: the other ranks may never reach it.
    """
    if not dist.is_initialized():
        return
    import sys

    failed = _FAILED or sys.exc_info()[0] is not None
    if not failed:
        dist.barrier()
    unlink_shm_buffer()
    if not failed:
        dist.destroy_process_group()
