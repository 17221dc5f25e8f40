"""The teacher half of a step: per objective, a small object that turns a noised batch into typed targets.

:func:`tide_ds.trainer.step.train_step` draws the noise and calls ``objective.targets(batch, noised, ...)``;
the targets (a dataclass of :mod:`tide_ds.trainer.student`) go to the student engine as one keyword:

- :class:`CEObjective` (``distill.preset=none``): per-token CE weights, no teacher.
- :class:`ChunkObjective` (pipeline A, cross tokenizer, docs/method.md Appendix A): chunk-consistent masks
  (docs/method.md §4.4), the teacher's target log-probs under no_grad (one pass, or CompDemo's two on every rank), summed
  into teacher chunk log-likelihoods.
- :class:`TokenObjective` (pipeline B, shared tokenizer, docs/method.md Appendix B): the teacher's final hidden states on the
  student's masked rows, through the position pairs in aligned modes (docs/method.md §3.3), on the student's own ids otherwise
  (docs/method.md §3.2), with a handle on the teacher's head: no ``[N, V']`` teacher logits exist (issue 17).

Pipeline-A batch columns (from the offline preprocessing): ``input_ids, labels, student_chunk_ids [B, L]``,
``teacher_input_ids, teacher_attention_mask, teacher_chunk_ids [B, L_t]`` (chunk id -1 = no chunk).

Pipeline B, aligned modes (docs/method.md §3.3): ``teacher_input_ids, teacher_attention_mask [B, L_t]``, position pairs
``align_student, align_teacher [B, N]`` (-1 padded) and ``n_aligned [B]``. Non-aligned modes (docs/method.md §3.2) need
only ``input_ids, labels``: the teacher reads the student's own ids.

TIDAL's per-sample weights are ``lambda_B`` (the teacher's share of the target, docs/method.md §7.2) and ``omega_B`` (the
timestep weight, docs/method.md §7.3) in both pipelines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from tide_ds.config import RunConfig
from tide_ds.diffusion.chunk_masking import chunk_consistent_masks, gather_chunks
from tide_ds.diffusion.generators import make_generator
from tide_ds.diffusion.masking import token_loss_weights
from tide_ds.diffusion.schedules import NoiseSchedule
from tide_ds.losses.calm import chunk_sums
from tide_ds.losses.fused_divergence import DivergenceTerm
from tide_ds.losses.objective import LossTerm, ObjectiveSpec, TermKind
from tide_ds.losses.tidal import TidalSchedule
from tide_ds.teacher.forward import complementary_split
from tide_ds.trainer.student import (
    CETargets,
    ChunkDistillModule,
    ChunkTargets,
    DiffusionCEModule,
    Terms,
    TokenDistillModule,
    TokenTargets,
)

if TYPE_CHECKING:
    from tide_ds.teacher.engine import TeacherEngine
    from tide_ds.trainer.step import NoisedBatch

Batch = dict[str, torch.Tensor]

CHUNK_COLUMNS = ("student_chunk_ids", "teacher_input_ids", "teacher_attention_mask", "teacher_chunk_ids")
ALIGN_COLUMNS = ("teacher_input_ids", "teacher_attention_mask", "align_student", "align_teacher", "n_aligned")


class Objective(Protocol):
    """Turns a noised micro-batch into the student's targets, plus counts to log (summed over the step)."""

    #: The TIDAL schedule when a TIDAL term is on (the loop logs its lambda), else None.
    tidal: TidalSchedule | None

    def targets(self, batch: Batch, nb: NoisedBatch, *, step: int, micro_step: int) -> tuple[CETargets, Terms]: ...

    def finish(self, stats: Terms) -> Terms: ...


class CEObjective:
    """Masked-diffusion CE only (the BD3LM baseline): no teacher."""

    tidal = None

    def __init__(self, cfg: RunConfig, *, schedule: NoiseSchedule) -> None:
        self.cfg = cfg
        self.schedule = schedule

    def targets(self, batch: Batch, nb: NoisedBatch, *, step: int, micro_step: int) -> tuple[CETargets, Terms]:
        d = self.cfg.diffusion
        coeff = token_loss_weights(nb.t, nb.masked, nb.maskable, weight_type=d.loss_weight_type,
                                   norm_type=d.loss_norm_type, schedule=self.schedule)
        return CETargets(x_t=nb.x_t, x_0=nb.x_0, coeff=coeff), {"masked": nb.masked.sum().float()}

    def finish(self, stats: Terms) -> Terms:
        """``masked_ce``: the plain CE per masked token over the whole step."""
        nll_sum, masked = stats.pop("nll_sum"), stats.pop("masked")
        return {**stats, "masked_ce": nll_sum / masked.clamp_min(1)}


