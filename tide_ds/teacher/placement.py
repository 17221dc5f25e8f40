"""Where the frozen teacher lives: a replica per rank, ZeRO-3 partitions, or ZeRO-3 with CPU offload.

``auto`` decides from the teacher's parameter bytes, the world size and the free memory of the device
(the host for CPU runs), and says why. The baseline it improves on is TRL's rule ("stage 3 iff the
student runs stage 3"): a 0.6B student under ZeRO-2 can still need a sharded 16B teacher, and a small
teacher never needs the all-gathers of ZeRO-3 (docs/anchors.md §3).
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


def host_load_bytes(kind: str, *, param_bytes: int, world_size: int, read_buffer_bytes: int, on_cpu: bool) -> int:
    """Peak host memory of one rank while the teacher loads (:mod:`tide_ds.teacher.loading`, ``load_partitioned``).

    Every placement reads the checkpoint straight into the parameters (:mod:`tide_ds.teacher.reader`), through
    at most one ``read_buffer_bytes`` host buffer. What the rank keeps on the host comes on top: the replica
    when the run is on the CPU, the partition when it is on the CPU or offloaded.
    """
    kept = 0
    if kind == "replicate" and on_cpu:
        kept = param_bytes
    elif kind == "zero3_offload" or (kind == "zero3" and on_cpu):
        kept = -(-param_bytes // world_size)
    return kept + read_buffer_bytes


def decide_placement(
    requested: str,
    *,
    param_bytes: int,
    world_size: int,
    free_bytes: int,
    largest_group_bytes: int = 0,
    host_free_bytes: int | None = None,
    read_buffer_bytes: int = 0,
    on_cpu: bool = False,
) -> Placement:
    """Pick the teacher placement; ``requested`` other than ``auto`` is taken as given.

    Device memory: a replica must fit in :data:`TEACHER_MEMORY_FRACTION` of the free memory, a ZeRO-3
    partition plus the largest gathered unit likewise; else the parameters are offloaded. Host memory:
    with ``host_free_bytes`` (one rank's share of the node), a placement whose load
    (:func:`host_load_bytes`) does not fit there is skipped; when none fits, ``ValueError``.

    Args:
        param_bytes: bytes of the teacher's parameters in the dtype it runs in.
        world_size: ranks that share the partitions.
        free_bytes: device memory one rank may use (see :func:`free_memory_bytes`); every rank must pass the
            same value (take the minimum over ranks) so that all ranks decide alike.
        largest_group_bytes: the largest unit ZeRO-3 gathers at once (one decoder layer; for an MoE layer all
            its experts; or the embedding).
        host_free_bytes: host memory one rank may use while loading (``None``: not checked).
        read_buffer_bytes: the host buffer a load reads through (``Footprint.load_buffer_bytes``).
        on_cpu: the run has no accelerator (a replica then lives in host memory).
    """
    check_placement(requested)
    gib = 2**30

    def host(kind: str) -> int:
        return host_load_bytes(kind, param_bytes=param_bytes, world_size=world_size, read_buffer_bytes=read_buffer_bytes,
                               on_cpu=on_cpu)

    def host_fits(kind: str) -> bool:
        return host_free_bytes is None or host(kind) <= host_free_bytes

    host_note = "" if host_free_bytes is None else f", {host_free_bytes / gib:.2f} GiB host memory per rank"
    if requested != "auto":
        if not host_fits(requested):
            raise ValueError(
                f"teacher.placement={requested} needs {host(requested) / gib:.2f} GiB of host memory per rank while "
                f"loading, more than the {host_free_bytes / gib:.2f} GiB available; use fewer ranks per node or "
                "teacher.placement=auto"
            )
        return Placement(requested, f"teacher.placement={requested} was requested")
    budget = TEACHER_MEMORY_FRACTION * free_bytes
    if param_bytes <= budget and host_fits("replicate"):
        return Placement(
            "replicate",
            f"teacher {param_bytes / gib:.2f} GiB fits in half of the {free_bytes / gib:.2f} GiB free per rank"
            f"{host_note}: a replica per rank needs no all-gathers",
        )
    why = (f"teacher {param_bytes / gib:.2f} GiB exceeds half of the {free_bytes / gib:.2f} GiB free per rank"
           if param_bytes > budget else
           f"a replica's load needs {host('replicate') / gib:.2f} GiB of host memory per rank{host_note}")
    sharded = param_bytes / world_size + largest_group_bytes
    if world_size > 1 and sharded <= budget and host_fits("zero3"):
        return Placement(
            "zero3",
            f"{why}; ZeRO-3 over {world_size} ranks holds {sharded / gib:.2f} GiB per rank (partition + one gathered "
            "unit)",
        )
    if host_fits("zero3_offload"):
        return Placement(
            "zero3_offload",
            f"{why}; it does not fit on {world_size} rank(s) with {free_bytes / gib:.2f} GiB free each even when "
            f"partitioned: its parameters are offloaded to CPU memory ({host('zero3_offload') / gib:.2f} GiB per rank)",
        )
    raise ValueError(
        f"the teacher ({param_bytes / gib:.2f} GiB) fits no placement: partitioned over {world_size} rank(s) it "
        f"needs {sharded / gib:.2f} GiB of device memory per rank (half of {free_bytes / gib:.2f} GiB is available) "
        f"and offloaded {host('zero3_offload') / gib:.2f} GiB of host memory per rank{host_note}; use more ranks or "
        "larger machines"
    )


def teacher_ds_config(kind: str, *, hidden_size: int, bf16: bool, largest_unit_params: int = 0) -> dict[str, Any]:
    """DeepSpeed config of the inference-only teacher engine (no optimizer, no gradients).

    ``largest_unit_params`` (the largest module gathered at once: an MoE layer with all its experts, or the
    embedding) sizes the prefetch bucket to one such unit and lets two live at once (the one running and
    the one prefetched), instead of DeepSpeed's defaults, which are far smaller than one LLaDA2 MoE layer.
    """
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,  # required by DeepSpeed; unused without an optimizer
        "steps_per_print": 10**9,
        "bf16": {"enabled": bf16},
    }
    if kind == "replicate":
        ds["zero_optimization"] = {"stage": 0}
        return ds
    h = hidden_size
    unit = max(largest_unit_params, int(0.9 * h * h))
    zero: dict[str, Any] = {
        "stage": 3,
        # Frozen weights: prefetch one unit ahead, keep small tensors (norms, routers' biases) resident.
        "stage3_prefetch_bucket_size": unit,
        "stage3_max_live_parameters": max(2 * unit, 10**9),
        "stage3_param_persistence_threshold": 10 * h,
        "reduce_bucket_size": h * h,
    }
    if kind == "zero3_offload":
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    ds["zero_optimization"] = zero
    return ds
