"""Per-rank memory and traffic arithmetic of a run, from the sizes :mod:`tide_ds.plan.checks` found.

Exact where the quantity is a byte count (parameters, partitions, gathered bytes, logits), DeepSpeed's own
estimators for the student's ZeRO model states, and labelled estimates for activations and working
buffers (formulas in each docstring). GiB = 2**30 bytes throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

from tide_ds.teacher.loading import Footprint
from tide_ds.teacher.placement import TEACHER_MEMORY_FRACTION, host_load_bytes

GIB = 2**30
#: Logits tile of the row-tiled loss paths (``chunk_rows=0`` picks about 256 MiB); two live at once.
LOSS_TILE_BYTES = 256 * 2**20
PLACEMENT_KINDS = ("replicate", "zero3", "zero3_offload")


@dataclass(frozen=True)
class Cluster:
    world_size: int
    gpus_per_node: int
    gpu_bytes: int
    host_bytes_per_node: int

    @property
    def nodes(self) -> int:
        return -(-self.world_size // self.gpus_per_node)


def student_model_states(
    *, stage: int, params: int, largest_layer_params: int, cluster: Cluster, offload_optimizer: bool
) -> tuple[int, int]:
    """``(GPU bytes per rank, host bytes per node)`` of the student's model states, from DeepSpeed's estimators.

    Stage 0-2: ``estimate_zero2_model_states_mem_needs`` (bf16 parameters + fp32 master, gradients and Adam
    moments, partitioned as stage 2 does); stage 3: ``estimate_zero3_model_states_mem_needs``.
    """
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu = estimate_zero3_model_states_mem_needs(
            params, largest_layer_params, num_gpus_per_node=cluster.gpus_per_node, num_nodes=cluster.nodes,
            cpu_offload=offload_optimizer, cpu_offload_params=False, zero_init=True,
        )
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            params, num_gpus_per_node=cluster.gpus_per_node, num_nodes=cluster.nodes, cpu_offload=offload_optimizer,
        )
    return int(gpu), int(cpu)


def per_token_layer_elements(fp: Footprint) -> int:
    """Activation elements one token keeps per decoder layer for the backward (estimate, no recomputation).

    ``5 D`` (the two norms' inputs and outputs, the residual) + ``4 q`` (query before/after its norm and
    RoPE, attention output, o_proj input) + ``4 kv`` (key before/after norm and RoPE, value, attention's
    saved copies) + ``5 I`` (gate, up, SiLU(gate), their product, down_proj input).
    """
    return 5 * fp.hidden + 4 * fp.q_dim + 4 * fp.kv_dim + 5 * fp.intermediate


def student_activation_bytes(fp: Footprint, *, micro_batch: int, seq_len: int, itemsize: int = 2) -> int:
    """Saved activations of one micro-batch: ``micro x 2L x layers x per_token_layer_elements x itemsize``."""
    return micro_batch * 2 * seq_len * fp.layers * per_token_layer_elements(fp) * itemsize


def student_loss_bytes(fp: Footprint, *, micro_batch: int, seq_len: int) -> int:
    """The fused LM-head loss: fp32 head gradient ``V x D``, fp32 hidden gradient of the ``x_t`` rows, two tiles."""
    return fp.vocab * fp.hidden * 4 + micro_batch * seq_len * fp.hidden * 4 + 2 * LOSS_TILE_BYTES


def teacher_forward_bytes(fp: Footprint, *, micro_batch: int, tokens: int, itemsize: int) -> int:
    """No-grad working memory of one teacher pass: ``micro x tokens x (4 D + 2 max(I, q + 2 kv)) x itemsize``
    (residual, normed input, layer output and the widest pair of intermediates live at once) + two logits tiles."""
    width = 4 * fp.hidden + 2 * max(fp.intermediate, fp.q_dim + 2 * fp.kv_dim)
    return micro_batch * tokens * width * itemsize + 2 * LOSS_TILE_BYTES


def teacher_logit_bytes(*, micro_batch: int, rows: int, vocab: int, comp_demo: bool) -> int:
    """Pipeline B's fp32 teacher row logits ``[B, N, V']``: one pass, or CompDemo's two passes and their merge."""
    return micro_batch * rows * vocab * 4 * (3 if comp_demo else 1)


@dataclass(frozen=True)
class TeacherRow:
    """One placement of the teacher on one rank."""

    kind: str
    gpu_resident: int  # replica or partition kept on the device
    gathered_unit: int  # the largest unit gathered at once (ZeRO-3)
    host_load_rank: int  # peak host memory of a rank while loading
    host_load_node: int
    allgather_per_step: int  # bytes a rank receives per optimizer step
    host_to_device_per_step: int  # offloaded parameters copied in per optimizer step

    @property
    def gpu_peak(self) -> int:
        return self.gpu_resident + self.gathered_unit


def teacher_rows(fp: Footprint, *, cluster: Cluster, forwards_per_step: int, load_concurrency: int = 0
                 ) -> list[TeacherRow]:
    """The teacher under each placement; a ZeRO-3 forward gathers every parameter once, so a rank receives
    ``teacher bytes x (world - 1) / world`` per forward.

    Host memory of a node while loading: what each local rank keeps on the host (the offloaded partition)
    plus one read buffer per rank reading at once (``load_concurrency``, 0 = all local ranks;
    :mod:`tide_ds.teacher.turns`).
    """
    w = cluster.world_size
    local = min(w, cluster.gpus_per_node)
    loading = local if load_concurrency <= 0 else min(load_concurrency, local)
    partition = -(-fp.param_bytes // w)
    gathered = fp.param_bytes * (w - 1) // w  # what a rank receives in one full gather
    rows = []
    for kind in PLACEMENT_KINDS:
        host = host_load_bytes(kind, param_bytes=fp.param_bytes, world_size=w, read_buffer_bytes=fp.load_buffer_bytes,
                               on_cpu=False)
        sharded = kind != "replicate"
        rows.append(TeacherRow(
            kind=kind,
            gpu_resident={"replicate": fp.param_bytes, "zero3": partition, "zero3_offload": 0}[kind],
            gathered_unit=fp.largest_unit_bytes if sharded else 0,
            host_load_rank=host,
            host_load_node=(host - fp.load_buffer_bytes) * local + fp.load_buffer_bytes * loading,
            allgather_per_step=gathered * forwards_per_step if sharded else 0,
            host_to_device_per_step=partition * forwards_per_step if kind == "zero3_offload" else 0,
        ))
    return rows


def teacher_budget_bytes(cluster: Cluster) -> float:
    return TEACHER_MEMORY_FRACTION * cluster.gpu_bytes
