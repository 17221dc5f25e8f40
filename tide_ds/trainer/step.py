"""One training step, in the order of spec ALGORITHMS.md Appendix A (no teacher yet).

noise -> student forward (BD3LM on [x_t ; x_0]) -> named loss terms -> backward -> step.
Everything stays on the device: the returned statistics are tensors, read only at log intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tide_ds.config import RunConfig
from tide_ds.diffusion.generators import make_generator
from tide_ds.diffusion.masking import loss_weight, mask_tokens, token_loss_weights
from tide_ds.diffusion.schedules import NoiseSchedule
from tide_ds.diffusion.timesteps import sample_timesteps


@dataclass
class NoisedBatch:
    """A batch after the forward (masking) process. Shapes: [B, L] unless noted."""

    x_0: torch.Tensor
    x_t: torch.Tensor
    masked: torch.Tensor
    maskable: torch.Tensor
    t: torch.Tensor  # [B]


def add_noise(
    batch: dict[str, torch.Tensor],
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
    batch: dict[str, torch.Tensor],
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


def noise_generator(cfg: RunConfig, *, seed: int, micro_step: int, rank: int, stream: str, device) -> torch.Generator:
    """Noise for micro-step ``micro_step`` of ``rank``: a fresh generator per (seed, step, rank, stream)."""
    return make_generator(seed, step=micro_step, rank=rank, stream=stream, device=device)


def train_step(
    engine,
    batches,
    *,
    cfg: RunConfig,
    step: int,
    rank: int,
    schedule: NoiseSchedule,
    mask_token_id: int,
) -> dict[str, torch.Tensor]:
    """Run the micro-steps of optimizer step ``step``; return device-side sums for logging."""
    device = engine.device
    ga = cfg.train.gradient_accumulation_steps
    loss_sum = torch.zeros((), device=device)
    nll_sum = torch.zeros((), device=device)
    n_masked = torch.zeros((), device=device)
    for micro in range(ga):
        batch = next(batches)
        gen = noise_generator(cfg, seed=cfg.train.seed, micro_step=step * ga + micro, rank=rank, stream="noise", device=device)
        nb = add_noise(batch, cfg=cfg, schedule=schedule, mask_token_id=mask_token_id, generator=gen, device=device)
        coeff = token_loss_weights(
            nb.t,
            nb.masked,
            nb.maskable,
            weight_type=cfg.diffusion.loss_weight_type,
            norm_type=cfg.diffusion.loss_norm_type,
            schedule=schedule,
        )
        loss, nll = engine(nb.x_t, nb.x_0, coeff)
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().float()
        nll_sum += nll.float()
        n_masked += nb.masked.sum()
    return {"loss": loss_sum / ga, "ce": loss_sum / ga, "masked_ce": nll_sum / n_masked.clamp_min(1)}


@torch.no_grad()
def evaluate(engine, batches, *, cfg: RunConfig, schedule: NoiseSchedule, mask_token_id: int) -> dict[str, float]:
    """Held-out masked-diffusion NLL with a fixed noise seed per sample (comparable across steps, runs and
    world sizes; :func:`add_eval_noise`).

    ``nll`` is the ELBO estimate per maskable token, sum(w(t) m CE) / sum(a), over the whole split and
    all ranks; ``masked_ce`` is the plain CE per masked token. Every rank runs the same number of
    batches (``eval_batches`` pads with fully ignored rows), so the final all-reduce is rank-consistent.
    """
    from tide_ds import dist

    device = engine.device
    was_training = engine.module.training
    engine.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # weighted sum, maskable, ce sum, masked
    for batch in batches:
        nb = add_eval_noise(batch, cfg=cfg, schedule=schedule, mask_token_id=mask_token_id, device=device)
        weight_B = loss_weight(nb.t, weight_type=cfg.diffusion.loss_weight_type, schedule=schedule)
        coeff = weight_B[:, None] * nb.masked
        loss, nll = engine(nb.x_t, nb.x_0, coeff)
        totals += torch.stack([loss.double(), nb.maskable.sum().double(), nll.double(), nb.masked.sum().double()])
    dist.all_reduce_sum(totals)
    if was_training:
        engine.train()
    weighted, maskable, ce, masked = totals.tolist()
    nll_value = weighted / max(1.0, maskable)
    return {"nll": nll_value, "masked_ce": ce / max(1.0, masked), "tokens": maskable}
