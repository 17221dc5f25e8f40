"""The student half of a step: what the DeepSpeed engine runs on typed targets, returning the loss and its terms.

``engine(targets=...)`` calls :meth:`DiffusionCEModule.forward`: one BD3LM forward of the student on
``[x_t ; x_0]``, then the loss the targets ask for, through the fused LM-head losses (the LM head runs
only on the x_t half, inside the loss; docs/design.md decision 3):

- :class:`CETargets` (every objective's CE, the only term without a teacher): masked-diffusion CE;
- :class:`ChunkTargets` (pipeline A, docs/method.md Appendix A): CE + CALM / Reverse CALM / chunk TIDAL,
  sharing one fused LM-head pass;
- :class:`TokenTargets` (pipeline B, docs/method.md Appendix B): CE on the full sequence + KL / reverse KL / token TIDAL on
  the selected student rows against the teacher's hidden rows through the teacher's head (fused: no ``[N, V']``
  logits on either side, :mod:`tide_ds.losses.token_divergence`);
- :class:`HeldoutTargets`: held-out evaluation (:meth:`DiffusionCEModule.heldout_loss`), the same on every module.

Every module returns ``(loss, terms, sums)``: ``terms`` maps each loss term's name to its value in this
micro-batch (logged as the mean over the micro-batches of a step), ``sums`` maps names to quantities
logged as totals over the step. All are device tensors.
The targets are built by the objectives of :mod:`tide_ds.trainer.objectives` (the teacher half).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from tide_ds.losses.calm import calm_loss, chunk_sums
from tide_ds.losses.fused_divergence import DivergenceTerm
from tide_ds.losses.fused_head import fused_head_loss, fused_masked_ce
from tide_ds.losses.objective import LossTerm, TermKind
from tide_ds.losses.tidal import chunk_tidal
from tide_ds.losses.token_divergence import token_divergences

Terms = dict[str, torch.Tensor]


@dataclass
class CETargets:
    """Masked-diffusion CE: the student reads ``x_t`` and ``x_0`` ``[B, L]`` and predicts ``x_0`` where ``coeff``
    (float32 ``[B, L]``, the per-token CE weight: zero where no loss) says."""

    x_t: torch.Tensor
    x_0: torch.Tensor
    coeff: torch.Tensor


@dataclass
class HeldoutTargets(CETargets):
    """Held-out evaluation: ``coeff`` is ``w(t) * masked`` (unnormalised); the loss is the weighted sum."""


@dataclass
class ChunkTargets(CETargets):
    """Pipeline A: CE plus one chunk term against the teacher's chunk log-likelihoods.

    ``rows [B, L]`` the student positions whose log-probs the chunk sums need (the masked ones),
    ``student_chunks [B, L]`` each position's chunk id (-1 = none), ``teacher_ll [B, C]`` the teacher's chunk
    log-likelihoods, ``chunk_active [B, C]`` the chunks that count, and TIDAL's per-sample ``lambda_B`` and
    ``omega_B`` ``[B]`` (zeros and ones without TIDAL, unused by CALM).
    """

    rows: torch.Tensor
    student_chunks: torch.Tensor
    teacher_ll: torch.Tensor
    chunk_active: torch.Tensor
    lambda_B: torch.Tensor
    omega_B: torch.Tensor


@dataclass
class TokenTargets(CETargets):
    """Pipeline B: CE plus token terms on student rows ``rows [B, N]`` (``selected [B, N]`` says which count)
    against the teacher's final hidden states at the same rows ``teacher_hidden [B, N, D_t]`` (teacher dtype)
    through the teacher's head; TIDAL's per-sample ``lambda_B`` and ``omega_B`` ``[B]`` (``None`` without TIDAL).

    ``teacher_head`` opens the teacher's LM head cut to the shared prefix V' (``[V', D_t]``, a constant) for the
    duration of a ``with`` block (:meth:`tide_ds.teacher.engine.TeacherEngine.head_weight`: gathered under
    ZeRO-3, a collective). The student module enters it exactly once per forward, on every rank.
    """

    rows: torch.Tensor
    selected: torch.Tensor
    teacher_hidden: torch.Tensor
    teacher_head: Callable[[], AbstractContextManager[torch.Tensor]]
    lambda_B: torch.Tensor | None = None
    omega_B: torch.Tensor | None = None


class DiffusionCEModule(torch.nn.Module):
    """What the student engine runs: BD3LM forward, then the fused masked-diffusion CE.

    ``loss_implementation`` is ``model.loss_implementation`` (resolved by
    ``tide_ds.losses.fused_head.resolve_loss_implementation``). Subclasses add distillation terms by
    overriding :meth:`train_loss` for their targets; held-out evaluation is the same for all.
    """

    def __init__(self, student: torch.nn.Module, *, chunk_rows: int = 0, loss_implementation: str = "auto") -> None:
        super().__init__()
        self.student = student
        self.chunk_rows = chunk_rows
        self.loss_implementation = loss_implementation

    def register_for_zero3(self) -> None:
        """The loss reads the LM head weight outside the head's own forward: let ZeRO-3 gather it."""
        import deepspeed

        deepspeed.zero.register_external_parameter(self, self.student.lm_head_weight)

    def forward(self, targets: CETargets) -> tuple[torch.Tensor, Terms, Terms]:
        # One entry point, so that the engine's hooks (ZeRO-3 gathers the LM head weight) run for every loss.
        hidden_BLD = self.student(x_t_BL=targets.x_t, x_0_BL=targets.x_0)
        if isinstance(targets, HeldoutTargets):
            return self.heldout_loss(hidden_BLD, targets)
        return self.train_loss(hidden_BLD, targets)

    def _masked_ce(self, hidden_BLD: torch.Tensor, targets: CETargets) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum coeff * CE, sum of the plain CE where coeff > 0)``."""
        return fused_masked_ce(
            hidden_BLD.flatten(0, 1), self.student.lm_head_weight, targets.x_0.flatten(), targets.coeff.flatten(),
            chunk_rows=self.chunk_rows, implementation=self.loss_implementation,
        )

    def heldout_loss(self, hidden_BLD: torch.Tensor, targets: HeldoutTargets) -> tuple[torch.Tensor, Terms, Terms]:
        """``(sum w(t) m CE, {}, {"nll_sum": plain CE summed over the masked tokens})``."""
        weighted, nll_sum = self._masked_ce(hidden_BLD, targets)
        return weighted, {}, {"nll_sum": nll_sum}

    def train_loss(self, hidden_BLD: torch.Tensor, targets: CETargets) -> tuple[torch.Tensor, Terms, Terms]:
        """CE only: ``(loss, {"ce": loss}, {"nll_sum": plain CE summed over the masked tokens})``."""
        loss, nll_sum = self._masked_ce(hidden_BLD, targets)
        return loss, {"ce": loss.detach()}, {"nll_sum": nll_sum}


class ChunkDistillModule(DiffusionCEModule):
    """Pipeline A: CE and the chunk term (``weight`` x CALM / Reverse CALM / chunk TIDAL) in one fused LM-head pass."""

    def __init__(self, student: torch.nn.Module, *, term: LossTerm, weight: float, temperature: float,
                 chunk_rows: int = 0, loss_implementation: str = "auto") -> None:
        super().__init__(student, chunk_rows=chunk_rows, loss_implementation=loss_implementation)
        self.term = term
        self.weight = weight
        self.temperature = temperature

    def train_loss(self, hidden_BLD: torch.Tensor, targets: ChunkTargets) -> tuple[torch.Tensor, Terms, Terms]:  # type: ignore[override]
        b, length = targets.x_t.shape
        num_chunks = targets.teacher_ll.shape[1]

        def loss_fn(lp_N: torch.Tensor) -> tuple[torch.Tensor, Terms]:
            ce = -(targets.coeff.flatten().to(lp_N.dtype) * lp_N).sum()
            student_ll = chunk_sums(lp_N.view(b, length), targets.student_chunks, num_chunks)
            if self.term.kind is TermKind.CALM:
                term = calm_loss(student_ll, targets.teacher_ll, targets.chunk_active, temperature=self.temperature,
                                 reverse=self.term.reverse)
            else:
                term = chunk_tidal(
                    student_ll, targets.teacher_ll, targets.chunk_active, targets.lambda_B,
                    temperature=self.temperature, reverse=self.term.reverse, weight_B=targets.omega_B,
                )
            return ce + self.weight * term, {"ce": ce, self.term.name: term}

        loss, _, terms = fused_head_loss(
            hidden_BLD.flatten(0, 1), self.student.lm_head_weight, targets.x_0.flatten(), targets.rows.flatten(),
            loss_fn, chunk_rows=self.chunk_rows, implementation=self.loss_implementation,
        )
        return loss, terms, {}


class TokenDistillModule(DiffusionCEModule):
    """Pipeline B: CE on the full student sequence (docs/method.md §3.3 step 7) through the fused CE, plus the token terms on
    the selected rows from both models' hidden rows and heads (each term with its weight, ``DivergenceTerm``;
    :func:`tide_ds.losses.token_divergence.token_divergences`)."""

    def __init__(self, student: torch.nn.Module, *, terms: tuple[DivergenceTerm, ...], temperature: float,
                 chunk_rows: int = 0, loss_implementation: str = "auto") -> None:
        super().__init__(student, chunk_rows=chunk_rows, loss_implementation=loss_implementation)
        self.terms = terms
        self.temperature = temperature

    def train_loss(self, hidden_BLD: torch.Tensor, targets: TokenTargets) -> tuple[torch.Tensor, Terms, Terms]:  # type: ignore[override]
        ce, _ = self._masked_ce(hidden_BLD, targets)
        b, n = targets.rows.shape
        d = hidden_BLD.shape[-1]
        index = targets.rows.long().clamp(0, hidden_BLD.shape[1] - 1).unsqueeze(-1).expand(b, n, d)
        picked_BND = hidden_BLD.gather(1, index)

        def per_row(values_B: torch.Tensor | None) -> torch.Tensor | None:
            return None if values_B is None else values_B[:, None].expand(b, n).flatten()

        # The teacher's head is held (gathered under ZeRO-3) only while the terms read it: their backward
        # rescales gradients kept from this forward and never reads the teacher's head again.
        with targets.teacher_head() as t_weight_WE:  # [V', D_t]: cut to the shared prefix
            total, values = token_divergences(
                picked_BND.flatten(0, 1), self.student.lm_head_weight, targets.teacher_hidden.flatten(0, 1), t_weight_WE,
                targets.selected.flatten(), self.terms, temperature=self.temperature,
                shared_vocab_size=t_weight_WE.shape[0], lam_N=per_row(targets.lambda_B), omega_N=per_row(targets.omega_B),
                implementation=self.loss_implementation, chunk_rows=self.chunk_rows,
            )
        return ce + total, {"ce": ce.detach(), **values}, {}
