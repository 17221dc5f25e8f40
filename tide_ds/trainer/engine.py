"""The student's DeepSpeed engine: its config (engine JSON + recipe), optimizer, schedule and module.

``ds_configs/*.json`` hold engine settings only (ZeRO stage, precision, offload). Everything the
recipe owns (batch sizes, optimizer, learning-rate schedule, clipping) is written into the DeepSpeed
dict by :func:`build_ds_config`, the one place where the two meet; a JSON that sets one of those
keys itself is an error naming both sources.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tide_ds import validate
from tide_ds.config import REPO_ROOT, RunConfig, resolve_repo_path
from tide_ds.errors import ConfigError
from tide_ds.trainer.student import DiffusionCEModule

logger = logging.getLogger(__name__)

#: DeepSpeed keys the recipe owns, with the recipe option each one comes from.
RECIPE_OWNED_KEYS = {
    "train_batch_size": "train.micro_batch_size x train.gradient_accumulation_steps x world size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr / train.adam_* / train.weight_decay (tide-ds builds AdamW itself)",
    "scheduler": "train.warmup_ratio / train.min_lr_ratio (tide-ds builds the schedule itself)",
}


def load_ds_json(path: str | Path) -> dict[str, Any]:
    """The engine JSON; a relative path is looked up from the working directory, then the checkout root."""
    given = path
    path = resolve_repo_path(path)
    if not path.is_file():
        raise ConfigError(
            f"train.ds_config={str(given)!r} does not exist (looked in {Path.cwd()} and {REPO_ROOT}); use one of "
            "the files in ds_configs/ (zero2.json, zero3.json) or a path to your own engine JSON"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"train.ds_config={str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"train.ds_config={str(path)!r} must hold a JSON object, got {type(data).__name__}")
    validate.check_ds_config(data, str(path))  # unknown keys (a typo DeepSpeed would silently ignore)
    return data


def build_ds_config(cfg: RunConfig, *, world_size: int, has_accelerator: bool | None = None) -> dict[str, Any]:
    """Merge the engine JSON with the recipe's batch/optimisation settings.

    ``"enabled": "auto"`` in the ``bf16``/``fp16`` sections resolves to bf16 on an accelerator and
    float32 on the CPU.
    """
    ds = copy.deepcopy(load_ds_json(cfg.train.ds_config))
    for key, option in RECIPE_OWNED_KEYS.items():
        if key in ds:
            raise ConfigError(
                f"{cfg.train.ds_config} sets {key!r}={ds[key]!r}, but that value comes from the recipe "
                f"({option}); remove {key!r} from the JSON and set the recipe option instead"
            )
    if has_accelerator is None:
        has_accelerator = torch.cuda.is_available()
    for precision in ("bf16", "fp16"):
        section = ds.get(precision)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = bool(has_accelerator) and precision == "bf16"
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{cfg.train.ds_config} enables both bf16 and fp16; enable one of them")
    t = cfg.train
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    ds["train_batch_size"] = t.micro_batch_size * t.gradient_accumulation_steps * world_size
    ds["gradient_clipping"] = t.grad_clip
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    # tide-ds builds torch's AdamW; DeepSpeed accepts it under ZeRO as a client optimizer.
    ds["zero_allow_untested_optimizer"] = True
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def lr_lambda(cfg: RunConfig) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine decay to ``min_lr_ratio`` at ``max_steps``."""
    total = cfg.train.max_steps
    warmup = int(round(cfg.train.warmup_ratio * total))
    floor = cfg.train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(cfg: RunConfig, module: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    t = cfg.train
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 or name.endswith("bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    return optimizer, scheduler


def initialize_engine(cfg: RunConfig, module: DiffusionCEModule, *, world_size: int) -> tuple[Any, dict[str, Any]]:
    """Wrap ``module`` in a DeepSpeed engine with tide-ds's optimizer and schedule."""
    import deepspeed

    ds = build_ds_config(cfg, world_size=world_size)
    if zero_stage(ds) == 3:
        module.register_for_zero3()
    optimizer, scheduler = build_optimizer(cfg, module)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds
    )
    logger.info(
        "student engine: ZeRO-%d, %s, %d rank(s), %.2fM parameters",
        zero_stage(ds),
        "bf16" if ds.get("bf16", {}).get("enabled") else "fp16" if ds.get("fp16", {}).get("enabled") else "fp32",
        world_size,
        sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters()) / 1e6,
    )
    return engine, ds
