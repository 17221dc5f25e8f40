"""Held-out masked-diffusion NLL (the ELBO per maskable token) of a loaded student, with the trainer's own code.

The estimator is the one the training run logs as ``eval/nll`` and ``eval/masked_ce``: the same held-out
split, the same fixed noise seed (``train.eval_seed``), the same loss module and
:func:`tide_ds.trainer.step.evaluate`, here in one process without DeepSpeed. A run with one rank logs
exactly these numbers; with W ranks the trainer draws each rank's noise from its own stream (seeded by
the rank), so the numbers of a multi-rank run differ from this single-process value by the noise of
the estimate, not by its definition.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from tide_ds.sampling.load import InferenceModel

__all__ = ["heldout_nll"]


class _LocalEngine:
    """The part of a DeepSpeed engine that ``evaluate`` uses: ``device``, ``module``, ``eval/train``, call."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = device

    def eval(self) -> None:
        self.module.eval()

    def train(self) -> None:
        self.module.train()

    def __call__(self, **kwargs: Any) -> Any:
        return self.module(**kwargs)


def heldout_nll(loaded: InferenceModel, *, samples: int | None = None) -> dict[str, float]:
    """``{"nll", "masked_ce", "tokens"}`` over the run's held-out split (``samples``: first N; None = the run's
    ``data.eval_samples``; 0 = all)."""
    from tide_ds.builders import build_data, build_tokenizer
    from tide_ds.diffusion.schedules import get_schedule
    from tide_ds.losses.fused_head import resolve_loss_implementation
    from tide_ds.models.qwen3 import BD3LMStudent
    from tide_ds.trainer.step import evaluate
    from tide_ds.trainer.student import DiffusionCEModule
    from tide_ds.worlds import prepare_world

    cfg = loaded.run_config
    if cfg is None:
        raise ValueError(
            f"{loaded.source} carries no training run config, so its held-out data is unknown; evaluate a run or "
            "checkpoint directory (or a directory exported by tide_ds.export), or drop the nll task"
        )
    if samples is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_samples=samples))
    _, special = build_tokenizer(cfg)
    if special.mask_id != loaded.special.mask_id:
        raise ValueError(f"the run's tokenizer has mask id {special.mask_id}, the model {loaded.special.mask_id}")
    cfg, _ = prepare_world(cfg)  # a config from before the worlds were resolved at launch names no dataset
    data = build_data(cfg, rank=0, world_size=1)
    device = loaded.model.device
    student = BD3LMStudent(loaded.model, block_size=cfg.diffusion.block_size)
    module = DiffusionCEModule(
        student, chunk_rows=cfg.model.ce_chunk_rows,
        loss_implementation=resolve_loss_implementation(cfg.model.loss_implementation, device),
    )
    engine = _LocalEngine(module, device)
    with torch.no_grad():
        result = evaluate(engine, data.eval_batches(), cfg=cfg, schedule=get_schedule(cfg.diffusion.schedule),
                          mask_token_id=special.mask_id)
    return {**result, "samples": min(cfg.data.eval_samples or data.num_eval, data.num_eval)}
