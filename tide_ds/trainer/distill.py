"""The distillation step of pipeline A (cross tokenizer, chunk terms), spec ALGORITHMS.md Appendix A.

noise -> chunk-consistent masks (§4.4) -> teacher target log-probs under no_grad (one pass, or CompDemo's
two on every rank) -> teacher chunk log-likelihoods -> student BD3LM forward -> CE + CALM / Reverse CALM /
chunk TIDAL through the fused LM-head loss -> backward -> step. Every loss term is returned on its own.

Batch columns (from the offline preprocessing): ``input_ids, labels, student_chunk_ids [B, L]``,
``teacher_input_ids, teacher_attention_mask, teacher_chunk_ids [B, L_t]`` (chunk id -1 = no chunk).
"""

from __future__ import annotations

import torch

from tide_ds.config import RunConfig
from tide_ds.diffusion.chunk_masking import chunk_consistent_masks, gather_chunks
from tide_ds.diffusion.masking import token_loss_weights
from tide_ds.losses.calm import calm_loss, chunk_sums
from tide_ds.losses.fused_head import fused_head_loss
from tide_ds.losses.objective import LossTerm, ObjectiveSpec, TermKind
from tide_ds.losses.tidal import TidalSchedule
from tide_ds.teacher.forward import complementary_split
from tide_ds.trainer.engine import DiffusionCEModule
from tide_ds.trainer.step import add_noise, noise_generator

CHUNK_COLUMNS = ("student_chunk_ids", "teacher_input_ids", "teacher_attention_mask", "teacher_chunk_ids")


class ChunkDistillModule(DiffusionCEModule):
    """Student side of pipeline A: ``forward(x_t, x_0, coeff, rows, student_chunks, teacher_ll, active,
    lambda_B, weight_B) -> (loss, {term: value})``; CE and the chunk term share one fused LM-head pass.
    With only ``(x_t, x_0, coeff)`` it is the plain CE module (held-out evaluation)."""

    def __init__(self, student: torch.nn.Module, *, term: LossTerm, weight: float, temperature: float, chunk_rows: int = 0):
        super().__init__(student, chunk_rows=chunk_rows)
        self.term = term
        self.weight = weight
        self.temperature = temperature

    def forward(self, x_t, x_0, coeff, rows=None, student_chunks=None, teacher_ll=None, active=None, lambda_B=None, weight_B=None):
        if rows is None:
            return super().forward(x_t, x_0, coeff)
        b, length = x_t.shape
        num_chunks = teacher_ll.shape[1]
        hidden = self.student(x_t, x_0).flatten(0, 1)

        def loss_fn(lp_N):
            ce = -(coeff.flatten().to(lp_N.dtype) * lp_N).sum()
            student_ll = chunk_sums(lp_N.view(b, length), student_chunks, num_chunks)
            if self.term.kind is TermKind.CALM:
                term = calm_loss(student_ll, teacher_ll, active, temperature=self.temperature, reverse=self.term.reverse)
            else:
                from tide_ds.losses.tidal import chunk_tidal

                term = chunk_tidal(
                    student_ll, teacher_ll, active, lambda_B,
                    temperature=self.temperature, reverse=self.term.reverse, weight_B=weight_B,
                )
            return ce + self.weight * term, {"ce": ce, self.term.name: term}

        loss, _, terms = fused_head_loss(
            hidden, self.student.lm_head_weight, x_0.flatten(), rows.flatten(), loss_fn, chunk_rows=self.chunk_rows
        )
        return loss, terms


def chunk_term(spec: ObjectiveSpec) -> LossTerm:
    (term,) = spec.terms  # pipeline A modes hold exactly one chunk term (spec §9.1)
    return term


def distill_step_a(
    engine,
    teacher,
    batches,
    *,
    cfg: RunConfig,
    spec: ObjectiveSpec,
    step: int,
    rank: int,
    schedule,
    mask_token_id: int,
    tidal: TidalSchedule | None,
) -> dict[str, torch.Tensor]:
    """Micro-steps of optimizer step ``step`` for pipeline A; device-side sums of every term for logging."""
    device = engine.device
    ga = cfg.train.gradient_accumulation_steps
    sums: dict[str, torch.Tensor] = {}
    for micro in range(ga):
        batch = next(batches)
        micro_step = step * ga + micro
        gen = noise_generator(cfg, seed=cfg.train.seed, micro_step=micro_step, rank=rank, stream="noise", device=device)
        nb = add_noise(batch, cfg=cfg, schedule=schedule, mask_token_id=mask_token_id, generator=gen, device=device)
        s_chunks = batch["student_chunk_ids"].to(device)
        t_chunks = batch["teacher_chunk_ids"].to(device)
        t_ids = batch["teacher_input_ids"].to(device)
        t_att = batch["teacher_attention_mask"].to(device)
        num_chunks = s_chunks.shape[1]  # a fixed bound (every chunk holds a student token): no host sync
        masks = chunk_consistent_masks(nb.masked, batch["labels"].to(device), s_chunks, t_chunks, num_chunks)
        x_t = torch.where(masks.student_masked, torch.full_like(nb.x_0, mask_token_id), nb.x_0)
        if spec.comp_demo:  # always two passes on every rank
            demo_gen = noise_generator(cfg, seed=cfg.train.seed, micro_step=micro_step, rank=rank, stream="demo", device=device)
            a_ch, b_ch = complementary_split(masks.chunk_masked, demo_ratio=cfg.distill.demo_ratio, generator=demo_gen)
            teacher_lp = teacher.comp_demo_target_logprobs(
                t_ids, gather_chunks(a_ch, t_chunks), gather_chunks(b_ch, t_chunks), attention_mask=t_att
            )
        else:
            teacher_lp = teacher.target_logprobs(t_ids, masks.teacher_masked, attention_mask=t_att)
        teacher_ll = chunk_sums(teacher_lp, t_chunks, num_chunks)
        coeff = token_loss_weights(
            nb.t, masks.student_masked, nb.maskable,
            weight_type=cfg.diffusion.loss_weight_type, norm_type=cfg.diffusion.loss_norm_type, schedule=schedule,
        )
        progress = min(1.0, step / max(1, cfg.train.max_steps))
        lambda_B = tidal.sample_lambda(nb.t, progress=progress) if tidal else nb.t.new_zeros(nb.t.shape)
        weight_B = tidal.sample_weight(nb.t) if tidal else nb.t.new_ones(nb.t.shape)
        loss, terms = engine(
            x_t, nb.x_0, coeff, masks.student_masked, s_chunks, teacher_ll, masks.chunk_active, lambda_B, weight_B
        )
        engine.backward(loss)
        engine.step()
        stats = {"loss": loss.detach().float(), **{k: v.float() for k, v in terms.items()},
                 "active_chunks": masks.chunk_active.sum().float()}
        for key, value in stats.items():
            sums[key] = sums.get(key, 0) + value / (1 if key == "active_chunks" else ga)
    return sums
