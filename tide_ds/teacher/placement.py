"""Where the frozen teacher lives: a replica per rank, ZeRO-3 partitions, or ZeRO-3 with CPU offload.

``auto`` decides from the teacher's parameter bytes, the world size and the free memory of the device
(the host for CPU runs), and says why. The baseline it improves on is TRL's rule ("stage 3 iff the
student runs stage 3"): a 0.6B student under ZeRO-2 can still need a sharded 16B teacher, and a small
teacher never needs the all-gathers of ZeRO-3 (spec ANCHORS.md §3).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from tide_ds.choices import TeacherPlacement, choices

logger = logging.getLogger(__name__)

PLACEMENTS = choices(TeacherPlacement)

#: Fraction of free memory the teacher may take; the rest is for the student, activations and logits.
TEACHER_MEMORY_FRACTION = 0.5


@dataclass(frozen=True)
class Placement:
    kind: str  # replicate | zero3 | zero3_offload
    reason: str


def check_placement(requested: str) -> None:
    if requested not in PLACEMENTS:
        import difflib

        close = difflib.get_close_matches(requested, PLACEMENTS, n=1, cutoff=0.4)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"teacher.placement={requested!r} is not one of {list(PLACEMENTS)}{hint}")


def free_memory_bytes(device: torch.device, *, local_world_size: int) -> int:
    """Free memory one rank may plan with: the device's free memory, or the host's share per local rank."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as fh:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in fh}
    return info.get("MemAvailable", info.get("MemFree", 0)) // max(1, local_world_size)


def decide_placement(
    requested: str,
    *,
    param_bytes: int,
    world_size: int,
    free_bytes: int,
    largest_group_bytes: int = 0,
) -> Placement:
    """Pick the teacher placement; ``requested`` other than ``auto`` is taken as given.

    Args:
        param_bytes: bytes of the teacher's parameters in the dtype it runs in.
        world_size: ranks that share the partitions.
        free_bytes: memory one rank may use (see :func:`free_memory_bytes`); every rank must pass the same
            value (take the minimum over ranks) so that all ranks decide alike.
        largest_group_bytes: the largest unit ZeRO-3 gathers at once (one decoder layer; for an MoE layer all
            its experts).
    """
    check_placement(requested)
    gib = 2**30
    budget = TEACHER_MEMORY_FRACTION * free_bytes
    if requested != "auto":
        return Placement(requested, f"teacher.placement={requested} was requested")
    if param_bytes <= budget:
        return Placement(
            "replicate",
            f"teacher {param_bytes / gib:.2f} GiB fits in half of the {free_bytes / gib:.2f} GiB free per rank: "
            "a replica per rank needs no all-gathers",
        )
    sharded = param_bytes / world_size + largest_group_bytes
    if world_size > 1 and sharded <= budget:
        return Placement(
            "zero3",
            f"teacher {param_bytes / gib:.2f} GiB exceeds half of the {free_bytes / gib:.2f} GiB free per rank; "
            f"ZeRO-3 over {world_size} ranks holds {sharded / gib:.2f} GiB per rank (partition + one gathered layer)",
        )
    return Placement(
        "zero3_offload",
        f"teacher {param_bytes / gib:.2f} GiB does not fit on {world_size} rank(s) with {free_bytes / gib:.2f} GiB "
        "free each even when partitioned; its parameters are offloaded to CPU memory",
    )


def teacher_ds_config(kind: str, *, hidden_size: int, bf16: bool) -> dict[str, Any]:
    """DeepSpeed config of the inference-only teacher engine (no optimizer, no gradients)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,  # required by DeepSpeed; unused without an optimizer
        "steps_per_print": 10**9,
        "bf16": {"enabled": bf16},
    }
    if kind == "replicate":
        ds["zero_optimization"] = {"stage": 0}
        return ds
    h = hidden_size
    zero: dict[str, Any] = {
        "stage": 3,
        # Frozen weights: prefetch about one layer ahead, keep small tensors (norms, routers) resident.
        "stage3_prefetch_bucket_size": int(0.9 * h * h),
        "stage3_param_persistence_threshold": 10 * h,
        "reduce_bucket_size": h * h,
    }
    if kind == "zero3_offload":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds["zero_optimization"] = zero
    return ds
