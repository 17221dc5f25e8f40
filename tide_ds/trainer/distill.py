"""The distillation steps: pipeline A (cross tokenizer, chunk terms, spec ALGORITHMS.md Appendix A) and
pipeline B (shared tokenizer, token terms on the shared vocabulary, Appendix B).

noise -> chunk-consistent masks (§4.4) -> teacher target log-probs under no_grad (one pass, or CompDemo's
two on every rank) -> teacher chunk log-likelihoods -> student BD3LM forward -> CE + CALM / Reverse CALM /
chunk TIDAL through the fused LM-head loss -> backward -> step. Every loss term is returned on its own.

Pipeline-A batch columns (from the offline preprocessing): ``input_ids, labels, student_chunk_ids [B, L]``,
``teacher_input_ids, teacher_attention_mask, teacher_chunk_ids [B, L_t]`` (chunk id -1 = no chunk).

Pipeline B, aligned modes (§3.3): ``teacher_input_ids, teacher_attention_mask [B, L_t]``, position pairs
``align_student, align_teacher [B, N]`` (-1 padded) and ``n_aligned [B]``. Non-aligned modes (§3.2) need
only ``input_ids, labels``: the teacher reads the student's own ids.
"""

from __future__ import annotations

import torch

from tide_ds.config import RunConfig
from tide_ds.diffusion.chunk_masking import chunk_consistent_masks, gather_chunks
from tide_ds.diffusion.masking import token_loss_weights
from tide_ds.losses.calm import calm_loss, chunk_sums
from tide_ds.losses.fused_divergence import DivergenceTerm, fused_head_divergence
from tide_ds.losses.fused_head import fused_head_loss, fused_masked_ce
from tide_ds.losses.objective import LossTerm, ObjectiveSpec, TermKind
from tide_ds.losses.tidal import TidalSchedule
from tide_ds.losses.token_divergence import token_divergences
from tide_ds.teacher.forward import complementary_split
from tide_ds.trainer.engine import DiffusionCEModule
from tide_ds.trainer.step import add_noise, noise_generator

CHUNK_COLUMNS = ("student_chunk_ids", "teacher_input_ids", "teacher_attention_mask", "teacher_chunk_ids")
ALIGN_COLUMNS = ("teacher_input_ids", "teacher_attention_mask", "align_student", "align_teacher", "n_aligned")


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
            hidden, self.student.lm_head_weight, x_0.flatten(), rows.flatten(), loss_fn, chunk_rows=self.chunk_rows,
            implementation=self.loss_implementation,
        )
        return loss, terms


def chunk_term(spec: ObjectiveSpec) -> LossTerm:
    (term,) = spec.terms  # pipeline A modes hold exactly one chunk term (spec §9.1)
    return term


def _noised_micro_batches(batches, *, cfg: RunConfig, step: int, rank: int, schedule, mask_token_id: int, device):
    """The micro-batches of optimizer step ``step``: ``(batch, micro_step, noised batch)``, noise seeded per
    ``(seed, micro_step, rank)``."""
    ga = cfg.train.gradient_accumulation_steps
    for micro in range(ga):
        batch = next(batches)
        micro_step = step * ga + micro
        gen = noise_generator(cfg, seed=cfg.train.seed, micro_step=micro_step, rank=rank, stream="noise", device=device)
        yield batch, micro_step, add_noise(batch, cfg=cfg, schedule=schedule, mask_token_id=mask_token_id, generator=gen, device=device)


def _demo_split(masked: torch.Tensor, *, cfg: RunConfig, micro_step: int, rank: int, device):
    """CompDemo's complementary split of ``masked`` (§8), from its own seeded stream."""
    gen = noise_generator(cfg, seed=cfg.train.seed, micro_step=micro_step, rank=rank, stream="demo", device=device)
    return complementary_split(masked, demo_ratio=cfg.distill.demo_ratio, generator=gen)