class _DistillObjective:
    """What both pipelines share: the teacher, CompDemo's split, the CE weights and TIDAL's lambda and omega."""

    def __init__(self, teacher: TeacherEngine, *, cfg: RunConfig, spec: ObjectiveSpec, schedule: NoiseSchedule,
                 mask_token_id: int, rank: int, tidal: TidalSchedule | None) -> None:
        self.teacher = teacher
        self.cfg = cfg
        self.spec = spec
        self.schedule = schedule
        self.mask_token_id = mask_token_id
        self.rank = rank
        self.tidal = tidal

    def demo_split(self, masked: torch.Tensor, *, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CompDemo's complementary split of ``masked`` (docs/method.md §8), from its own stream seeded per (seed, micro-step, rank)."""
        gen = make_generator(self.cfg.train.seed, step=micro_step, rank=self.rank, stream="demo", device=masked.device)
        return complementary_split(masked, demo_ratio=self.cfg.distill.demo_ratio, generator=gen)

    def coeff(self, nb: NoisedBatch, masked: torch.Tensor) -> torch.Tensor:
        d = self.cfg.diffusion
        return token_loss_weights(nb.t, masked, nb.maskable, weight_type=d.loss_weight_type,
                                  norm_type=d.loss_norm_type, schedule=self.schedule)

    def tidal_weights(self, t_B: torch.Tensor, *, step: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """TIDAL's ``(lambda_B, omega_B)`` at optimizer step ``step``; None without TIDAL."""
        if self.tidal is None:
            return None
        progress = min(1.0, step / max(1, self.cfg.train.max_steps))
        return self.tidal.sample_lambda(t_B, progress=progress), self.tidal.sample_weight(t_B)

    def finish(self, stats: Terms) -> Terms:
        return stats


class ChunkObjective(_DistillObjective):
    """Pipeline A: chunk-consistent masks, teacher target log-probs summed per chunk (docs/method.md §4-§8, Appendix A)."""

    def targets(self, batch: Batch, nb: NoisedBatch, *, step: int, micro_step: int) -> tuple[ChunkTargets, Terms]:
        device = nb.x_0.device
        s_chunks = batch["student_chunk_ids"].to(device)
        t_chunks = batch["teacher_chunk_ids"].to(device)
        t_ids = batch["teacher_input_ids"].to(device)
        t_att = batch["teacher_attention_mask"].to(device)
        num_chunks = s_chunks.shape[1]  # a fixed bound (every chunk holds a student token): no host sync
        masks = chunk_consistent_masks(nb.masked, batch["labels"].to(device), s_chunks, t_chunks, num_chunks)
        x_t = torch.where(masks.student_masked, torch.full_like(nb.x_0, self.mask_token_id), nb.x_0)
        if self.spec.comp_demo:  # always two passes on every rank
            a_ch, b_ch = self.demo_split(masks.chunk_masked, micro_step=micro_step)
            teacher_lp = self.teacher.comp_demo_target_logprobs(
                t_ids, gather_chunks(a_ch, t_chunks), gather_chunks(b_ch, t_chunks), attention_mask=t_att
            )
        else:
            teacher_lp = self.teacher.target_logprobs(t_ids, masks.teacher_masked, attention_mask=t_att)
        weights = self.tidal_weights(nb.t, step=step)
        lambda_B, omega_B = weights if weights is not None else (nb.t.new_zeros(nb.t.shape), nb.t.new_ones(nb.t.shape))
        targets = ChunkTargets(
            x_t=x_t, x_0=nb.x_0, coeff=self.coeff(nb, masks.student_masked), rows=masks.student_masked,
            student_chunks=s_chunks, teacher_ll=chunk_sums(teacher_lp, t_chunks, num_chunks),
            chunk_active=masks.chunk_active, lambda_B=lambda_B, omega_B=omega_B,
        )
        return targets, {"active_chunks": masks.chunk_active.sum().float()}


def chunk_term(spec: ObjectiveSpec) -> LossTerm:
    (term,) = spec.terms  # pipeline A modes hold exactly one chunk term (docs/method.md §9.1)
    return term


# ---------------------------------------------------------------------------------------------
# Pipeline B: shared tokenizer, token-level KL / reverse KL / TIDAL (docs/method.md §3.2, §3.3, §6, §7.3, §8.1)

_DIVERGENCE_KIND = {(TermKind.KL, False): "forward", (TermKind.KL, True): "reverse", (TermKind.TIDAL, False): "tidal"}


def divergence_terms(spec: ObjectiveSpec, cfg: RunConfig) -> tuple[DivergenceTerm, ...]:
    """The spec's token-level terms with their weights (docs/method.md §10: ``kl_weight`` for KL, ``tidal_weight`` for TIDAL)."""
    weights = {"kl": cfg.distill.kl_weight, "tidal": cfg.distill.tidal_weight}
    return tuple(
        DivergenceTerm(term.name, _DIVERGENCE_KIND[(term.kind, term.reverse)], weights[term.weight_group])
        for term in spec.terms
    )


def compact_rows(*rows_BN: torch.Tensor, selected_BN: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """On the CPU, keep only selected rows (moved to the front of each sample, N cut to the largest count).

    Rows that are not selected cost a teacher LM-head row and a gather for nothing; finding them needs
    the count on the host, which is free on the CPU. On accelerators the shapes stay static (no host sync).
    Returns ``(*rows, selected)`` in the same layout.
    """
    if selected_BN.device.type != "cpu":
        return (*rows_BN, selected_BN)
    order = torch.sort((~selected_BN).to(torch.int8), dim=1, stable=True).indices
    keep = max(1, int(selected_BN.sum(1).max()))
    order = order[:, :keep]
    return (*(r.gather(1, order) for r in rows_BN), selected_BN.gather(1, order))


def _scatter_pairs(flags_BN: torch.Tensor, positions_BN: torch.Tensor, valid_BN: torch.Tensor, length: int) -> torch.Tensor:
    """Teacher-position flags ``[B, length]`` from per-pair flags: a masked scatter (invalid pairs write nothing).

    The reference scattered invalid pairs (index 0, value False) into position 0, harmless only because
    position 0 is a template token there (docs/method.md §3.3 step 2); here they go to a spare column that is dropped.
    """
    out = torch.zeros(flags_BN.shape[0], length + 1, dtype=torch.bool, device=flags_BN.device)
    index = torch.where(valid_BN, positions_BN.long().clamp(0, length - 1), torch.full_like(positions_BN.long(), length))
    out.scatter_(1, index, flags_BN & valid_BN)
    return out[:, :length]


class TokenObjective(_DistillObjective):
    """Pipeline B: the teacher's hidden rows on the student's masked rows, and its head (``teacher.head_weight``,
    entered by the student module around the token terms: gathered under ZeRO-3 once per micro-step).

    Aligned modes (docs/method.md §3.3): the student mask is propagated through the position pairs (``mu``), the teacher
    reads its own template with the propagated mask, and the terms compare aligned-and-masked rows.
    Non-aligned modes (docs/method.md §3.2): the teacher reads the student's ids with the student's mask, every masked
    position is a row. CompDemo (docs/method.md §8.1) splits the student mask and maps both halves the same way.
    """

    def targets(self, batch: Batch, nb: NoisedBatch, *, step: int, micro_step: int) -> tuple[TokenTargets, Terms]:
        device = nb.x_0.device
        split = self.demo_split(nb.masked, micro_step=micro_step) if self.spec.comp_demo else None  # two passes on every rank
        b, length = nb.x_0.shape
        counts: Terms = {}
        if self.spec.aligned:
            t_ids = batch["teacher_input_ids"].to(device)
            t_att = batch["teacher_attention_mask"].to(device)
            s_pos = batch["align_student"].to(device).long()
            t_pos = batch["align_teacher"].to(device).long()
            n_pairs = batch["n_aligned"].to(device).long()
            valid = (torch.arange(s_pos.shape[1], device=device)[None] < n_pairs[:, None]) & (s_pos >= 0) & (t_pos >= 0)
            s_idx = s_pos.clamp(0, length - 1)

            def through_pairs(student_flags_BL: torch.Tensor) -> torch.Tensor:
                return student_flags_BL.gather(1, s_idx) & valid

            in_a = through_pairs(split[0]) if split is not None else None
            s_rows, t_rows, *extra, selected = compact_rows(
                s_idx, t_pos.clamp(0, t_ids.shape[1] - 1), *(() if in_a is None else (in_a,)),
                selected_BN=through_pairs(nb.masked),
            )
            in_a = extra[0] if extra else None
            l_t = t_ids.shape[1]
            if split is None:
                t_masked = _scatter_pairs(through_pairs(nb.masked), t_pos, valid, l_t)
                t_hidden = self.teacher.row_hidden(t_ids, t_masked, t_rows, attention_mask=t_att)
            else:
                t_a = _scatter_pairs(through_pairs(split[0]), t_pos, valid, l_t)
                t_b = _scatter_pairs(through_pairs(split[1]), t_pos, valid, l_t)
                t_hidden = self.teacher.comp_demo_row_hidden(t_ids, t_a, t_b, t_rows, in_a, attention_mask=t_att)
            counts["aligned_pairs"] = valid.sum().float()
        else:
            positions = torch.arange(length, device=device).expand(b, length)
            in_a = split[0] if split is not None else None
            s_rows, *extra, selected = compact_rows(positions, *(() if in_a is None else (in_a,)), selected_BN=nb.masked)
            in_a = extra[0] if extra else None
            if split is None:
                t_hidden = self.teacher.row_hidden(nb.x_0, nb.masked, s_rows)
            else:
                t_hidden = self.teacher.comp_demo_row_hidden(nb.x_0, split[0], split[1], s_rows, in_a)
        weights = self.tidal_weights(nb.t, step=step)
        lambda_B, omega_B = weights if weights is not None else (None, None)
        targets = TokenTargets(x_t=nb.x_t, x_0=nb.x_0, coeff=self.coeff(nb, nb.masked), rows=s_rows, selected=selected,
                               teacher_hidden=t_hidden, teacher_head=self.teacher.head_weight,
                               lambda_B=lambda_B, omega_B=omega_B)
        counts["distill_rows"] = selected.sum().float()
        return targets, counts


def build_objective(
    cfg: RunConfig, spec: ObjectiveSpec, *, student: torch.nn.Module, teacher: TeacherEngine | None,
    schedule: NoiseSchedule, mask_token_id: int, rank: int, loss_implementation: str,
) -> tuple[DiffusionCEModule, Objective]:
    """The student module the engine wraps and the objective that feeds it, for ``spec``."""
    chunk_rows = cfg.model.ce_chunk_rows
    if not spec.terms:
        return (DiffusionCEModule(student, chunk_rows=chunk_rows, loss_implementation=loss_implementation),
                CEObjective(cfg, schedule=schedule))
    if teacher is None:
        raise ValueError(f"distill mode {spec.mode!r} needs a teacher")
    d = cfg.distill
    tidal = None
    if spec.uses_tidal:
        tidal = TidalSchedule(lambda_init=d.tidal_lambda_init, lambda_max=d.tidal_lambda_max, growth=d.tidal_growth,
                              axis=d.tidal_axis, timestep_weight=d.tidal_timestep_weight)
    module: DiffusionCEModule
    if spec.uses_chunks:
        module = ChunkDistillModule(student, term=chunk_term(spec), weight=d.calm_weight, temperature=d.calm_temperature,
                                    chunk_rows=chunk_rows, loss_implementation=loss_implementation)
        cls: type[_DistillObjective] = ChunkObjective
    else:
        module = TokenDistillModule(student, terms=divergence_terms(spec, cfg), temperature=d.kl_temperature,
                                    chunk_rows=chunk_rows, loss_implementation=loss_implementation)
        cls = TokenObjective
    objective = cls(teacher, cfg=cfg, spec=spec, schedule=schedule, mask_token_id=mask_token_id, rank=rank, tidal=tidal)
    return module, objective
