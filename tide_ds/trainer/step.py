"""One training step (docs/method.md Appendix A and B): one micro-step loop for every objective.

noise -> the objective's targets (teacher forward under no_grad, :mod:`tide_ds.trainer.objectives`) ->
student BD3LM forward on [x_t ; x_0] and the named loss terms (:mod:`tide_ds.trainer.student`) ->
backward -> step. Everything stays on the device: the returned statistics are tensors, read only at log
intervals. :func:`evaluate` is the held-out NLL, with a fixed noise seed per sample.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from tide_ds import dist
from tide_ds.config import RunConfig
from tide_ds.diffusion.generators import make_generator
from tide_ds.diffusion.masking import loss_weight, mask_tokens
from tide_ds.diffusion.schedules import NoiseSchedule
from tide_ds.diffusion.timesteps import sample_timesteps
from tide_ds.trainer.student import HeldoutTargets, Terms

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from tide_ds.trainer.objectives import Objective

Batch = dict[str, torch.Tensor]


@dataclass
class NoisedBatch:
    """A batch after the forward (masking) process. Shapes: [B, L] unless noted."""

    x_0: torch.Tensor
    x_t: torch.Tensor
    masked: torch.Tensor
    maskable: torch.Tensor
    t: torch.Tensor  # [B]


def add_noise(
    batch: Batch,
    *,
    cfg: RunConfig,
    schedule: NoiseSchedule,
    mask_token_id: int,
    generator: torch.Generator,
    device: torch.device,
) -> NoisedBatch:
    x_0 = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    t = sample_timesteps(x_0.shape[0], time_epsilon=cfg.diffusion.time_epsilon, generator=generator, device=device)
    x_t, masked = mask_tokens(x_0, labels, t, schedule=schedule, mask_token_id=mask_token_id, generator=generator)
    return NoisedBatch(x_0=x_0, x_t=x_t, masked=masked, maskable=labels != -100, t=t)


def add_eval_noise(
    batch: Batch,
    *,
    cfg: RunConfig,
    schedule: NoiseSchedule,
    mask_token_id: int,
    device: torch.device,
) -> NoisedBatch:
    """Held-out noise seeded per sample (``batch["sample_index"]``, ``train.eval_seed``): each sample gets
    the same time and mask whatever the world size, micro-batch size or batch it lands in, so held-out
    NLLs compare across runs on different numbers of ranks and across a resume onto another world size."""
    x_0 = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    t_rows, x_t_rows, masked_rows = [], [], []
    for j, index in enumerate(batch["sample_index"].tolist()):
        gen = make_generator(cfg.train.eval_seed, step=max(index, 0), rank=0, stream="eval", device=device)
        t = sample_timesteps(1, time_epsilon=cfg.diffusion.time_epsilon, generator=gen, device=device)
        x_t, masked = mask_tokens(x_0[j : j + 1], labels[j : j + 1], t, schedule=schedule, mask_token_id=mask_token_id,
                                  generator=gen)
        t_rows.append(t)
        x_t_rows.append(x_t)
        masked_rows.append(masked)
    return NoisedBatch(x_0=x_0, x_t=torch.cat(x_t_rows), masked=torch.cat(masked_rows), maskable=labels != -100,
                       t=torch.cat(t_rows))


def train_step(
    engine: DeepSpeedEngine,
    batches: Iterator[Batch],
    objective: Objective,
    *,
    cfg: RunConfig,
    step: int,
    rank: int,
    schedule: NoiseSchedule,
    mask_token_id: int,
) -> Terms:
    """Run the micro-steps of optimizer step ``step``; return device-side statistics for logging.

    Per micro-step: noise (seeded per (seed, micro-step, rank)) -> the objective's targets (the teacher
    half) -> the student engine (the student half, :mod:`tide_ds.trainer.student`) -> backward -> step.
    Returns ``loss`` and each loss term averaged over the micro-steps, and the objective's counts summed.
    """
    device = engine.device
    ga = cfg.train.gradient_accumulation_steps
    stats: Terms = {}

    def add(key: str, value: torch.Tensor) -> None:
        stats[key] = stats.get(key, 0) + value

    for micro in range(ga):
        batch = next(batches)
        micro_step = step * ga + micro
        gen = make_generator(cfg.train.seed, step=micro_step, rank=rank, stream="noise", device=device)
        nb = add_noise(batch, cfg=cfg, schedule=schedule, mask_token_id=mask_token_id, generator=gen, device=device)
        targets, counts = objective.targets(batch, nb, step=step, micro_step=micro_step)
        loss, terms, sums = engine(targets=targets)
        engine.backward(loss)
        # DeepSpeed's engine.step() belongs inside the micro-step loop: the engine counts micro-steps and
        # applies the optimizer (and the learning-rate schedule) only at a gradient-accumulation boundary,
        # every gradient_accumulation_steps calls; the calls between only advance its counter.
        engine.step()
        for key, value in {"loss": loss.detach().float(), **terms}.items():
            add(key, value.detach().float() / ga)
        for key, value in {**sums, **counts}.items():
            add(key, value.detach().float())
    return objective.finish(stats)


@torch.no_grad()
def evaluate(
    engine: DeepSpeedEngine | Any, batches: Iterable[Batch], *, cfg: RunConfig, schedule: NoiseSchedule, mask_token_id: int
) -> dict[str, float]:
    """Held-out masked-diffusion NLL with a fixed noise seed per sample (comparable across steps, runs and
    world sizes; :func:`add_eval_noise`).

    ``nll`` is the ELBO estimate per maskable token, sum(w(t) m CE) / sum(a), over the whole split and
    all ranks; ``masked_ce`` is the plain CE per masked token. Every rank runs the same number of
    batches (``eval_batches`` pads with fully ignored rows), so the final all-reduce is rank-consistent.
    ``engine`` is the student engine, or anything with its ``device``, ``module``, ``eval``, ``train`` and call.
    """
    device = engine.device
    was_training = engine.module.training
    engine.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # weighted sum, maskable, ce sum, masked
    for batch in batches:
        nb = add_eval_noise(batch, cfg=cfg, schedule=schedule, mask_token_id=mask_token_id, device=device)
        w_B = loss_weight(nb.t, weight_type=cfg.diffusion.loss_weight_type, schedule=schedule)
        loss, _, sums = engine(targets=HeldoutTargets(x_t=nb.x_t, x_0=nb.x_0, coeff=w_B[:, None] * nb.masked))
        nll = sums["nll_sum"]
        totals += torch.stack([loss.double(), nb.maskable.sum().double(), nll.double(), nb.masked.sum().double()])
    dist.all_reduce_sum(totals)
    if was_training:
        engine.train()
    weighted, maskable, ce, masked = totals.tolist()
    nll_value = weighted / max(1.0, maskable)
    return {"nll": nll_value, "masked_ce": ce / max(1.0, masked), "tokens": maskable}
