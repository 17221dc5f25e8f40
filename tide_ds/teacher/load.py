"""Load a frozen teacher: a plain replica, or straight into ZeRO-3 partitions.

Partitioned loading never holds the whole teacher on any rank. The model is built under
``deepspeed.zero.Init`` (each rank allocates only its partition of every parameter), then the
checkpoint is streamed one group at a time (the top-level tensors, then one decoder layer after the
other): the group's tensors are read from the safetensors files, converted to the native layout by the
family's :class:`~tide_ds.models.adapter_glue.LoadPlan`, and each rank reads only the byte ranges of its own
slice of every flattened parameter, straight into ``param.ds_tensor`` (:mod:`tide_ds.teacher.reader`). Peak
memory per rank is its partition plus one read buffer, and a rank reads 1/world of the checkpoint.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import transformers

from tide_ds import dist
from tide_ds.models.adapter_glue import LoadPlan, instantiate

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"^(?:model\.layers|model\.transformer\.blocks)\.(\d+)\.")


def checkpoint_groups(keys: list[str]) -> list[list[str]]:
    """Checkpoint keys grouped for streaming: non-layer tensors first, then one group per decoder layer."""
    top, layers = [], {}
    for key in keys:
        m = _LAYER.match(key)
        if m is None:
            top.append(key)
        else:
            layers.setdefault(int(m.group(1)), []).append(key)
    return ([top] if top else []) + [layers[i] for i in sorted(layers)]


def _partition_target(param: torch.nn.Parameter):
    """This rank's ZeRO-3 partition of ``param``: a window of the flattened parameter."""
    from tide_ds.teacher.reader import Target

    part = param.ds_tensor
    rank = dist.rank() if param.ds_process_group is None else torch.distributed.get_rank(group=param.ds_process_group)
    return Target(part.data.view(-1), rank * part.numel())


def _local_init() -> type:
    """``deepspeed.zero.Init`` that partitions each new parameter where it is, without rank 0's broadcast.

    zero.Init broadcasts every full parameter from rank 0 so that random initialisations agree; here every
    partition is overwritten from the checkpoint right after (a parameter left unread is an error), so the
    broadcast would only ship the whole teacher over the network for nothing.
    """
    import deepspeed

    class LocalInit(deepspeed.zero.Init):
        def _zero_init_param(self, param):  # DeepSpeed 0.19: convert, broadcast from rank 0, partition
            self._convert_to_deepspeed_param(param)
            param.partition()

    return LocalInit


def load_partitioned(
    plan: LoadPlan, *, ds_config: dict, attn_implementation: str, dtype: torch.dtype, concurrency: int = 0
) -> transformers.PreTrainedModel:
    """Build the native model under ``zero.Init`` (all ranks), then read each rank's partitions, ``concurrency``
    ranks of a node at a time (:mod:`tide_ds.teacher.turns`; 0 = all)."""

    # The dtype comes from the config's bf16 section: DeepSpeed 0.19's zero.Init ignores an explicit
    # dtype=torch.float32 on accelerators without fp16 (CPU) and builds bf16 parameters instead.
    bf16 = bool(ds_config.get("bf16", {}).get("enabled"))
    if (dtype == torch.bfloat16) != bf16 or dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"teacher dtype {dtype} does not match the engine config (bf16={bf16}); use float32 or bfloat16")
    with _local_init()(config_dict_or_path=ds_config):
        model = instantiate(plan.native_class, plan.config, attn_implementation=attn_implementation, dtype=dtype)
    params = dict(model.named_parameters(remove_duplicate=True))
    buffers = dict(model.named_buffers())
    tied = plan.config.tie_word_embeddings
    expected = {k for k in model.state_dict() if not (tied and k == "lm_head.weight")}  # persistent buffers too
    from tide_ds.teacher.loading import load_into
    from tide_ds.teacher.reader import Target
    from tide_ds.teacher.turns import in_turns

    targets = {name: _partition_target(p) for name, p in params.items()}
    targets.update({name: Target(b.view(-1)) for name, b in buffers.items()})
    shapes = {name: tuple(p.ds_shape) for name, p in params.items()} | {k: tuple(b.shape) for k, b in buffers.items()}
    with torch.no_grad():
        read = in_turns(lambda: load_into(plan, targets, shapes, expected=expected), concurrency=concurrency)
    logger.info("read %.1f MiB of %s into this rank's ZeRO-3 partitions", read / 2**20, plan.path)
    return model.eval().requires_grad_(False)


def peak_rss_reset() -> None:
    """Reset the process's peak resident set size (Linux), so a later :func:`peak_rss_bytes` measures a phase."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