def _loss_weights(nb, masked: torch.Tensor, *, cfg: RunConfig, schedule, tidal: TidalSchedule | None, step: int):
    """Per-token CE weights, and TIDAL's lambda and omega per sequence (``None`` without TIDAL)."""
    coeff = token_loss_weights(
        nb.t, masked, nb.maskable,
        weight_type=cfg.diffusion.loss_weight_type, norm_type=cfg.diffusion.loss_norm_type, schedule=schedule,
    )
    if tidal is None:
        return coeff, None, None
    progress = min(1.0, step / max(1, cfg.train.max_steps))
    return coeff, tidal.sample_lambda(nb.t, progress=progress), tidal.sample_weight(nb.t)


def _step_and_accumulate(engine, loss, terms: dict, sums: dict, *, cfg: RunConfig, totals: dict) -> None:
    """Backward and engine step; adds the micro-batch mean of the loss terms and the sum of ``totals``."""
    engine.backward(loss)
    engine.step()
    ga = cfg.train.gradient_accumulation_steps
    for key, value in {"loss": loss.detach().float(), **{k: v.float() for k, v in terms.items()}}.items():
        sums[key] = sums.get(key, 0) + value / ga
    for key, value in totals.items():
        sums[key] = sums.get(key, 0) + value


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
    sums: dict[str, torch.Tensor] = {}
    for batch, micro_step, nb in _noised_micro_batches(
        batches, cfg=cfg, step=step, rank=rank, schedule=schedule, mask_token_id=mask_token_id, device=device
    ):
        s_chunks = batch["student_chunk_ids"].to(device)
        t_chunks = batch["teacher_chunk_ids"].to(device)
        t_ids = batch["teacher_input_ids"].to(device)
        t_att = batch["teacher_attention_mask"].to(device)
        num_chunks = s_chunks.shape[1]  # a fixed bound (every chunk holds a student token): no host sync
        masks = chunk_consistent_masks(nb.masked, batch["labels"].to(device), s_chunks, t_chunks, num_chunks)
        x_t = torch.where(masks.student_masked, torch.full_like(nb.x_0, mask_token_id), nb.x_0)
        if spec.comp_demo:  # always two passes on every rank
            a_ch, b_ch = _demo_split(masks.chunk_masked, cfg=cfg, micro_step=micro_step, rank=rank, device=device)
            teacher_lp = teacher.comp_demo_target_logprobs(
                t_ids, gather_chunks(a_ch, t_chunks), gather_chunks(b_ch, t_chunks), attention_mask=t_att
            )
        else:
            teacher_lp = teacher.target_logprobs(t_ids, masks.teacher_masked, attention_mask=t_att)
        teacher_ll = chunk_sums(teacher_lp, t_chunks, num_chunks)
        coeff, lambda_B, weight_B = _loss_weights(nb, masks.student_masked, cfg=cfg, schedule=schedule, tidal=tidal, step=step)
        lambda_B = nb.t.new_zeros(nb.t.shape) if lambda_B is None else lambda_B
        weight_B = nb.t.new_ones(nb.t.shape) if weight_B is None else weight_B
        loss, terms = engine(
            x_t, nb.x_0, coeff, masks.student_masked, s_chunks, teacher_ll, masks.chunk_active, lambda_B, weight_B
        )
        _step_and_accumulate(engine, loss, terms, sums, cfg=cfg, totals={"active_chunks": masks.chunk_active.sum().float()})
    return sums


# ---------------------------------------------------------------------------------------------
# Pipeline B: shared tokenizer, token-level KL / reverse KL / TIDAL (spec §3.2, §3.3, §6, §7.3, §8.1)

_DIVERGENCE_KIND = {(TermKind.KL, False): "forward", (TermKind.KL, True): "reverse", (TermKind.TIDAL, False): "tidal"}


