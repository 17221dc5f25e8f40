"""Two checks of the start-check pass (issue 16): numbers that make no sense, engine JSON typos.

``reject_non_finite`` is called by ``RunConfig.__post_init__`` (the config step); ``check_ds_config`` by
``tide_ds.trainer.engine.load_ds_json`` (the engine JSON step). The one pass that runs every start check in
order, before DeepSpeed or any data work, is :func:`tide_ds.plan.checks.validate_run`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

from tide_ds.errors import ConfigError


def reject_non_finite(cfg: Any) -> None:
    """Every float option of every section of ``cfg`` must be finite (NaN or inf never makes sense here)."""
    for section in dataclasses.fields(cfg):
        args = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(args):
            continue
        for f in dataclasses.fields(args):
            value = getattr(args, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{section.name}.{f.name}={value!r} must be a finite number")


#: DeepSpeed config keys this project's engines may use (top level, and inside ``zero_optimization``).
DS_TOP_LEVEL = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer", "scheduler", "fp16", "bf16", "amp", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "activation_checkpointing", "wall_clock_breakdown", "steps_per_print",
    "dump_state", "prescale_gradients", "gradient_predivide_factor", "sparse_gradients", "communication_data_type",
    "seq_parallel_communication_data_type", "data_types", "flops_profiler", "tensorboard", "wandb", "csv_monitor",
    "comet", "comms_logger", "memory_breakdown", "checkpoint", "aio", "elasticity", "pipeline", "compression_training",
    "data_efficiency", "curriculum_learning", "autotuning", "nebula", "zero_quantized_weights",
    "zero_quantized_gradients", "zero_quantized_nontrainable_weights", "disable_allgather", "load_universal_checkpoint",
    "use_node_local_storage", "graph_harvesting", "torch_autocast", "compile", "timers", "hybrid_engine",
    "weight_quantization", "eigenvalue", "progressive_layer_drop", "sequence_parallel_size", "mics_shard_size",
    "mics_hierarchical_params_gather", "use_data_before_expert_parallelism", "dataloader_drop_last",
    "gradient_accumulation_dtype", "fp32_allreduce", "train_batch_size_per_gpu",
})
DS_ZERO = frozenset({
    "stage", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "allgather_partitions",
    "allgather_bucket_size", "overlap_comm", "load_from_fp32_weights", "elastic_checkpoint", "offload_param",
    "offload_optimizer", "sub_group_size", "stage3_max_live_parameters", "stage3_max_reuse_distance",
    "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_model_persistence_threshold",
    "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save", "round_robin_gradients",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_gradients", "memory_efficient_linear", "pipeline_loading_checkpoint",
    "override_module_apply", "ignore_unused_parameters", "legacy_stage1", "cpu_offload", "cpu_offload_param",
    "cpu_offload_use_pin_memory", "log_trace_cache_warnings", "use_multi_rank_bucket_allreduce",
    "module_granularity_threshold", "use_all_reduce_for_fetch_params", "stage3_module_granularity_threshold",
    "stage3_use_all_reduce_for_fetch_params", "leaf_module", "save_muon_momentum_buffer_in_memory",
    "allgather_sequential", "stage3_allgather_sequential", "compute_grad_norm", "enable_sanity_checks",
    "gather_16bit_weights_on_model_save", "max_live_parameters", "max_reuse_distance", "model_persistence_threshold",
    "param_persistence_threshold", "parameter_alignment", "prefetch_bucket_size", "zenflow",
    "zero_quantized_nontrainable_weights",
})


def _unknown(keys, valid: frozenset, where: str, path: str) -> None:
    for key in keys:
        if key not in valid:
            near = difflib.get_close_matches(key, sorted(valid), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"train.ds_config={path!r}: unknown key {key!r} {where}{hint} (DeepSpeed would ignore it)")


def check_ds_config(data: dict, path: str) -> None:
    """Unknown top-level or ``zero_optimization`` keys are errors naming the key and the nearest valid one."""
    _unknown(data, DS_TOP_LEVEL, "at the top level", path)
    zero = data.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(f"train.ds_config={path!r}: zero_optimization must be a JSON object, got {type(zero).__name__}")
    _unknown(zero, DS_ZERO, "in zero_optimization", path)