def divergence_terms(spec: ObjectiveSpec, cfg: RunConfig) -> tuple[DivergenceTerm, ...]:
    """The spec's token-level terms with their weights (§10: ``kl_weight`` for KL, ``tidal_weight`` for TIDAL)."""
    weights = {"kl": cfg.distill.kl_weight, "tidal": cfg.distill.tidal_weight}
    return tuple(
        DivergenceTerm(term.name, _DIVERGENCE_KIND[(term.kind, term.reverse)], weights[term.weight_group])
        for term in spec.terms
    )


class TokenDistillModule(DiffusionCEModule):
    """Student side of pipeline B: ``forward(x_t, x_0, coeff, rows, selected, teacher_logits, lam, omega)
    -> (loss, {term: value})``. CE runs on the full student sequence (§3.3 step 7) through the fused CE;
    the token terms run on the student rows ``rows [B, N]`` against the teacher's row logits
    ``[B, N, V']`` through the fused head divergence. With only ``(x_t, x_0, coeff)`` it is the plain CE
    module (held-out evaluation)."""

    def __init__(self, student: torch.nn.Module, *, terms: tuple[DivergenceTerm, ...], temperature: float, chunk_rows: int = 0):
        super().__init__(student, chunk_rows=chunk_rows)
        self.terms = terms
        self.temperature = temperature

    def forward(self, x_t, x_0, coeff, rows=None, selected=None, teacher_logits=None, lam=None, omega=None, *,
                teacher_hidden=None, teacher_weight=None):
        if rows is None:
            return super().forward(x_t, x_0, coeff)
        hidden_BLD = self.student(x_t, x_0)
        weight = self.student.lm_head_weight
        ce, _ = fused_masked_ce(hidden_BLD.flatten(0, 1), weight, x_0.flatten(), coeff.flatten(),
                                chunk_rows=self.chunk_rows, implementation=self.loss_implementation)
        b, n = rows.shape
        d = hidden_BLD.shape[-1]
        picked = hidden_BLD.gather(1, rows.long().clamp(0, hidden_BLD.shape[1] - 1).unsqueeze(-1).expand(b, n, d))
        if teacher_hidden is not None:  # the default: teacher rows + head, no [N, V'] logits (issue 17)
            total, values = self._token_divergences(picked, weight, teacher_hidden, teacher_weight, selected, lam, omega)
            return ce + total, {"ce": ce.detach(), **values}
        total, values = fused_head_divergence(
            picked.flatten(0, 1), weight, teacher_logits.flatten(0, 1), selected.flatten(), self.terms,
            temperature=self.temperature,
            lam_N=None if lam is None else lam[:, None].expand(b, n).flatten(),
            omega_N=None if omega is None else omega[:, None].expand(b, n).flatten(),
            chunk_rows=self.chunk_rows,
        )
        return ce + total, {"ce": ce.detach(), **values}

    def _token_divergences(self, picked_BND, weight_VD, teacher_hidden_BNE, teacher_weight_WE, selected_BN, lam_B, omega_B):
        """The token terms through both heads (:func:`tide_ds.losses.token_divergence.token_divergences`); the
        teacher head arrives cut to the shared prefix, so V' is its row count."""
        b, n = selected_BN.shape
        return token_divergences(
            picked_BND.flatten(0, 1), weight_VD, teacher_hidden_BNE.flatten(0, 1), teacher_weight_WE, selected_BN.flatten(),
            self.terms, temperature=self.temperature, shared_vocab_size=teacher_weight_WE.shape[0],
            lam_N=None if lam_B is None else lam_B[:, None].expand(b, n).flatten(),
            omega_N=None if omega_B is None else omega_B[:, None].expand(b, n).flatten(),
            implementation=self.loss_implementation, chunk_rows=self.chunk_rows,
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
    position 0 is a template token there (spec §3.3 step 2); here they go to a spare column that is dropped.
    """
    out = torch.zeros(flags_BN.shape[0], length + 1, dtype=torch.bool, device=flags_BN.device)
    index = torch.where(valid_BN, positions_BN.long().clamp(0, length - 1), torch.full_like(positions_BN.long(), length))
    out.scatter_(1, index, flags_BN & valid_BN)
    return out[:, :length]


def distill_step_b(
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
    """Micro-steps of optimizer step ``step`` for pipeline B; device-side sums of every term for logging.

    Aligned modes (§3.3): the student mask is propagated through the position pairs (``mu``), the teacher
    reads its own template with the propagated mask, and the terms compare aligned-and-masked rows.
    Non-aligned modes (§3.2): the teacher reads the student's ids with the student's mask, every masked
    position is a row. CompDemo (§8.1) splits the student mask and maps both halves the same way.
    """
    device = engine.device
    sums: dict[str, torch.Tensor] = {}
    for batch, micro_step, nb in _noised_micro_batches(
        batches, cfg=cfg, step=step, rank=rank, schedule=schedule, mask_token_id=mask_token_id, device=device
    ):
        split = None
        if spec.comp_demo:  # always two passes on every rank
            split = _demo_split(nb.masked, cfg=cfg, micro_step=micro_step, rank=rank, device=device)
        b, length = nb.x_0.shape
        if spec.aligned:
            t_ids = batch["teacher_input_ids"].to(device)
            t_att = batch["teacher_attention_mask"].to(device)
            s_pos = batch["align_student"].to(device).long()
            t_pos = batch["align_teacher"].to(device).long()
            n_pairs = batch["n_aligned"].to(device).long()
            valid = (torch.arange(s_pos.shape[1], device=device)[None] < n_pairs[:, None]) & (s_pos >= 0) & (t_pos >= 0)
            s_idx = s_pos.clamp(0, length - 1)

            def through_pairs(student_flags_BL):
                return student_flags_BL.gather(1, s_idx) & valid

            selected = through_pairs(nb.masked)
            in_a = through_pairs(split[0]) if split is not None else None
            s_rows, t_rows, *extra, selected = compact_rows(
                s_idx, t_pos.clamp(0, t_ids.shape[1] - 1), *(() if in_a is None else (in_a,)), selected_BN=selected
            )
            in_a = extra[0] if extra else None
            l_t = t_ids.shape[1]
            if split is None:
                t_masked = _scatter_pairs(through_pairs(nb.masked), t_pos, valid, l_t)
                t_hidden = teacher.row_hidden(t_ids, t_masked, t_rows, attention_mask=t_att)
            else:
                t_a = _scatter_pairs(through_pairs(split[0]), t_pos, valid, l_t)
                t_b = _scatter_pairs(through_pairs(split[1]), t_pos, valid, l_t)
                t_hidden = teacher.comp_demo_row_hidden(t_ids, t_a, t_b, t_rows, in_a, attention_mask=t_att)
            counts = {"aligned_pairs": valid.sum().float()}
        else:
            positions = torch.arange(length, device=device).expand(b, length)
            in_a = split[0] if split is not None else None
            s_rows, *extra, selected = compact_rows(
                positions, *(() if in_a is None else (in_a,)), selected_BN=nb.masked
            )
            in_a = extra[0] if extra else None
            if split is None:
                t_hidden = teacher.row_hidden(nb.x_0, nb.masked, s_rows)
            else:
                t_hidden = teacher.comp_demo_row_hidden(nb.x_0, split[0], split[1], s_rows, in_a)
            counts = {}
        coeff, lam, omega = _loss_weights(nb, nb.masked, cfg=cfg, schedule=schedule, tidal=tidal, step=step)
        with teacher.head_weight() as t_weight:  # gathered under ZeRO-3 for the student's forward only
            loss, terms = engine(nb.x_t, nb.x_0, coeff, s_rows, selected, None, lam, omega,
                                 teacher_hidden=t_hidden, teacher_weight=t_weight)
        counts["distill_rows"] = selected.sum().float()
        _step_and_accumulate(engine, loss, terms, sums, cfg=cfg, totals=counts)
    return sums
